"""What a training run is (TrainRun) and the run in progress in one process (Trainer), as OLMo-core and
torchtitan keep trainer state in one object instead of threading a dozen parameters through helpers.

A TrainRun is what the stage decides before any process, model or optimizer exists (it is pickled to the
workers of a distributed run); a Trainer adds what this process built for it: model, optimizer, data order,
batch schedule, device and ranks. Trainer.step is the optimiser step the loop (loop.py) repeats.
"""

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from schemas.configs import TrainConfig
from stages.objectives.base import Objective
from stages.training import distributed
from stages.training.data import WindowOrder, make_batch
from stages.training.optim import BatchSchedule
from storage.windows import TokenWindows


@dataclass(frozen=True)
class ProbeSet:
    """Fixed validation windows whose per-token losses are recorded at every evaluation."""

    split: str
    window_ids: np.ndarray


@dataclass
class TrainRun:
    """One training run: the objective, its data, config and where it writes."""

    objective: Objective
    train_windows: TokenWindows
    val_windows: dict[str, TokenWindows]
    """Validation splits evaluated every cfg.eval_every_steps (empty: none)."""
    cfg: TrainConfig
    work_dir: Path
    """Where the model, tables and (while running) checkpoints are written."""
    vocab_size: int
    label: str
    """Names the run in logs and errors."""
    lookups: dict[str, np.ndarray] = field(default_factory=dict)
    """Per-token arrays indexed by token_index: batch.per_token."""
    upstream_models: dict[str, nn.Module] = field(default_factory=dict)
    """role -> model, handed to objective.attach on the training device."""
    probe: ProbeSet | None = None
    meta: dict = field(default_factory=dict)
    """Saved in model.json beside the model's shape."""
    init_from: nn.Module | None = None
    """A base model whose weights the fresh model starts from (init_weights.py; a resumed checkpoint wins)."""
    checkpoint: str | None = None
    """A Llama checkpoint folder whose weights the fresh model starts from (stages/models/hf_import.py: its
    layers are the trunk and head 0, extra heads copy the last layer; a resumed checkpoint wins)."""

    def __post_init__(self):
        self.work_dir = Path(self.work_dir)


@dataclass
class Trainer:
    """A run in progress in this process."""

    run: TrainRun
    model: nn.Module
    optimizer: torch.optim.Optimizer
    order: WindowOrder
    schedule: BatchSchedule
    device: torch.device
    ranks: distributed.Ranks | None = None
    """This process's place in a distributed run (None: a single process)."""

    def step(self, step: int) -> tuple[float, dict, float]:
        """One optimizer step (the step-th, 0-based) over accum_steps micro-batches; returns (mean loss, mean
        metrics, grad norm).

        The step's micro-batches are built first (same data order) and handed to objective.begin_step, so an
        objective can prepare what spans the whole step before their forward and backward passes. With several
        processes every rank builds the whole step (begin_step sees all of it), trains on micro-batches rank,
        rank + W, ... and the gradients are averaged over ranks: the update is the one a single process makes."""
        run, model, ranks = self.run, self.model, self.ranks
        objective, cfg = run.objective, run.cfg
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=self.device)
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        batches = [make_batch(run.train_windows, self.order.take(cfg.micro_batch_size), self.device, run.lookups)
                   for _ in range(self.schedule.accum_steps)]
        objective.begin_step(model, batches)
        mine = batches if ranks is None else batches[ranks.rank::ranks.world_size]
        for i, batch in enumerate(mine):
            if ranks is not None:
                distributed.set_gradient_sync(model, i == len(mine) - 1)
            out = objective.step(model, batch, 1.0 / len(mine))  # forward + backward
            objective.observe(batch, out)
            loss_sum += out.loss.detach().float()
            for name, value in out.metrics.items():
                sums[name] = sums.get(name, 0.0) + value
                counts[name] = counts.get(name, 0) + 1
        loss = loss_sum.item() / len(mine)
        metrics = {name: float(sums[name] / counts[name]) for name in sums}
        if ranks is not None:
            means = ranks.mean(metrics | {"": loss})
            loss = means.pop("")
            metrics = means
        grad_norm = distributed.full_grad_norm(
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf")))
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            raise RuntimeError(
                f"{run.label}: non-finite training loss {loss} (grad norm {grad_norm}) at step {step + 1}. Try a "
                f"lower train.lr (now {cfg.lr}), more train.warmup_steps or train.grad_clip; the last good "
                "checkpoint is kept and no checkpoint was written for this step")
        self.optimizer.step()
        return loss, metrics, grad_norm
