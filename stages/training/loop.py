"""The one train loop, objective-agnostic: it knows only the Objective protocol (stages/objectives/base.py).

`train(run)` takes a TrainRun (run.py: objective, data, config, work_dir, upstream inputs); each process builds
a Trainer from it (model, optimizer, data order, device, ranks) and repeats Trainer.step.
Files written into `run.work_dir`:
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
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from schemas.tables import METRICS, PROBE_LOSSES
from stages.models.hf_import import load_llama_weights
from stages.models.init_rng import seeded_generator
from stages.runtime import interrupt
from stages.runtime.devices import resolve_device
from stages.runtime.progress import format_duration
from stages.training import distributed
from stages.training.cadence import Checkpointer, Evaluator
from stages.training.data import WindowOrder
from stages.training.init_weights import init_from_base
from stages.training.optim import BatchSchedule, build_optimizer, lr_at
from stages.training.run import ProbeSet, Trainer, TrainRun
from stages.training.state import RunState
from storage import checkpoints
from storage.parquet import write_table

log = logging.getLogger(__name__)

__all__ = ["ProbeSet", "TrainRun", "Trainer", "train", "compile_blocks"]


def compile_blocks(model: nn.Module) -> None:
    """torch.compile every repeated block in place (so every model method, e.g. forward_heads, is compiled)."""
    for module in list(model.modules()):
        if isinstance(module, nn.ModuleList):
            for block in module:
                block.compile()


def write_run_tables(work_dir: Path, state: RunState) -> None:
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


def train(run: TrainRun, on_step: Callable[[int], None] | None = None) -> dict:
    """Train run.objective's model to the token budget (resuming from run.work_dir's checkpoints); returns a
    summary. `on_step(step)` is called after every step (one process only).

    With cfg.world_size > 1 the run happens in that many processes (stages/training/distributed.py): launched
    here, or joined when this process is already a worker of a launch of that size."""
    cfg, label = run.cfg, run.label
    if cfg.world_size == 1:
        return _train(run, on_step)
    try:  # a step that the processes cannot share fails here, before any of them starts
        BatchSchedule.of(cfg, run.train_windows.seq_len)
    except ValueError as err:
        raise ValueError(f"{label}: {err}") from None
    if resolve_device(cfg.device).type == "cuda" and cfg.num_processes > torch.cuda.device_count():
        raise ValueError(f"{label}: train.num_processes={cfg.num_processes} but {torch.cuda.device_count()} GPU(s) "
                         "are visible; use one process per GPU (or device='cpu')")
    if on_step is not None:
        raise ValueError(f"{label}: on_step callbacks are not supported with train.num_processes > 1")
    if distributed.launched() and int(os.environ["WORLD_SIZE"]) == cfg.world_size:
        return _train_worker(run)
    return distributed.launch(_train_worker, (run,), cfg, run_id=label, stop_file=stop_file(run.work_dir))


def stop_file(work_dir: Path) -> Path:
    """Created by the launching process when it gets a stop signal; the workers stop at the next step boundary."""
    return Path(work_dir) / ".stop"


def _train_worker(run: TrainRun) -> dict:
    """One process of a distributed run: join the group, train, leave it. Only rank 0 logs progress."""
    with distributed.worker_group(run.cfg.device) as ranks:
        return _train(run, ranks=ranks)


def _start(run: TrainRun, device: torch.device, ranks: distributed.Ranks | None, checkpointer: Checkpointer,
           state: RunState) -> tuple[Trainer, int]:
    """This process's trainer and the model's parameter count: the model (fresh from the seed, or from the base
    model), wrapped when distributed, its optimizer, and the data order, all restored from the newest checkpoint
    (into `state`) when there is one."""
    cfg, label, objective = run.cfg, run.label, run.objective
    objective.attach({role: m.to(device).eval() for role, m in run.upstream_models.items()})
    model = objective.build_model(run.vocab_size, run.train_windows.seq_len, seeded_generator(cfg.seed)).to(device)
    if run.init_from is not None:
        fresh = [name for name, source in init_from_base(model, run.init_from).items() if source is None]
        log.info("%s: initialised from the base model (fresh: %s)", label, ", ".join(fresh) or "none")
    if run.checkpoint is not None:
        load_llama_weights(model, run.checkpoint)
        log.info("%s: initialised from the checkpoint %s", label, run.checkpoint)
    num_params = sum(p.numel() for p in model.parameters())  # before sharding
    if ranks is not None:
        distributed.wrap(model, cfg.parallelism, device)
    optimizer = build_optimizer(model, cfg, device)
    if checkpointer.restore(state, model, optimizer):
        objective.load_state_dict(state.objective)
    if cfg.compile and device.type == "cuda":
        compile_blocks(model)
    order = WindowOrder(len(run.train_windows), cfg.seed, **state.order)
    schedule = BatchSchedule.of(cfg, run.train_windows.seq_len)
    return Trainer(run, model, optimizer, order, schedule, device, ranks), num_params


def _train(run: TrainRun, on_step: Callable[[int], None] | None = None,
           ranks: distributed.Ranks | None = None) -> dict:
    started = time.perf_counter()
    cfg, label, objective = run.cfg, run.label, run.objective
    device = resolve_device(cfg.device)
    if ranks is not None:
        device = distributed.device_for(ranks, device)
    writer = ranks is None or ranks.is_writer
    schedule = BatchSchedule.of(cfg, run.train_windows.seq_len)
    evaluator, checkpointer = Evaluator(run, device), Checkpointer(run, ranks)
    state = RunState(schedule.as_list())
    trainer, num_params = _start(run, device, ranks, checkpointer, state)
    model, optimizer = trainer.model, trainer.optimizer
    plain = _PlainCopy(trainer)
    log.info("%s: %s params, %d steps x %d tokens (%d micro-batches of %d windows) on %s%s", label,
             f"{num_params:,}", schedule.total_steps, schedule.step_tokens, schedule.accum_steps,
             cfg.micro_batch_size, device,
             "" if ranks is None else f", {ranks.world_size} processes ({cfg.parallelism})")
    model.train()
    if state.step == 0 and not state.metrics:  # the untrained model: the first point of every curve
        plain.evaluate(evaluator, state)
    loss, start_step = float("nan"), state.step
    interval_seconds, interval_steps = 0.0, 0
    while state.step < schedule.total_steps:
        step, lr = state.step, lr_at(state.step, cfg, schedule.total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        tick = time.perf_counter()
        loss, metrics, grad_norm = trainer.step(step)
        seconds = time.perf_counter() - tick
        state.step, state.tokens_seen = step + 1, (step + 1) * schedule.step_tokens
        state.order, state.train_seconds = trainer.order.state(), state.train_seconds + seconds
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
            plain.evaluate(evaluator, state)
        checkpointer.maybe_save(state, model, optimizer, schedule.total_steps)
        if on_step is not None:
            on_step(state.step)
        stop = (interrupt.requested() if ranks is None
                else distributed.stop_requested(ranks, stop_file(run.work_dir)))
        if stop and state.step < schedule.total_steps:
            checkpointer.save(state, model, optimizer)
            if ranks is not None:
                # every rank stops here, also those that got no signal themselves; one process leaves the flag
                # alone: a stop file stops only its own run's task runs, not others sharing this process
                interrupt.STOP.set()
            interrupt.check(f"{label} saved a checkpoint at step {state.step}/{schedule.total_steps}; run the same "
                            "command again to resume from it")
    final = plain.of(model)
    if ranks is not None:
        objective.load_state_dict(ranks.sum_state(objective.state_dict()))
    if writer:
        checkpoints.save_model(run.work_dir, final, run.meta)
        write_run_tables(run.work_dir, state)
        objective.write_tables(run.work_dir, run.train_windows.split)
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

    def __init__(self, trainer: Trainer):
        run, self.model, self.ranks = trainer.run, trainer.model, trainer.ranks
        self.copy = (run.objective.build_model(run.vocab_size, run.train_windows.seq_len).to(trainer.device)
                     if self.ranks is not None and self.ranks.is_writer else None)

    def of(self, model: nn.Module) -> nn.Module | None:
        """The plain model (None on ranks other than 0); every rank must call this together."""
        if self.ranks is None:
            return model
        full = checkpoints.full_model_state(model)
        if self.copy is not None:
            self.copy.load_state_dict(full)
        return self.copy

    def evaluate(self, evaluator: Evaluator, state: RunState) -> None:
        """Evaluate on rank 0 (the others go on to the next step's collectives and wait there)."""
        plain = self.of(self.model)
        if plain is not None:
            evaluator(plain, state)
