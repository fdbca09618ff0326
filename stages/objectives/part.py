"""One part of a composed objective: what it needs, what it inserts into the model, its loss term, its metrics.

TokenPrediction (token_prediction.py) owns the prediction heads and composes the parts a variant names
(token_prediction.variant_parts): token selection (selection_part.py), CoCoMix concepts (concepts.py), pause
slots (pause.py), distillation (distillation.py). It never reads the variant's config for a part: the part says
- `needs`: the per-token columns and upstream models the train_target stage resolves for it (base.Need), and so
  the node's upstream roles;
- `evaluate_upstream`: the roles (role -> stage) the evaluate stage reads to report on it;
- `inserts()`: what it puts into the model (GPT inserts, keyed by the block they follow);
- its loss terms, each with ONE signature (the micro-batch's `Forward`, like torchtitan's one loss-function
  signature), at fixed points of a micro-batch (like OLMo-core's trainer callbacks):
  `before_heads(fwd)` once the trunk has run (no gradient: e.g. the teacher's logits into fwd.extras),
  `trunk_term(fwd)` a term on the trunk output added to the total (e.g. the concept loss),
  `head_term(fwd, i, logits_BTV, loss)` head i's loss with the part's term mixed in (e.g. distillation);
  a term writes its metrics (detached tensors) into fwd.metrics;
- the objective's bookkeeping hooks (begin_step, observe, state_dict, write_tables), fanned out to every part.
"""

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from schemas.configs import ModelConfig
from schemas.manifest import Manifest
from stages.models.gpt import TrunkOutput
from stages.objectives.base import Batch, LossOutput, Need


@dataclass
class Forward:
    """What a micro-batch's forward has computed so far, handed to every part's loss terms."""

    batch: Batch
    trunk_out: TrunkOutput
    """The trunk's output with its graph (trunk terms backpropagate through it; the heads may get a detached copy)."""
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    """Logged numbers (detached 0-d tensors), in the order they are logged."""
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    """Per-micro-batch tensors a part prepares in before_heads for its own terms."""


class Part:
    """Defaults: needs nothing, inserts nothing, adds no loss, keeps no state."""

    name: str = "part"
    """Key of the part's state in the objective's state_dict."""
    needs: tuple[Need, ...] = ()
    evaluate_upstream: dict[str, str] = {}
    """Upstream roles (role -> stage) the evaluate stage reads for a variant with this part."""

    def inserts(self, model_cfg: ModelConfig, num_heads: int, upstream: dict[str, Manifest]) -> dict[int, dict]:
        """GPT insert specs (after block index -> spec); `upstream` (role -> manifest) gives their sizes."""
        return {}

    def attach(self, models: dict[str, nn.Module]) -> None:
        """Receive the upstream models of `needs` (role -> model)."""

    def before_heads(self, fwd: Forward) -> None:
        """Prepare per-micro-batch inputs of the part's terms (runs after the trunk, under the same autocast)."""

    def trunk_term(self, fwd: Forward) -> torch.Tensor | None:
        """A weighted loss term on the trunk output, or None."""
        return None

    def head_term(self, fwd: Forward, i: int, logits_BTV: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        """Head i's loss with this part's term mixed in (`logits_BTV`: head i's logits over every position)."""
        return loss

    def begin_step(self, model: nn.Module, batches: list[Batch]) -> None:
        """Prepare what spans the optimiser step (Objective.begin_step)."""

    def observe(self, batch: Batch, out: LossOutput) -> None:
        """Accumulate per-token statistics after a micro-batch."""

    def state_dict(self) -> dict | None:
        """Accumulated state to checkpoint, or None when the part keeps none."""
        return None

    def load_state_dict(self, state: dict) -> None:
        """Restore state_dict()."""

    def write_tables(self, work_dir: Path, split: str) -> list[str]:
        """Write the part's tables into the artifact; returns the file names."""
        return []


def insert_block(block: int | None, num_layers: int, num_heads: int = 1) -> int:
    """The block whose input gets an insert: the configured one, or the middle (num_layers // 2) capped to the
    trunk (an insert sits after a trunk block, before the prediction heads)."""
    trunk = num_layers - num_heads
    if trunk < 1:
        raise ValueError(f"an insert needs a trunk block, but all {num_layers} blocks are prediction heads; "
                         "use fewer num_future_tokens or more model.num_layers")
    return block if block is not None else max(1, min(num_layers // 2, trunk))
