"""Configs of the CoCoMix concept stages: the sparse autoencoder (train_sae) and the concept labels
(extract_concepts).
"""

from typing import Literal

from pydantic import Field

from schemas.base import StrictModel
from schemas.configs.later_fields import LaterFields


class SAEConfig(LaterFields):
    """TopK sparse autoencoder on the reference model's residual stream (Gao et al. 2024 recipe)."""

    LATER = {"init_from": None, "init_digest": None, "num_processes": 1}

    layer: int | None = Field(None, ge=0)
    """Residual stream after this reference block (0-based). None: the middle, reference num_layers // 2 - 1
    (the stream entering block num_layers // 2)."""
    expansion: int = Field(16, ge=1)
    """Latents = expansion * d_model."""
    k: int | None = Field(None, ge=1)
    """Active latents per token. None: min(32, d_model // 8) (k = 32 for d_model >= 256; fewer for small widths,
    where 32 of a 128-wide stream would not be sparse)."""
    max_tokens: int = Field(1_000_000, ge=0)
    """Activation rows (tokens of the train split) to train on; the split is cycled when shorter. 0 (only with
    init_from, checked before a run): no training, the pretrained SAE is used as it is (an SAE from init_from is
    never trained)."""
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
    init_from: str | None = None
    """A pretrained SAE folder instead of training one: sae-lens layout (cfg.json + sae_weights.safetensors; TopK or
    ReLU `standard`) or EleutherAI sparsify layout (cfg.json + sae.safetensors, the folder of one hookpoint such as
    `layers.5`). Its hook sets the layer (sae.layer, when given, must agree); it is evaluated on this corpus (the
    same FVU / L0 / dead / spliced-loss metrics) and not trained. A ReLU SAE keeps at most `k` active latents per
    token (default 128). See docs/byom.md."""
    init_digest: str | None = None
    """Set by the planner (stages/dag.py), not by hand: the sha256 of init_from's files (part of the artifact key)."""
    num_processes: int = Field(1, ge=1)
    """Processes training the SAE on this node (data parallel over each step's activation rows; NCCL on CUDA, one
    GPU each; gloo on CPU): the same SAE as one process to float tolerance, since each step's rows are split, not
    multiplied (stages/training/sae_parallel.py). A step's windows, batch_rows // tokenize.seq_len, must divide by
    it."""

    def shape(self, d_model: int) -> tuple[int, int]:
        """(num_latents, k) of the SAE on a d_model-wide residual stream: expansion * d_model latents, and k as
        set or its default min(32, d_model // 8) (at least 1)."""
        return self.expansion * d_model, self.k if self.k is not None else max(1, min(32, d_model // 8))


Attribution = Literal["window_mean", "token", "activation"]
"""How extract_concepts ranks a token's active latents (stages/models/sae.window_concepts)."""


class ExtractConfig(LaterFields):
    """Attribution-selected concept labels for every target token (CoCoMix Sec. 3.1), computed once offline."""

    LATER = {"attribution": "window_mean", "num_processes": 1}

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
    num_processes: int = Field(1, ge=1)
    """Processes of this node that share each shard's windows (one per GPU on CUDA; on the CPU they split its
    cores); the labels are the one-process labels (to float tolerance in the scores)."""
    attribution: Attribution = "window_mean"
    """The labelling rule: `window_mean` a_i * dL/da_i with L the window's mean next-token loss (CoCoMix's code;
    signed score); `token` the same with L the position's own next-token loss (x_{t+1} only); `activation` the
    top active latents by activation (CoCoMix Fig. 6(a)'s control). A variant may read labels of another rule
    (ConceptsConfig.attribution: its own extract_concepts.<rule> node)."""


class LatentDashboardConfig(StrictModel):
    """Per-latent dashboards for `lmpipe inspect` (stage latent_dashboards): density, top-activating contexts and
    the tokens each decoder direction promotes and suppresses. Built when a target variant uses concepts."""

    split: Literal["train", "val", "ref_train", "ref_val"] = "train"
    """Split whose windows are scanned for activations (the SAE's training split by default)."""
    max_tokens: int | None = Field(None, ge=1)
    """Scan at most this many tokens of the split (whole windows from its start). None: the whole split."""
    contexts_per_latent: int = Field(20, ge=1)
    """Top-activating contexts kept per latent (bounded size per latent, as SAE dashboards show)."""
    context_tokens: int = Field(10, ge=0)
    """Tokens kept on each side of the peak token (clipped to its window: the context the model saw)."""
    logit_tokens: int = Field(10, ge=1)
    """Tokens kept per latent that its decoder direction promotes (and as many that it suppresses)."""
    batch_size: int = Field(32, ge=1)
    """Windows per reference forward."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Device for the reference forward and the SAE encoder."""
