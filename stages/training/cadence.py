"""The train loop's periodic components: evaluation on validation splits (+ probe set) and checkpointing."""

import logging

import numpy as np
import torch
from torch import nn

from stages.models.window_losses import perplexity, token_losses
from stages.training.distributed import Ranks
from stages.training.rng import rng_state, set_rng_state
from stages.training.run import TrainRun
from stages.training.state import RunState
from storage import checkpoints
from storage.windows import spread_window_ids

log = logging.getLogger(__name__)


class Evaluator:
    """Mean loss on every validation split every `every` steps (and at the end), plus probe per-token losses."""

    def __init__(self, run: TrainRun, device: torch.device):
        val_windows, probe, label = run.val_windows, run.probe, run.label
        if probe is not None and probe.split not in val_windows:
            raise ValueError(f"{label}: probe split {probe.split!r} is not a validation split ({list(val_windows)})")
        for split in [split for split, windows in val_windows.items() if len(windows) == 0]:
            log.warning("%s: validation split %s has no complete window; it is not evaluated", label, split)
        self.val_windows = {split: windows for split, windows in val_windows.items() if len(windows)}
        self.probe, self.every, self.max_windows = probe, run.cfg.eval_every_steps, run.cfg.eval_max_windows
        self.batch_size, self.device, self.label = run.cfg.micro_batch_size, device, label
        self.last: dict[str, float] = {}

    def due(self, step: int, total_steps: int) -> bool:
        """Evaluate after this step?"""
        return step % self.every == 0 or step == total_steps

    def __call__(self, model: nn.Module, state: RunState) -> dict[str, float]:
        """Evaluate now; appends metric rows and probe losses to the state; returns split -> loss."""
        for split, windows in self.val_windows.items():
            ids = spread_window_ids(len(windows), self.max_windows)
            loss = float(token_losses(model, windows, ids, self.batch_size, self.device).astype(np.float64).mean())
            self.last[split] = loss
            state.log(f"val/{split}/loss", loss)
            state.log(f"val/{split}/ppl", perplexity(loss))
        if self.probe is not None:
            windows = self.val_windows[self.probe.split]
            loss_NT = token_losses(model, windows, self.probe.window_ids, self.batch_size, self.device)
            state.probe.append({"step": state.step, "tokens_seen": state.tokens_seen, "split": self.probe.split,
                                "token_index": torch.from_numpy(windows.target_index(self.probe.window_ids).ravel()),
                                "loss": torch.from_numpy(loss_NT.ravel())})
        log.info("%s eval step %d | %s", self.label, state.step,
                 " | ".join(f"{s} {v:.4f}" for s, v in self.last.items()))
        return dict(self.last)


class Checkpointer:
    """Writes a resumable checkpoint every `every` steps (not after the last) and restores the newest one.

    Model and optimizer go through torch.distributed.checkpoint's state-dict API (fully qualified names, sharded
    or not), so a checkpoint written by N processes resumes at M. With several processes (`ranks`) every rank
    takes part and rank 0 writes the run state; the objective's state is summed over ranks first (it is additive:
    counts), so after a resume rank 0 holds it all and the other ranks start from zero."""

    def __init__(self, run: TrainRun, ranks: Ranks | None = None):
        self.directory = checkpoints.checkpoint_dir(run.work_dir)
        self.every, self.label, self.ranks = run.cfg.checkpoint_every_steps, run.label, ranks

    def maybe_save(self, state: RunState, model: nn.Module, optimizer, total_steps: int) -> None:
        """Checkpoint after this step when due."""
        if state.step % self.every == 0 and state.step < total_steps:
            self.save(state, model, optimizer)

    def save(self, state: RunState, model: nn.Module, optimizer) -> None:
        """Checkpoint now (after the current step)."""
        model_sd, optim_sd = checkpoints.training_state(model, optimizer)
        run = state.state_dict()
        if self.ranks is not None:
            run["objective"] = self.ranks.sum_state(run["objective"])
        checkpoints.save_checkpoint(self.directory, state.step, {"run": run, "rng": rng_state()},
                                    {"model": model_sd, "optimizer": optim_sd},
                                    writer=self.ranks is None or self.ranks.is_writer,
                                    barrier=None if self.ranks is None else self.ranks.barrier)

    def restore(self, state: RunState, model: nn.Module, optimizer) -> bool:
        """Load the newest checkpoint into state, model, optimizer and RNGs; False when there is none."""
        path = checkpoints.latest_checkpoint(self.directory)
        if path is None:
            return False
        model_sd, optim_sd = checkpoints.training_state(model, optimizer)
        tensors = {"model": model_sd, "optimizer": optim_sd}
        try:
            saved = checkpoints.load_checkpoint(path, tensors)
            state.load_state_dict(saved["run"])
        except (ValueError, KeyError, RuntimeError) as err:
            raise ValueError(f"{self.label}: cannot resume from {path}: {err}; delete {self.directory} "
                             "to start over") from None
        checkpoints.set_training_state(model, optimizer, model_sd, optim_sd)
        if self.ranks is not None and not self.ranks.is_writer:
            state.objective = {}  # rank 0 carries the summed counts
        set_rng_state(saved["rng"])
        log.info("%s: resuming from %s (step %d/%d)", self.label, path, state.step, state.schedule[0])
        return True

    def clear(self) -> None:
        """Remove the checkpoints once the final model is saved."""
        import shutil

        shutil.rmtree(self.directory, ignore_errors=True)

