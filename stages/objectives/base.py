"""The objective protocol: the train loop knows only this (no `if objective == ...` in the loop).

Shapes: B windows, T seq_len.
"""

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn


@dataclass
class Batch:
    """One micro-batch of windows; optional per-token reference scores are aligned with targets_BT."""

    inputs_BT: torch.Tensor
    """int64 input token ids."""
    targets_BT: torch.Tensor
    """int64 next-token targets (inputs shifted by one in the packed stream)."""
    token_index_BT: torch.Tensor
    """int64 stream position (token_index) of every target."""
    ref_loss_BT: torch.Tensor | None = None
    """float32 reference loss of every target (from score_reference), when the objective needs it."""
    ref_entropy_BT: torch.Tensor | None = None
    """float32 reference entropy at every target position, when the objective needs it."""


@dataclass
class LossOutput:
    """The scalar to backpropagate (mean over the micro-batch's counted tokens) and numbers to log."""

    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)
    selected_BT: torch.Tensor | None = None
    """bool mask of the next-token targets that were trained on, when the objective selects tokens."""


class Objective(Protocol):
    """Builds the model it trains and computes the loss of a micro-batch."""

    needs_reference_scores: bool
    """When True, batches carry ref_loss_BT and ref_entropy_BT."""

    def build_model(self, vocab_size: int, seq_len: int) -> nn.Module:
        """A freshly initialised model for this objective."""
        ...

    def loss(self, model: nn.Module, batch: Batch) -> LossOutput:
        """Loss of one micro-batch (already normalised) and its logged metrics."""
        ...
