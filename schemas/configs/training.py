"""Configs of the training stages: one training run (TrainConfig), the base, reference and target models, and
the TargetRun that one train_target artifact depends on.
"""

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from schemas.base import StrictModel
from schemas.configs.later_fields import LaterFields
from schemas.configs.models import ModelConfig
from schemas.configs.objectives import TargetVariant


class TrainConfig(StrictModel):
    """Optimisation, schedule, evaluation and checkpointing of one training run."""

    max_tokens: int = Field(200_000, ge=0)
    """Token budget: training stops after the first step that reaches it. 0 (only with the role's init_from, checked
    before a run): no training, the checkpoint is used as it is (evaluated once)."""
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
    """Nodes this run trains on: the same `lmpipe run` started on every node (nodes 0..num_nodes-1 of the run join;
    docs/operations.md, Past one node), or `train` called from Python on every node with rdzv_endpoint set."""
    rdzv_endpoint: str | None = None
    """host:port of the rendezvous (torch's c10d store) for `train` called from Python on several nodes; a free
    local port on one node. Under a multi-node `lmpipe run` the run's own endpoint is used (leave this unset: a
    host name in the config would enter the artifact key)."""
    parallelism: Literal["ddp", "fsdp"] = "ddp"
    """With several processes: `ddp` replicates the model and all-reduces gradients; `fsdp` shards parameters,
    gradients and optimizer state per block (FSDP2 fully_shard; bf16 parameters with fp32 reduction on CUDA)."""

    @property
    def world_size(self) -> int:
        """Training processes in all."""
        return self.num_processes * self.num_nodes


class CheckpointRole(LaterFields):
    """A model role that can start from a local Hugging Face checkpoint folder (`init_from`); the fields are left
    out of dumps while unset, so configs without them keep their artifact keys."""

    LATER = {"init_from": None, "init_digest": None}
    ROLE: ClassVar[str] = "model"
    """The config path of the role, for messages."""

    init_from: str | None = None
    """A Hugging Face checkpoint folder (config.json, safetensors weights, tokenizer files) the role starts from:
    its `model` shape comes from the checkpoint (a shape given as well must agree), and train.max_tokens = 0 uses
    it as it is. Llama-family checkpoints become lmpipe models; others (GPT-2, Qwen2) serve only the frozen roles
    (reference with max_tokens 0, teacher with max_tokens 0). See docs/byom.md."""
    init_digest: str | None = None
    """Set by the planner (stages/dag.py), not by hand: the sha256 of init_from's files, so that the artifact key
    (a hash of this config) changes when a file of the checkpoint does."""

    @model_validator(mode="after")
    def _check_init_from(self):
        if self.init_digest is not None and self.init_from is None:
            raise ValueError(f"{self.ROLE}.init_digest is set by the planner for init_from; leave it unset")
        return self


class BaseConfig(CheckpointRole):
    """The base model of the continual-pretraining setup (Rho-1 Sec. 3.1): a plain next-token model pretrained
    on the general data; the reference is fine-tuned from it on `ref_train` and every target continues from it,
    instead of both starting from random weights."""

    ROLE = "base"

    model: ModelConfig = ModelConfig()
    """Base model shape; reference.model and target.model must be the same (their weights are copied from it;
    multi-token heads and inserts are mapped as stages/training/init_weights.py says)."""
    train: TrainConfig = TrainConfig()
    """Base training run, with its own token budget (train.max_tokens)."""
    split: Literal["train", "general"] = "train"
    """The split the base trains on. `general` (tokenize.general_where; the `continual` preset): documents in no
    other split, so the base has never seen a document the reference scores, trains on or is evaluated on, nor
    the targets' continual data, as in Rho-1 Sec. 3.1. `train`: the targets' own split (the reference scores
    documents the base trained on, and the targets continue on data the base has seen)."""


class TeacherConfig(CheckpointRole):
    """The teacher (stage train_teacher): a general next-token model, stronger than the targets, that CoCoMix's
    concepts (the SAE and the concept labels) and distillation's teacher come from, as the paper's pretrained
    GPT-2 does. Built only when a variant uses concepts or distillation. Its data are splits no target is evaluated
    on (never `val`, `ref_val` or `ref_train`)."""

    ROLE = "teacher"

    model: ModelConfig = ModelConfig()
    """Teacher model shape (may be wider or deeper than the targets; it must share their vocabulary)."""
    train: TrainConfig = TrainConfig()
    """Teacher training run, with its own token budget (train.max_tokens)."""
    splits: list[Literal["general", "train"]] = Field(["train"], min_length=1)
    """Splits trained on, their streams joined in this order: `general` (tokenize.general_where; text no target
    trains or is evaluated on) and/or `train` (the targets' own training split: disjoint from every evaluation
    split, but not from the students' data)."""


class ReferenceConfig(CheckpointRole):
    """The reference model, trained on the reference subset."""

    ROLE = "reference"

    model: ModelConfig = ModelConfig()
    """Reference model shape."""
    train: TrainConfig = TrainConfig()
    """Reference training run."""


class DynamicsConfig(StrictModel):
    """Token-loss dynamics (Rho-1 section 2.1) on a fixed probe set of validation tokens."""

    probe_windows: int = Field(16, ge=1)
    """Validation windows whose per-token losses are recorded at every evaluation, spread over `val` like
    train.eval_max_windows (the same windows for every model)."""
    delta_threshold: float = Field(0.2, gt=0)
    """|delta loss| above this marks H->L or L->H (paper: 0.2)."""


class TargetConfig(CheckpointRole):
    """The target models: one shape and training run, several objective variants (init_from: every variant
    starts from the checkpoint; a variant with n prediction heads gets n - 1 extra blocks, copies of its last
    layer)."""

    ROLE = "target"

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


class TargetRun(CheckpointRole):
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

    ROLE = "target"

    @classmethod
    def of(cls, target: TargetConfig, variant: TargetVariant, replica: int = 0) -> "TargetRun":
        """Run `replica` (0-based, see TargetConfig.seeds) of one variant of a TargetConfig."""
        train = target.train.model_copy(update={"seed": target.train.seed + replica}) if replica else target.train
        return cls(model=variant.model or target.model, train=train, dynamics=target.dynamics, variant=variant,
                   init_from=target.init_from, init_digest=target.init_digest)


def replica_name(variant: str, replica: int) -> str:
    """Model name of run `replica` of a variant: the variant itself for run 0, `<variant>.seed<r>` after."""
    return variant if replica == 0 else f"{variant}.seed{replica}"


def variant_of(model: str) -> str:
    """The variant a model name (replica_name) belongs to."""
    return model.split(".", 1)[0]
