"""The one train loop, objective-agnostic: it knows only the Objective protocol (stages/objectives/base.py).

Files written into `work_dir`:
    model.safetensors, model.json   the final model (storage/checkpoints.save_model)
    metrics.parquet                 schemas.tables.METRICS: train/loss, train/lr, train/grad_norm,
                                    train/tokens_per_s, train/<objective metric>, val/<split>/loss, val/<split>/ppl
    probe_losses.parquet            schemas.tables.PROBE_LOSSES, only when a probe set is given
    token_selection.parquet         schemas.tables.TOKEN_SELECTION, when the objective selects tokens
    checkpoints/step-<6 digits>.pt  while running (the newest two); deleted once the model is saved
A run that finds checkpoints in `work_dir` resumes from the newest one and continues bit-for-bit (CPU) as if
it had never stopped: model, optimizer, step, data-order position, RNG states and metrics so far are restored.
The model must return next-token logits (B, T, V) from `model(inputs_BT)`; evaluation uses that.
"""

import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from schemas.configs import TrainConfig
from schemas.tables import METRICS, PROBE_LOSSES, TOKEN_SELECTION
from stages.objectives.base import Objective
from stages.training_utils import (
    WindowOrder,
    autocast,
    build_optimizer,
    format_duration,
    lr_at,
    make_batch,
    resolve_device,
    rng_state,
    set_rng_state,
    token_losses,
)
from storage import checkpoints
from storage.parquet import write_table
from storage.windows import TokenWindows

log = logging.getLogger(__name__)

ScoreLookup = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
"""token_index_BT (int64) -> (ref_loss_BT, ref_entropy_BT) float32 arrays for the training split."""


@dataclass(frozen=True)
class ProbeSet:
    """Fixed validation windows whose per-token losses are recorded at every evaluation."""

    split: str
    window_ids: np.ndarray


@dataclass(frozen=True)
class Plan:
    """Step arithmetic of a run, derived from the config and the window length."""

    total_steps: int
    accum_steps: int
    step_tokens: int

    @classmethod
    def of(cls, cfg: TrainConfig, seq_len: int) -> "Plan":
        """steps = ceil(max_tokens / batch_size_tokens); accumulation = batch / (micro_batch * seq_len)."""
        micro_tokens = cfg.micro_batch_size * seq_len
        if cfg.batch_size_tokens % micro_tokens:
            raise ValueError(f"train.batch_size_tokens ({cfg.batch_size_tokens}) must be a multiple of "
                             f"micro_batch_size * seq_len = {micro_tokens}")
        return cls(math.ceil(cfg.max_tokens / cfg.batch_size_tokens), cfg.batch_size_tokens // micro_tokens,
                   cfg.batch_size_tokens)


def compile_blocks(model: nn.Module) -> None:
    """torch.compile every repeated block in place (so every model method, e.g. forward_heads, is compiled)."""
    for module in list(model.modules()):
        if isinstance(module, nn.ModuleList):
            for block in module:
                block.compile()


def _count_selection(counts: dict, token_index_BT: torch.Tensor, selected_BT: torch.Tensor, num_tokens: int) -> None:
    """Add one to times_seen of every target and to times_selected of the selected ones (CPU int32 counters)."""
    if not counts:
        counts |= {"seen": torch.zeros(num_tokens, dtype=torch.int32),
                   "selected": torch.zeros(num_tokens, dtype=torch.int32)}
    index_N = token_index_BT.flatten().cpu()
    counts["seen"].index_add_(0, index_N, torch.ones_like(index_N, dtype=torch.int32))
    counts["selected"].index_add_(0, index_N, selected_BT.flatten().cpu().to(torch.int32))


def train_step(objective: Objective, model: nn.Module, optimizer, order: WindowOrder, windows: TokenWindows,
                cfg: TrainConfig, plan: Plan, device: torch.device, score_lookup, label: str, step: int,
                state_counts: dict):
    """One optimizer step over accum_steps micro-batches; returns (mean loss, mean metrics, grad norm).

    When the objective selects tokens, `state_counts` accumulates per-token seen/selected counts."""
    optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=device)
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for _ in range(plan.accum_steps):
        batch = make_batch(windows, order.take(cfg.micro_batch_size), device, score_lookup)
        with autocast(device):
            out = objective.loss(model, batch)
        (out.loss / plan.accum_steps).backward()
        if out.selected_BT is not None:
            _count_selection(state_counts, batch.token_index_BT, out.selected_BT, windows.num_tokens)
        loss_sum += out.loss.detach().float()
        for name, value in out.metrics.items():
            sums[name] = sums.get(name, 0.0) + value
            counts[name] = counts.get(name, 0) + 1
    loss = loss_sum.item() / plan.accum_steps
    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf")))
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise RuntimeError(
            f"{label}: non-finite training loss {loss} (grad norm {grad_norm}) at step {step + 1}. Try a lower "
            f"train.lr (now {cfg.lr}), more train.warmup_steps or train.grad_clip; the last good checkpoint "
            f"is kept and no checkpoint was written for this step")
    optimizer.step()
    return loss, {name: sums[name] / counts[name] for name in sums}, grad_norm


