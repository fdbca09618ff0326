"""The one train loop, objective-agnostic: it knows only the Objective protocol (stages/objectives/base.py).

Files written into `work_dir`:
    model.safetensors, model.json   the final model (storage/checkpoints.save_model)
    metrics.parquet                 schemas.tables.METRICS: train/loss, train/lr, train/grad_norm,
                                    train/tokens_per_s, train/<objective metric>, val/<split>/loss, val/<split>/ppl
    probe_losses.parquet            schemas.tables.PROBE_LOSSES, only when a probe set is given
    <the objective's own tables>    e.g. token_selection.parquet of a selecting objective
    checkpoints/step-<6 digits>/    while running (the newest two); deleted once the model is saved
A run that finds checkpoints in `work_dir` resumes from the newest one and continues bit-for-bit (CPU) as if
it had never stopped: model, optimizer, run state (step, data order, metrics, objective state) and RNGs.
The model must return next-token logits (B, T, V) from `model(inputs_BT)`; evaluation uses that.
"""

import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from schemas.configs import TrainConfig
from schemas.tables import METRICS, PROBE_LOSSES
from stages.models.init_rng import seeded_generator
from stages.objectives.base import Objective
from stages.runtime import interrupt
from stages.runtime.devices import resolve_device
from stages.runtime.progress import format_duration
from stages.training import distributed
from stages.training.cadence import Checkpointer, Evaluator, ProbeSet
from stages.training.data import WindowOrder, make_batch
from stages.training.init_weights import init_from_base
from stages.training.optim import BatchSchedule, build_optimizer, lr_at
from stages.training.state import RunState
from storage import checkpoints
from storage.parquet import write_table
from storage.windows import TokenWindows

log = logging.getLogger(__name__)

__all__ = ["ProbeSet", "train", "train_step", "compile_blocks"]


def compile_blocks(model: nn.Module) -> None:
    """torch.compile every repeated block in place (so every model method, e.g. forward_heads, is compiled)."""
    for module in list(model.modules()):
        if isinstance(module, nn.ModuleList):
            for block in module:
                block.compile()


def train_step(objective: Objective, model: nn.Module, optimizer, order: WindowOrder, windows: TokenWindows,
               cfg: TrainConfig, schedule: BatchSchedule, device: torch.device,
               lookups: dict[str, np.ndarray] | None, label: str, step: int,
               ranks: distributed.Ranks | None = None) -> tuple[float, dict, float]:
    """One optimizer step over accum_steps micro-batches; returns (mean loss, mean metrics, grad norm).

    The step's micro-batches are built first (same data order) and handed to objective.begin_step, so an objective
    can prepare what spans the whole step before their forward and backward passes. With several processes every
    rank builds the whole step (begin_step sees all of it), trains on micro-batches rank, rank + W, ... and the
    gradients are averaged over ranks: the update is the one a single process makes."""
    optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=device)
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    batches = [make_batch(windows, order.take(cfg.micro_batch_size), device, lookups)
               for _ in range(schedule.accum_steps)]
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
            f"{label}: non-finite training loss {loss} (grad norm {grad_norm}) at step {step + 1}. Try a lower "
            f"train.lr (now {cfg.lr}), more train.warmup_steps or train.grad_clip; the last good checkpoint "
            f"is kept and no checkpoint was written for this step")
    optimizer.step()
    return loss, metrics, grad_norm


def _write_tables(work_dir: Path, state: RunState) -> None:
    """metrics.parquet, plus probe_losses.parquet when probe losses were recorded."""
    rows = state.metrics
    write_table(work_dir / "metrics.parquet", {
        "step": [r[0] for r in rows], "tokens_seen": [r[1] for r in rows],
        "name": [r[2] for r in rows], "value": [float(r[3]) for r in rows],
    }, METRICS)
    if state.probe:
        probe = state.probe
        sizes = [len(p["loss"]) for p in probe]
        write_table(work_dir / "probe_losses.parquet", {
            "step": np.repeat([p["step"] for p in probe], sizes),
            "tokens_seen": np.repeat([p["tokens_seen"] for p in probe], sizes),
            "split": [p["split"] for p, n in zip(probe, sizes, strict=True) for _ in range(n)],
            "token_index": torch.cat([p["token_index"] for p in probe]).numpy(),
            "loss": torch.cat([p["loss"] for p in probe]).numpy(),
        }, PROBE_LOSSES)


