"""What a target variant trains on: token selection (and the reference scoring it ranks by), CoCoMix concepts,
the pause control and distillation.

Fields added after the first release are left out of dumps while at their default, so the artifact keys of
variants that do not use them stay what they were.
"""

from typing import Literal

from pydantic import Field, model_validator

from schemas.base import StrictModel
from schemas.configs.later_fields import LaterFields
from schemas.configs.models import ModelConfig
from schemas.configs.sae_concepts import Attribution


class SelectionConfig(LaterFields):
    """Which target tokens contribute to the loss (Rho-1 Selective Language Modeling when kind=top_k)."""

    LATER = {"rank_over": "micro_batch"}

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
    measured once by benchmarks/selection_rank_over.py, retired since: see git history). A step of one
    micro-batch is ranked the same either way."""


class ConceptsConfig(LaterFields):
    """CoCoMix concept prediction and mixing (arXiv 2502.08524), reading extract_concepts' labels."""

    LATER = {"attribution": None}

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
    attribution: Attribution | None = None
    """Labels of this rule (ExtractConfig.attribution), from the node `extract_concepts.<rule>`. None: the
    pipeline's labels (node `extract_concepts`, rule concepts.attribution)."""


class PauseConfig(LaterFields):
    """The pause-vector control: CoCoMix's interleaving with one learned vector instead of the concept."""

    LATER = {"readout": "pause"}

    block: int | None = Field(None, ge=1)
    """The block whose input gets the pause slots. None: the middle, model.num_layers // 2."""
    readout: Literal["pause", "token"] = "pause"
    """The slot the next token is read from: `pause` (the pause slot, as cocomix reads its concept slot; its
    stream starts as the constant vector, so the token's state reaches it only through attention in the blocks
    after the insert) or `token` (the token's own slot; the pause slots add positions to attend to and the same
    compute, no information)."""


class DistillConfig(StrictModel):
    """Knowledge distillation from the teacher (train_teacher; its logits computed on the fly each micro-batch)."""

    weight: float = Field(0.5, ge=0, le=1)
    """Loss = (1 - weight) * next-token CE + weight * T^2 * KL(teacher_T || student_T)."""
    temperature: float = Field(1.0, gt=0)
    """Softmax temperature T of teacher and student in the KL term."""


class TargetVariant(LaterFields):
    """One named target model: its objective parts. Every variant trains on the same data and budget."""

    LATER = {"concepts": None, "pause": None, "distill": None, "head_weights": None, "model": None,
             "mtp_backward": "sequential", "head_selection": "own"}

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
    """Knowledge distillation from the teacher model (train_teacher)."""
    model: ModelConfig | None = None
    """This variant's own model shape instead of target.model (a matched control: e.g. a wider ntp with a concept
    model's parameter count, or a shallower one with a multi-token model's next-token depth). None: target.model."""

    @model_validator(mode="after")
    def _check_parts(self) -> "TargetVariant":
        if self.head_weights is not None and len(self.head_weights) != self.num_future_tokens:
            raise ValueError(f"target variant {self.name!r}: head_weights has {len(self.head_weights)} entries, "
                             f"num_future_tokens is {self.num_future_tokens}")
        if self.concepts is not None and self.pause is not None:
            raise ValueError(f"target variant {self.name!r}: concepts and pause both insert slots; pick one")
        return self



class ScoreConfig(LaterFields):
    """Per-token reference scoring."""

    LATER = {"num_processes": 1}

    batch_size: int = Field(32, ge=1)
    """Windows per forward pass."""
    num_shards: int = Field(4, ge=1)
    """Shards per split; each is a Prefect task cached on its own, so an interrupted run redoes only unfinished
    shards."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Device for the forward passes."""
    num_processes: int = Field(1, ge=1)
    """Processes of this node that share each shard's windows (one per GPU on CUDA; on the CPU they split its
    cores); the scores are the one-process scores to float tolerance."""
