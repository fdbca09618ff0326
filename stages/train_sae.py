"""Stage train_sae: a TopK sparse autoencoder on the reference model's residual stream (CoCoMix's concept source).

Reads the tokenize_corpus artifact (split `train` for activations, `val` to evaluate) and the train_reference
model. Activations stream from the reference in batches of whole windows (bounded memory): the residual after
block `sae.layer`, layer-normalised per token (stages/models/sae.py). Recipe: tied init, unit-norm decoder rows
with the parallel gradient component removed, pre-bias at the geometric median of the first batch, Adam,
AuxK over dead latents.
Resumable like the train loop: with every evaluation (every `sae.eval_every_steps`, not after the last step) and
on a stop signal (after the current step) a checkpoint is written into the build dir (SAE weights, Adam state,
the dead-latent counters, the data-order position, metrics so far, RNG states; storage/checkpoints.py). A
re-run after a stop, a failure or `kill -9` resumes from the newest one and trains on bit-for-bit (same
device and thread count) as if it had never stopped; the checkpoints are deleted once the SAE is saved.
Files written into the artifact directory:
    sae.safetensors, sae.json   the SAE (sae.json: d_model, num_latents, k, layer, reference key)
    metrics.parquet             schemas.tables.METRICS: train/fvu, train/l0, train/aux_loss, train/dead_fraction,
                                train/rows_per_s, eval/fvu, eval/l0, eval/dead_fraction, eval/clean_loss,
                                eval/spliced_loss, eval/spliced_loss_increase (reference next-token loss with
                                the reconstruction in place of the activation, minus the clean loss)
"""

import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from schemas.configs import SAEConfig
from schemas.manifest import Manifest
from schemas.tables import METRICS
from stages.models.gpt import GPT
from stages.models.init_rng import seeded_generator
from stages.models.sae import DeadLatentTracker, TopKSAE, layer_norm_stats
from stages.models.sae_layouts import load_pretrained_sae, read_sae_folder
from stages.models.saved import load_model, save_sae
from stages.registry import NodeDecl, Stage
from stages.runtime import interrupt
from stages.runtime.devices import resolve_device
from stages.runtime.progress import format_duration
from stages.seeded_upstream import with_seeded
from stages.training import sae_parallel
from stages.training.data import WindowOrder
from stages.training.rng import rng_state, set_rng_state
from storage import checkpoints
from storage.catalog import TableSpec
from storage.parquet import write_table
from storage.windows import TokenWindows, spread_window_ids

log = logging.getLogger(__name__)

WARMUP_STEPS = 20