def train(objective: Objective, train_windows: TokenWindows, val_windows: dict[str, TokenWindows],
          cfg: TrainConfig, work_dir: Path, *, vocab_size: int, label: str,
          lookups: dict[str, np.ndarray] | None = None, upstream_models: dict[str, nn.Module] | None = None,
          probe: ProbeSet | None = None, meta: dict | None = None,
          on_step: Callable[[int], None] | None = None, init_from: nn.Module | None = None) -> dict:
    """Train objective's model to the token budget (resuming from work_dir's checkpoints); returns a summary.

    `lookups`: per-token arrays indexed by token_index (batch.per_token); `upstream_models`: role -> model
    handed to objective.attach on the training device; `init_from`: a base model whose weights the fresh model
    starts from (stages/training/init_weights.py; a resumed checkpoint overrides them).
    With cfg.world_size > 1 the run happens in that many processes (stages/training/distributed.py): launched
    here, or joined when this process is already a worker of a launch of that size."""
    args = (objective, train_windows, val_windows, cfg, Path(work_dir))
    kwargs = dict(vocab_size=vocab_size, label=label, lookups=lookups, upstream_models=upstream_models,
                  probe=probe, meta=meta, init_from=init_from)
    if cfg.world_size == 1:
        return _train(*args, **kwargs, on_step=on_step)
    try:  # a step that the processes cannot share fails here, before any of them starts
        BatchSchedule.of(cfg, train_windows.seq_len)
    except ValueError as err:
        raise ValueError(f"{label}: {err}") from None
    if resolve_device(cfg.device).type == "cuda" and cfg.num_processes > torch.cuda.device_count():
        raise ValueError(f"{label}: train.num_processes={cfg.num_processes} but {torch.cuda.device_count()} GPU(s) "
                         "are visible; use one process per GPU (or device='cpu')")
    if on_step is not None:
        raise ValueError(f"{label}: on_step callbacks are not supported with train.num_processes > 1")
    if distributed.launched() and int(os.environ["WORLD_SIZE"]) == cfg.world_size:
        return _train_worker(*args, kwargs)
    return distributed.launch(_train_worker, (*args, kwargs), cfg, run_id=label, stop_file=stop_file(work_dir))


def stop_file(work_dir: Path) -> Path:
    """Created by the launching process when it gets a stop signal; the workers stop at the next step boundary."""
    return Path(work_dir) / ".stop"


def _train_worker(objective: Objective, train_windows: TokenWindows, val_windows: dict[str, TokenWindows],
                  cfg: TrainConfig, work_dir: Path, kwargs: dict) -> dict:
    """One process of a distributed run: join the group, train, leave it. Only rank 0 logs progress."""
    interrupt.die_with_parent()  # the launching process is gone: nobody waits for this rank any more
    interrupt.install_handlers()
    owns_group = not torch.distributed.is_initialized()  # a torchrun script may have made it already
    device = resolve_device(cfg.device)
    ranks = distributed.init_process_group(device.type)
    distributed.configure_worker(ranks, device)
    try:
        return _train(objective, train_windows, val_windows, cfg, work_dir, **kwargs, ranks=ranks)
    finally:
        if owns_group:
            torch.distributed.destroy_process_group()