def _evaluate(model: nn.Module, val_windows: dict[str, TokenWindows], probe: ProbeSet | None, cfg: TrainConfig,
              device: torch.device, state: dict, label: str) -> dict[str, float]:
    """Mean loss on every val split (and probe per-token losses); appends rows to state; returns losses."""
    step, tokens = state["step"], state["tokens_seen"]
    losses = {}
    for split, windows in val_windows.items():
        loss_NT = token_losses(model, windows, np.arange(min(cfg.eval_max_windows, len(windows))),
                               cfg.micro_batch_size, device)
        losses[split] = float(loss_NT.astype(np.float64).mean())
        state["metrics"] += [(step, tokens, f"val/{split}/loss", losses[split]),
                             (step, tokens, f"val/{split}/ppl", math.exp(min(losses[split], 700.0)))]
    if probe is not None:
        windows = val_windows[probe.split]
        loss_NT = token_losses(model, windows, probe.window_ids, cfg.micro_batch_size, device)
        state["probe"].append({"step": step, "tokens_seen": tokens, "split": probe.split,
                               "token_index": torch.from_numpy(windows.target_index(probe.window_ids).ravel()),
                               "loss": torch.from_numpy(loss_NT.ravel())})
    log.info("%s eval step %d | %s", label, step, " | ".join(f"{s} {v:.4f}" for s, v in losses.items()))
    return losses


def _write_tables(work_dir: Path, state: dict, split: str) -> None:
    """metrics.parquet, plus probe_losses.parquet / token_selection.parquet when recorded."""
    rows = state["metrics"]
    write_table(work_dir / "metrics.parquet", {
        "step": [r[0] for r in rows], "tokens_seen": [r[1] for r in rows],
        "name": [r[2] for r in rows], "value": [float(r[3]) for r in rows],
    }, METRICS)
    if state["probe"]:
        probe = state["probe"]
        sizes = [len(p["loss"]) for p in probe]
        write_table(work_dir / "probe_losses.parquet", {
            "step": np.repeat([p["step"] for p in probe], sizes),
            "tokens_seen": np.repeat([p["tokens_seen"] for p in probe], sizes),
            "split": [p["split"] for p, n in zip(probe, sizes, strict=True) for _ in range(n)],
            "token_index": torch.cat([p["token_index"] for p in probe]).numpy(),
            "loss": torch.cat([p["loss"] for p in probe]).numpy(),
        }, PROBE_LOSSES)
    if state["selection"]:
        seen_N, selected_N = state["selection"]["seen"].numpy(), state["selection"]["selected"].numpy()
        token_index = np.flatnonzero(seen_N)
        write_table(work_dir / "token_selection.parquet", {
            "split": [split] * len(token_index), "token_index": token_index,
            "times_seen": seen_N[token_index], "times_selected": selected_N[token_index],
        }, TOKEN_SELECTION)


def _restore(ckpt_dir: Path, model: nn.Module, optimizer, fresh: dict, label: str) -> dict:
    """Load the newest checkpoint into model and optimizer, restore RNGs; returns its run state (or `fresh`)."""
    path = checkpoints.latest_checkpoint(ckpt_dir)
    if path is None:
        return fresh
    saved = checkpoints.load_checkpoint(path)  # onto the CPU: RNG states must be CPU tensors, and
    # load_state_dict copies the model and optimizer tensors onto the model's device
    if saved["plan"] != fresh["plan"]:
        raise ValueError(f"{label}: checkpoint {path} was written for plan {saved['plan']}, not {fresh['plan']} "
                         f"(steps, accumulation, batch tokens); delete {ckpt_dir} to start over")
    model.load_state_dict(saved.pop("model"))
    optimizer.load_state_dict(saved.pop("optimizer"))
    set_rng_state(saved.pop("rng"))
    log.info("%s: resuming from %s (step %d/%d)", label, path, saved["step"], fresh["plan"][0])
    return saved