def sae_layer(cfg: SAEConfig, num_layers: int) -> int:
    """The reference block whose output the SAE reads (default: num_layers // 2 - 1, the middle)."""
    return cfg.layer if cfg.layer is not None else max(0, num_layers // 2 - 1)


@torch.no_grad()
def evaluate_sae(sae: TopKSAE, model: GPT, windows: TokenWindows, window_ids: np.ndarray, layer: int,
                 device: torch.device, batch_size: int = 16,
                 tracker: DeadLatentTracker | None = None) -> dict[str, float]:
    """FVU, L0, clean and spliced-in reference loss over the given windows (`tracker`: also counts which latents
    fire)."""
    sq_err = sq_dev = l0 = clean = spliced = 0.0
    rows = 0
    for start in range(0, len(window_ids), batch_size):
        inputs_BT, targets_BT = windows.batch(window_ids[start:start + batch_size], device)
        h_BTD = model.residual_after(inputs_BT, layer)
        xn_BTD, mu_BT1, std_BT1 = sae.normalize(h_BTD)
        out = sae(xn_BTD.flatten(0, 1))
        if tracker is not None:
            tracker.update(out.idx_NK, out.vals_NK)
        xn_ND = xn_BTD.flatten(0, 1)
        sq_err += float((out.xhat_ND - xn_ND).pow(2).sum())
        sq_dev += float((xn_ND - xn_ND.mean(0)).pow(2).sum())
        l0 += float((out.vals_NK > 0).sum())
        n = xn_ND.shape[0]
        rows += n
        clean += float(model.loss_from(h_BTD, layer, targets_BT)) * n
        recon_BTD = out.xhat_ND.view_as(h_BTD) * std_BT1 + mu_BT1
        spliced += float(model.loss_from(recon_BTD, layer, targets_BT)) * n
    clean, spliced = clean / rows, spliced / rows
    return {"fvu": sq_err / max(sq_dev, 1e-12), "l0": l0 / rows, "clean_loss": clean, "spliced_loss": spliced,
            "spliced_loss_increase": spliced - clean}


class _Progress:
    """What a checkpoint holds besides the SAE, its optimizer and the dead-latent counters: the step, rows seen,
    metric rows so far and the data order's position; saved into and restored from `out`'s checkpoints folder."""

    def __init__(self, out: Path, total_steps: int):
        self.directory, self.total_steps = checkpoints.checkpoint_dir(out), total_steps
        self.step = self.rows_seen = 0
        self.metrics: list[tuple] = []
        self.order = {"epoch": 0, "position": 0}

    def save(self, sae: TopKSAE, optimizer: torch.optim.Optimizer, tracker: DeadLatentTracker) -> None:
        """Checkpoint after the current step."""
        model_sd, optim_sd = checkpoints.training_state(sae, optimizer)
        state = {"step": self.step, "total_steps": self.total_steps, "rows_seen": self.rows_seen,
                 "metrics": list(self.metrics), "order": dict(self.order), "tracker": tracker.state_dict(),
                 "rng": rng_state()}
        checkpoints.save_checkpoint(self.directory, self.step, state, {"model": model_sd, "optimizer": optim_sd})

    def restore(self, sae: TopKSAE, optimizer: torch.optim.Optimizer, tracker: DeadLatentTracker) -> None:
        """Load the newest checkpoint, if there is one, into this, the SAE, its optimizer, the tracker and RNGs."""
        path = checkpoints.latest_checkpoint(self.directory)
        if path is None:
            return
        model_sd, optim_sd = checkpoints.training_state(sae, optimizer)
        try:
            saved = checkpoints.load_checkpoint(path, {"model": model_sd, "optimizer": optim_sd})
            if saved["total_steps"] != self.total_steps:
                raise ValueError(f"it was written for {saved['total_steps']} steps, not {self.total_steps}")
            tracker.load_state_dict(saved["tracker"])
        except (ValueError, KeyError, RuntimeError) as err:
            raise ValueError(f"train_sae: cannot resume from {path}: {err}; delete {self.directory} to start "
                             "over") from None
        checkpoints.set_training_state(sae, optimizer, model_sd, optim_sd)
        set_rng_state(saved["rng"])
        self.step, self.rows_seen, self.metrics = saved["step"], saved["rows_seen"], list(saved["metrics"])
        self.order = dict(saved["order"])
        log.info("train_sae: resuming from %s (step %d/%d)", path, self.step, self.total_steps)


def run(cfg: SAEConfig, inputs: dict[str, Manifest], out: Path) -> dict:
    """Train the SAE on the reference's residual stream over `train` (resuming from the checkpoints in `out`), on
    sae.num_processes processes (stages/training/sae_parallel.py); returns its final metrics. With sae.init_from,
    imports that SAE instead (one process: there is nothing to train)."""
    if cfg.init_from is not None:
        return import_sae(cfg, inputs, Path(out))
    return sae_parallel.run(_train, cfg, inputs, Path(out))


def _train(cfg: SAEConfig, inputs: dict[str, Manifest], out: Path, hooks: sae_parallel.OneProcess) -> dict:
    """The training loop of one process; `hooks` share each step with the other processes (if any)."""
    tokens, reference = inputs["tokens"], inputs["reference"]
    out, device = Path(out), resolve_device(cfg.device)
    model = load_model(Path(reference.path), device).requires_grad_(False)
    layer = sae_layer(cfg, model.cfg.num_layers)
    if layer > model.num_trunk_layers:
        raise ValueError(f"sae.layer={layer} is outside the reference's blocks 0..{model.num_trunk_layers}")
    num_latents, k = cfg.shape(model.cfg.d_model)
    train_windows, val_windows = (TokenWindows.from_manifest(tokens, s) for s in ("train", "val"))
    windows_per_step = max(1, cfg.batch_rows // train_windows.seq_len)
    total_steps = math.ceil(cfg.max_tokens / (windows_per_step * train_windows.seq_len))
    sae = TopKSAE(model.cfg.d_model, num_latents, k, generator=seeded_generator(cfg.seed)).to(device)
    optimizer = torch.optim.Adam(sae.parameters(), lr=cfg.lr, eps=6.25e-10)
    tracker = DeadLatentTracker(num_latents, device)
    progress = _Progress(out, total_steps)
    progress.restore(sae, optimizer, tracker)
    order = WindowOrder(len(train_windows), cfg.seed, **progress.order)
    eval_ids = spread_window_ids(len(val_windows), cfg.eval_windows)
    aux_k = cfg.aux_k or max(1, model.cfg.d_model // 2)
    log.info("train_sae: %d latents, k=%d, layer %d, %d steps x %d rows on %s", num_latents, k, layer,
             total_steps, windows_per_step * train_windows.seq_len, device)
    metrics, start_step, start_rows = progress.metrics, progress.step, progress.rows_seen
    rows_seen, started, interval, interval_rows = start_rows, time.perf_counter(), time.perf_counter(), start_rows
    final = {}
    for step in range(start_step + 1, total_steps + 1):
        inputs_BT, _ = train_windows.batch(hooks.share(order.take(windows_per_step)), device)
        with torch.no_grad():
            xn_ND, _, _ = layer_norm_stats(model.residual_after(inputs_BT, layer).flatten(0, 1))
        if step == 1:
            sae.init_pre_bias_(hooks.gather_rows(xn_ND))
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * min(1.0, step / WARMUP_STEPS)
        dead_L = tracker.dead_mask(cfg.dead_tokens)
        out_sae = sae(xn_ND)
        loss, stats = hooks.loss(sae, xn_ND, dead_L, aux_k, cfg.aux_coef, out_sae)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        hooks.sync_grads(sae)
        sae.remove_parallel_grad_()
        optimizer.step()
        sae.normalize_decoder_()
        hooks.track(tracker, out_sae, xn_ND.shape[0])
        rows_seen += hooks.rows(xn_ND.shape[0])
        for name, value in stats.items():
            metrics.append((step, rows_seen, f"train/{name}", float(value)))
        if step % 10 == 0 or step == total_steps:
            rows_per_s = (rows_seen - interval_rows) / max(time.perf_counter() - interval, 1e-9)
            interval, interval_rows = time.perf_counter(), rows_seen
            metrics.append((step, rows_seen, "train/rows_per_s", rows_per_s))
            eta = (total_steps - step) * (time.perf_counter() - started) / (step - start_step)
            log.info("train_sae step %d/%d | fvu %.3f | l0 %.1f | dead %.1f%% | rows/s %s | eta %s", step, total_steps,
                     float(stats["fvu"]), float(stats["l0"]), 100 * float(stats["dead_fraction"]),
                     f"{rows_per_s:,.0f}", format_duration(eta))
        evaluated = step % cfg.eval_every_steps == 0
        if hooks.is_writer and (evaluated or step == total_steps):
            final = evaluate_sae(sae, model, val_windows, eval_ids, layer, device)
            final["dead_fraction"] = float(tracker.dead_mask(cfg.dead_tokens).float().mean())
            metrics += [(step, rows_seen, f"eval/{name}", value) for name, value in final.items()]
            log.info("train_sae eval step %d | %s", step, " | ".join(f"{n} {v:.4f}" for n, v in final.items()))
        stop = hooks.stop_requested()
        if step < total_steps and (evaluated or stop):
            progress.step, progress.rows_seen, progress.order = step, rows_seen, order.state()
            if hooks.is_writer:
                progress.save(sae, optimizer, tracker)
            hooks.barrier()
        if stop and step < total_steps:
            raise interrupt.Interrupted(f"stopped by a signal: train_sae saved a checkpoint at step {step}/"
                                        f"{total_steps}; run the same command again to resume from it")
    if hooks.is_writer:
        save_sae(out, sae, {"layer": layer, "reference_key": reference.key})
        write_table(out / "metrics.parquet", {"step": [m[0] for m in metrics], "tokens_seen": [m[1] for m in metrics],
                                              "name": [m[2] for m in metrics], "value": [m[3] for m in metrics]},
                    METRICS)
        checkpoints.remove_checkpoints(progress.directory)
    rows_per_s = (rows_seen - start_rows) / max(time.perf_counter() - started, 1e-9)
    return {"num_latents": num_latents, "k": k, "layer": layer, "rows": rows_seen, **final,
            "rows_per_s": round(rows_per_s, 1), "resumed_from_step": start_step}


def import_sae(cfg: SAEConfig, inputs: dict[str, Manifest], out: Path) -> dict:
    """The pretrained SAE of cfg.init_from (stages/models/sae_layouts.py) instead of a trained one: its FVU, L0,
    dead fraction (latents that never fire on the evaluation windows) and spliced-in loss on this corpus's `val`,
    as metrics at step 0; saved like a trained SAE."""
    device = resolve_device(cfg.device)
    model = load_model(Path(inputs["reference"].path), device).requires_grad_(False)
    sae = load_pretrained_sae(cfg.init_from, cfg.k, layer_norm_model=getattr(model, "layer_norm_blocks", False))
    layer = read_sae_folder(cfg.init_from).layer
    windows = TokenWindows.from_manifest(inputs["tokens"], "val")
    tracker = DeadLatentTracker(sae.num_latents, device)
    sae = sae.to(device)
    eval_ids = spread_window_ids(len(windows), cfg.eval_windows)
    final = evaluate_sae(sae, model, windows, eval_ids, layer, device, tracker=tracker)
    final["dead_fraction"] = float(tracker.dead_mask(len(eval_ids) * windows.seq_len - 1).float().mean())
    log.info("train_sae: imported %s (layer %d, %d latents, k=%d) | %s", cfg.init_from, layer, sae.num_latents,
             sae.k, " | ".join(f"{n} {v:.4f}" for n, v in final.items()))
    save_sae(out, sae, {"layer": layer, "reference_key": inputs["reference"].key, "init_from": cfg.init_from})
    names = list(final)
    write_table(out / "metrics.parquet", {"step": [0] * len(names), "tokens_seen": [0] * len(names),
                                          "name": [f"eval/{n}" for n in names],
                                          "value": [final[n] for n in names]}, METRICS)
    return {"num_latents": sae.num_latents, "k": sae.k, "layer": layer, "rows": 0, **final, "imported": True}


STAGE = Stage(
    name="train_sae", code_version="3", config_type=SAEConfig,
    nodes=lambda cfg: with_seeded([NodeDecl("train_sae", cfg.sae, {"tokens": "tokenize_corpus",
                                                                   "reference": "train_teacher"})], cfg),
    run=run,
    tables={"sae_metrics": TableSpec("train_sae", "metrics.parquet")},
    on_demand=True,
    description="TopK sparse autoencoder on the reference's residual stream",
)