def _train(objective: Objective, train_windows: TokenWindows, val_windows: dict[str, TokenWindows],
           cfg: TrainConfig, work_dir: Path, *, vocab_size: int, label: str,
           lookups: dict[str, np.ndarray] | None = None, upstream_models: dict[str, nn.Module] | None = None,
           probe: ProbeSet | None = None, meta: dict | None = None,
           on_step: Callable[[int], None] | None = None, init_from: nn.Module | None = None,
           ranks: distributed.Ranks | None = None) -> dict:
    started = time.perf_counter()
    device = resolve_device(cfg.device)
    if ranks is not None:
        device = distributed.device_for(ranks, device)
    writer = ranks is None or ranks.is_writer
    schedule = BatchSchedule.of(cfg, train_windows.seq_len)
    evaluator = Evaluator(val_windows, probe, cfg.eval_every_steps, cfg.eval_max_windows, cfg.micro_batch_size,
                          device, label)
    checkpointer = Checkpointer(work_dir, cfg.checkpoint_every_steps, label, ranks)
    objective.attach({role: m.to(device).eval() for role, m in (upstream_models or {}).items()})
    model = objective.build_model(vocab_size, train_windows.seq_len, seeded_generator(cfg.seed)).to(device)
    if init_from is not None:
        fresh = [name for name, source in init_from_base(model, init_from).items() if source is None]
        log.info("%s: initialised from the base model (fresh: %s)", label, ", ".join(fresh) or "none")
    num_params = sum(p.numel() for p in model.parameters())
    if ranks is not None:
        distributed.wrap(model, cfg.parallelism, device)
    optimizer = build_optimizer(model, cfg, device)
    state = RunState(schedule.as_list())
    if checkpointer.restore(state, model, optimizer):
        objective.load_state_dict(state.objective)
    if cfg.compile and device.type == "cuda":
        compile_blocks(model)
    order = WindowOrder(len(train_windows), cfg.seed, **state.order)
    plain = _PlainCopy(objective, vocab_size, train_windows.seq_len, device, ranks)
    log.info("%s: %s params, %d steps x %d tokens (%d micro-batches of %d windows) on %s%s", label,
             f"{num_params:,}", schedule.total_steps, schedule.step_tokens, schedule.accum_steps,
             cfg.micro_batch_size, device,
             "" if ranks is None else f", {ranks.world_size} processes ({cfg.parallelism})")
    model.train()
    if state.step == 0 and not state.metrics:  # the untrained model: the first point of every curve
        plain.evaluate(evaluator, model, state)
    loss, start_step = float("nan"), state.step
    interval_seconds, interval_steps = 0.0, 0
    while state.step < schedule.total_steps:
        step, lr = state.step, lr_at(state.step, cfg, schedule.total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        tick = time.perf_counter()
        loss, metrics, grad_norm = train_step(objective, model, optimizer, order, train_windows, cfg, schedule,
                                              device, lookups, label, step, ranks)
        seconds = time.perf_counter() - tick
        state.step, state.tokens_seen = step + 1, (step + 1) * schedule.step_tokens
        state.order, state.train_seconds = order.state(), state.train_seconds + seconds
        state.objective = objective.state_dict()
        interval_seconds, interval_steps = interval_seconds + seconds, interval_steps + 1
        for name, value in [("train/loss", loss), ("train/lr", lr), ("train/grad_norm", grad_norm)]:
            state.log(name, value)
        for name, value in metrics.items():
            state.log(f"train/{name}", value)
        if state.step % cfg.log_every_steps == 0 or state.step == schedule.total_steps:
            tokens_per_s = interval_steps * schedule.step_tokens / max(interval_seconds, 1e-9)
            eta = (schedule.total_steps - state.step) * interval_seconds / interval_steps
            state.log("train/tokens_per_s", tokens_per_s)
            log.info("%s step %d/%d | loss %.3f | tok/s %s | lr %.1e | eta %s", label, state.step,
                     schedule.total_steps, loss, f"{tokens_per_s:,.0f}", lr, format_duration(eta))
            interval_seconds, interval_steps = 0.0, 0
        if evaluator.due(state.step, schedule.total_steps):
            plain.evaluate(evaluator, model, state)
        checkpointer.maybe_save(state, model, optimizer, schedule.total_steps)
        if on_step is not None:
            on_step(state.step)
        stop = (interrupt.requested() if ranks is None
                else distributed.stop_requested(ranks, stop_file(work_dir)))
        if stop and state.step < schedule.total_steps:
            checkpointer.save(state, model, optimizer)
            interrupt.STOP.set()  # every rank stops here, also those that got no signal themselves
            interrupt.check(f"{label} saved a checkpoint at step {state.step}/{schedule.total_steps}; run the same "
                            "command again to resume from it")
    final = plain.of(model)
    if ranks is not None:
        objective.load_state_dict(ranks.sum_state(objective.state_dict()))
    if writer:
        checkpoints.save_model(work_dir, final, meta or {})
        _write_tables(work_dir, state)
        objective.write_tables(work_dir, train_windows.split)
        checkpointer.clear()
    val_losses = evaluator.last
    summary = {
        "steps": state.step, "tokens_seen": state.tokens_seen, "train_loss": loss, "val_loss": val_losses,
        "tokens_per_s": state.tokens_seen / max(state.train_seconds, 1e-9),
        "train_seconds": round(state.train_seconds, 3), "wall_seconds": round(time.perf_counter() - started, 3),
        "num_params": num_params, "resumed_from_step": start_step,
    }
    log.info("%s done: %d steps, %d tokens, train loss %.4f, %s", label, summary["steps"], summary["tokens_seen"],
             loss, ", ".join(f"val/{s} {v:.4f}" for s, v in val_losses.items()))
    return summary


class _PlainCopy:
    """The trained model as a plain module: the model itself in one process; with several, rank 0's unsharded
    copy of the full weights (gathered from every rank), used for evaluation and the saved model."""

    def __init__(self, objective: Objective, vocab_size: int, seq_len: int, device: torch.device,
                 ranks: distributed.Ranks | None):
        self.ranks = ranks
        self.copy = (objective.build_model(vocab_size, seq_len).to(device)
                     if ranks is not None and ranks.is_writer else None)

    def of(self, model: nn.Module) -> nn.Module | None:
        """The plain model (None on ranks other than 0); every rank must call this together."""
        if self.ranks is None:
            return model
        full = checkpoints.full_model_state(model)
        if self.copy is not None:
            self.copy.load_state_dict(full)
        return self.copy

    def evaluate(self, evaluator: Evaluator, model: nn.Module, state: RunState) -> None:
        """Evaluate on rank 0 (the others go on to the next step's collectives and wait there)."""
        plain = self.of(model)
        if plain is not None:
            evaluator(plain, state)
