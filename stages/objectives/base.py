"""The objective protocol: the train loop knows only this (no `if objective == ...` in the loop).

An objective declares what it needs from upstream artifacts as data (`needs`): per-token columns of a table
(reference scores, concept labels), or a trained model (a distillation teacher). The stage resolves them; the
loop hands every batch the per-token columns as named tensors aligned with its targets and calls the
objective's hooks (begin_step, observe, state_dict, write_tables) without knowing what they do.
Shapes: B windows, T seq_len.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from stages.runtime.devices import autocast


@dataclass(frozen=True)
class TokenColumns:
    """Per-token columns of an upstream artifact's table, looked up by target token_index."""

    role: str
    """Upstream role name (the key in the node's upstream mapping), e.g. `scores`."""
    stage: str
    """Stage whose artifact holds the table (its registry entry says how to read it)."""
    columns: tuple[str, ...]
    """Column names; each becomes `batch.per_token[name]`."""


@dataclass(frozen=True)
class UpstreamModel:
    """A trained model of an upstream artifact, loaded onto the training device (e.g. a teacher)."""

    role: str
    stage: str


Need = TokenColumns | UpstreamModel


@dataclass
class Batch:
    """One micro-batch of windows with the per-token inputs its objective asked for."""

    inputs_BT: torch.Tensor
    """int64 input token ids."""
    targets_BT: torch.Tensor
    """int64 next-token targets (inputs shifted by one in the packed stream)."""
    token_index_BT: torch.Tensor
    """int64 stream position (token_index) of every target."""
    per_token: dict[str, torch.Tensor] = field(default_factory=dict)
    """Named per-token inputs aligned with targets_BT (shape (B, T) or (B, T, K)): row [b, t] belongs to
    target token_index_BT[b, t], i.e. to the prediction made at input position t."""


@dataclass
class LossOutput:
    """The scalar to backpropagate and numbers to log. Both are normalised so that their mean over the step's
    micro-batches is the step's value: usually means over the micro-batch's counted tokens; an objective that
    normalises over the whole step (begin_step) scales the micro-batch's sums by the number of micro-batches."""

    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)
    selected_BT: torch.Tensor | None = None
    """bool mask of the next-token targets that were trained on, when the objective selects tokens."""


class Objective(Protocol):
    """Builds the model it trains and computes the loss of a micro-batch."""

    needs: tuple[Need, ...]
    """What the objective reads from upstream artifacts."""

    def build_model(self, vocab_size: int, seq_len: int, generator: torch.Generator | None = None) -> nn.Module:
        """A freshly initialised model for this objective, its weights drawn from `generator`."""
        ...

    def attach(self, models: dict[str, nn.Module]) -> None:
        """Receive the upstream models of `needs` (role -> model, on the training device, eval mode)."""
        ...

    def loss(self, model: nn.Module, batch: Batch) -> LossOutput:
        """Loss of one micro-batch (already normalised) and its logged metrics."""
        ...

    def begin_step(self, model: nn.Module, batches: list[Batch]) -> None:
        """Called once per optimiser step with all of its micro-batches (in training order) before their step()
        calls: prepare whatever spans the whole step (e.g. token selection ranked over all of them)."""
        ...

    def step(self, model: nn.Module, batch: Batch, scale: float) -> LossOutput:
        """Forward and backward of one micro-batch, gradients scaled by `scale` (1 / micro-batches per step).

        The loop logs the mean over the step's micro-batches of `loss` as the step's loss."""
        ...

    def observe(self, batch: Batch, out: LossOutput) -> None:
        """Called after every training micro-batch (accumulate per-token statistics)."""
        ...

    def state_dict(self) -> dict:
        """Accumulated state to checkpoint (plain types and tensors)."""
        ...

    def load_state_dict(self, state: dict) -> None:
        """Restore the state of state_dict()."""
        ...

    def write_tables(self, work_dir: Path, split: str) -> list[str]:
        """Write the objective's own tables into the artifact; returns the file names."""
        ...


class ObjectiveBase:
    """Defaults for the optional hooks: needs nothing, accumulates nothing, writes nothing."""

    needs: tuple[Need, ...] = ()

    def attach(self, models: dict[str, nn.Module]) -> None:
        """No upstream models by default."""

    def begin_step(self, model: nn.Module, batches: list[Batch]) -> None:
        """Nothing spans the step by default: each micro-batch stands alone."""

    def step(self, model: nn.Module, batch: Batch, scale: float) -> LossOutput:
        """loss() under autocast, then one backward of scale * loss."""
        with autocast(batch.inputs_BT.device):
            out = self.loss(model, batch)
        (out.loss * scale).backward()
        return out

    def observe(self, batch: Batch, out: LossOutput) -> None:
        """Nothing to accumulate by default."""

    def state_dict(self) -> dict:
        """No state by default."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """No state by default."""

    def write_tables(self, work_dir: Path, split: str) -> list[str]:
        """No tables by default."""
        return []