def train(objective: Objective, train_windows: TokenWindows, val_windows: dict[str, TokenWindows],
          cfg: TrainConfig, work_dir: Path, *, vocab_size: int, label: str, score_lookup: ScoreLookup | None = None,
          probe: ProbeSet | None = None, meta: dict | None = None,
          on_step: Callable[[int], None] | None = None) -> dict:
    """Train objective's model to the token budget (resuming from work_dir's checkpoints); returns a summary."""
    started = time.perf_counter()
    work_dir, plan, device = Path(work_dir), Plan.of(cfg, train_windows.seq_len), resolve_device(cfg.device)
    if objective.needs_reference_scores and score_lookup is None:
        raise ValueError(f"{label}: the objective needs reference scores but no score_lookup was given")
    if probe is not None and probe.split not in val_windows:
        raise ValueError(f"{label}: probe split {probe.split!r} is not a validation split ({list(val_windows)})")
    for split in [split for split, windows in val_windows.items() if len(windows) == 0]:
        log.warning("%s: validation split %s has no complete window; it is not evaluated", label, split)
    val_windows = {split: windows for split, windows in val_windows.items() if len(windows)}
    torch.manual_seed(cfg.seed)
    model = objective.build_model(vocab_size, train_windows.seq_len).to(device)
    optimizer = build_optimizer(model, cfg, device)
    state = {"step": 0, "tokens_seen": 0, "order": {"epoch": 0, "position": 0}, "metrics": [], "probe": [],
             "selection": {},
             "train_seconds": 0.0, "plan": [plan.total_steps, plan.accum_steps, plan.step_tokens]}
    ckpt_dir = checkpoints.checkpoint_dir(work_dir)
    state = _restore(ckpt_dir, model, optimizer, state, label)
    if cfg.compile and device.type == "cuda":
        compile_blocks(model)
    order = WindowOrder(len(train_windows), cfg.seed, **state["order"])
    num_params = sum(p.numel() for p in model.parameters())
    log.info("%s: %s params, %d steps x %d tokens (%d micro-batches of %d windows) on %s", label,
             f"{num_params:,}", plan.total_steps, plan.step_tokens, plan.accum_steps, cfg.micro_batch_size, device)
    model.train()
    val_losses, loss, start_step = {}, float("nan"), state["step"]
    interval_seconds, interval_steps = 0.0, 0
    while state["step"] < plan.total_steps:
        step, lr = state["step"], lr_at(state["step"], cfg, plan.total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        tick = time.perf_counter()
        loss, metrics, grad_norm = train_step(objective, model, optimizer, order, train_windows, cfg, plan,
                                               device, score_lookup, label, step, state["selection"])
        seconds = time.perf_counter() - tick
        state["step"], state["tokens_seen"] = step + 1, (step + 1) * plan.step_tokens
        state["order"], state["train_seconds"] = order.state(), state["train_seconds"] + seconds
        interval_seconds, interval_steps = interval_seconds + seconds, interval_steps + 1
        step, tokens = state["step"], state["tokens_seen"]
        state["metrics"] += [(step, tokens, "train/loss", loss), (step, tokens, "train/lr", lr),
                             (step, tokens, "train/grad_norm", grad_norm)]
        state["metrics"] += [(step, tokens, f"train/{name}", value) for name, value in metrics.items()]
        if step % cfg.log_every_steps == 0 or step == plan.total_steps:
            tokens_per_s = interval_steps * plan.step_tokens / max(interval_seconds, 1e-9)
            eta = (plan.total_steps - step) * interval_seconds / interval_steps
            state["metrics"].append((step, tokens, "train/tokens_per_s", tokens_per_s))
            log.info("%s step %d/%d | loss %.3f | tok/s %s | lr %.1e | eta %s", label, step, plan.total_steps,
                     loss, f"{tokens_per_s:,.0f}", lr, format_duration(eta))
            interval_seconds, interval_steps = 0.0, 0
        if step % cfg.eval_every_steps == 0 or step == plan.total_steps:
            val_losses = _evaluate(model, val_windows, probe, cfg, device, state, label)
        if step % cfg.checkpoint_every_steps == 0 and step < plan.total_steps:
            checkpoints.save_checkpoint(ckpt_dir, step, {**state, "model": model.state_dict(),
                                                         "optimizer": optimizer.state_dict(), "rng": rng_state()})
        if on_step is not None:
            on_step(step)
    checkpoints.save_model(work_dir, model, meta or {})
    _write_tables(work_dir, state, train_windows.split)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    summary = {
        "steps": state["step"], "tokens_seen": state["tokens_seen"], "train_loss": loss, "val_loss": val_losses,
        "tokens_per_s": state["tokens_seen"] / max(state["train_seconds"], 1e-9),
        "train_seconds": round(state["train_seconds"], 3), "wall_seconds": round(time.perf_counter() - started, 3),
        "num_params": num_params, "resumed_from_step": start_step,
    }
    log.info("%s done: %d steps, %d tokens, train loss %.4f, %s", label, summary["steps"], summary["tokens_seen"],
             loss, ", ".join(f"val/{s} {v:.4f}" for s, v in val_losses.items()))
    return summary
