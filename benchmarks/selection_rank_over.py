"""Cost of Rho-1 token selection ranked over the whole optimiser step (SelectionConfig.rank_over = "step") against
ranking per micro-batch and against plain next-token training, measured in the same run.

Usage: python benchmarks/selection_rank_over.py [--steps 30] [--warmup 2] [--device auto|cpu|cuda]
                                               [--json-out PATH]

Variants, all on the default preset's model shape (4 x 128, 4 heads, vocab 4096, context 128, micro-batch 16,
2 micro-batches per optimiser step), a random token stream and random reference scores (throughput does not
depend on the data):
- `ntp`: next-token training, every token;
- `slm_micro`: top 60% by excess loss, rank_over="micro_batch" (each micro-batch ranks its own targets in its
  training forward);
- `slm_step`: the same, rank_over="step": a no-grad forward over the step's micro-batches first, then the top 60%
  of the whole step, then the training forward + backward per micro-batch with the fixed masks;
- `slm_step_ref`: rank_over="step" with the reference_loss score, which ranks from the reference's per-token
  lookups (no pre-pass): the cost of the step-level ranking itself.
Each step is the trainer's own `stages.training.run.Trainer.step` (make_batch from a memory-mapped stream,
begin_step, the objective's forward + backward, grad clip, AdamW).

Definitions:
- Timing: every variant's model lives in this process and their steps alternate round-robin (the order rotates
  every round), each step timed on its own, so load from other processes on the shared machine hits every
  variant alike. tokens/s = step tokens / median step seconds (`best tok/s`: the fastest step); `to ntp` =
  median tokens/s over ntp's median tokens/s in the same run (the overhead: 1.00 = none).
- Peak memory: every variant again in its own subprocess for a few steps. CUDA: torch.cuda.max_memory_allocated;
  CPU: `peak MiB` is the process's resident high-water mark (VmHWM, torch libraries included) and `delta MiB`
  that minus the resident set just before the model was built (parameters, optimizer state, activations, logits).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from report_output import emit

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

SHAPE = {"num_layers": 4, "d_model": 128, "num_heads": 4, "vocab_size": 4096, "seq_len": 128, "micro_batch": 16,
         "accum_steps": 2}
"""The default preset's model and batch (schemas.presets.default: ModelConfig(), micro_batch_size 16)."""
VARIANTS = {
    "ntp": {"kind": "all"},
    "slm_micro": {"kind": "top_k", "score": "excess_loss", "keep_ratio": 0.6, "rank_over": "micro_batch"},
    "slm_step": {"kind": "top_k", "score": "excess_loss", "keep_ratio": 0.6, "rank_over": "step"},
    "slm_step_ref": {"kind": "top_k", "score": "reference_loss", "keep_ratio": 0.6, "rank_over": "step"},
}
NUM_WINDOWS = 256
"""Windows in the random token stream (8 steps of 2 x 16 windows per epoch)."""


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work so wall-clock times are real."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def proc_status_mib(field: str) -> float:
    """A memory field of /proc/self/status in MiB: VmRSS (resident now) or VmHWM (its high-water mark).

    VmHWM belongs to this program's address space; resource's ru_maxrss would also count the parent's resident
    set at fork (Linux carries it over exec), and the parent holds every variant's model."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def write_stream(directory: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """A random token stream (stream-train.npy) and random per-token reference loss / entropy lookups."""
    rng = np.random.default_rng(0)
    num_tokens = NUM_WINDOWS * SHAPE["seq_len"] + 1
    path = directory / "stream-train.npy"
    np.save(path, rng.integers(0, SHAPE["vocab_size"], num_tokens).astype(np.int32))
    lookups = {name: (rng.random(num_tokens) * 8).astype(np.float32) for name in ("ref_loss", "ref_entropy")}
    return path, lookups


def build_variant(name: str, device: torch.device, stream_path: Path,
                  lookups: dict[str, np.ndarray]) -> Callable[[], None]:
    """The model, optimizer and data order of one variant; returns a function running its next Trainer.step."""
    from schemas.configs import ModelConfig, SelectionConfig, TargetVariant, TrainConfig
    from stages.objectives.token_prediction import TokenPrediction
    from stages.training.data import WindowOrder
    from stages.training.loop import Trainer, TrainRun
    from stages.training.optim import BatchSchedule, build_optimizer, lr_at
    from storage.windows import TokenWindows

    step_tokens = SHAPE["accum_steps"] * SHAPE["micro_batch"] * SHAPE["seq_len"]
    cfg = TrainConfig(max_tokens=1_000 * step_tokens, batch_size_tokens=step_tokens,
                      micro_batch_size=SHAPE["micro_batch"], device=device.type, seed=0)
    variant = TargetVariant(name=name, selection=SelectionConfig(**VARIANTS[name]))
    model_cfg = ModelConfig(num_layers=SHAPE["num_layers"], num_heads=SHAPE["num_heads"], d_model=SHAPE["d_model"])
    objective = TokenPrediction(model_cfg, variant)
    torch.manual_seed(0)
    model = objective.build_model(SHAPE["vocab_size"], SHAPE["seq_len"]).to(device)
    optimizer = build_optimizer(model, cfg, device)
    windows = TokenWindows(stream_path, SHAPE["seq_len"])
    order, schedule = WindowOrder(len(windows), seed=0), BatchSchedule.of(cfg, SHAPE["seq_len"])
    if schedule.accum_steps != SHAPE["accum_steps"]:
        raise RuntimeError(f"expected {SHAPE['accum_steps']} micro-batches per step, got {schedule.accum_steps}")
    run = TrainRun(objective, windows, {}, cfg, stream_path.parent, vocab_size=SHAPE["vocab_size"], label=name,
                   lookups=lookups if objective.needs else {})
    trainer = Trainer(run, model, optimizer, order, schedule, device)
    model.train()
    done = [0]

    def step() -> None:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(done[0], cfg, schedule.total_steps)
        trainer.step(done[0])
        done[0] += 1

    return step


def timed(step: Callable[[], None], device: torch.device) -> float:
    """Seconds of one call of `step`."""
    sync(device)
    tick = time.perf_counter()
    step()
    sync(device)
    return time.perf_counter() - tick


def measure_throughput(names: list[str], device: torch.device, steps: int, warmup: int) -> dict[str, list[float]]:
    """Step seconds of every variant, their steps alternating round-robin (order rotated every round)."""
    with tempfile.TemporaryDirectory() as tmp:
        stream_path, lookups = write_stream(Path(tmp))
        runners = {name: build_variant(name, device, stream_path, lookups) for name in names}
        for _ in range(warmup):
            for name in names:
                runners[name]()
        seconds: dict[str, list[float]] = {name: [] for name in names}
        for round_ in range(steps):
            for j in range(len(names)):
                name = names[(round_ + j) % len(names)]
                seconds[name].append(timed(runners[name], device))
    return seconds


def memory_worker(name: str, device: torch.device, steps: int) -> dict:
    """Peak memory of `steps` train steps of one variant, in this (fresh) process."""
    import stages.objectives.token_prediction  # noqa: F401  (imported before the baseline RSS: not counted)
    import stages.training.loop  # noqa: F401

    with tempfile.TemporaryDirectory() as tmp:
        stream_path, lookups = write_stream(Path(tmp))
        rss_before = proc_status_mib("VmRSS")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        step = build_variant(name, device, stream_path, lookups)
        for _ in range(steps):
            step()
        sync(device)
    if device.type == "cuda":
        return {"peak_mem_mib": torch.cuda.max_memory_allocated(device) / 2**20}
    peak = proc_status_mib("VmHWM")
    return {"peak_mem_mib": peak, "mem_delta_mib": peak - rss_before}


def spawn_memory_worker(name: str, device: torch.device, steps: int) -> dict:
    """memory_worker in a fresh Python process (its own high-water mark)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    spec = json.dumps({"name": name, "device": str(device), "steps": steps})
    proc = subprocess.run([sys.executable, __file__, "--memory-worker", spec], capture_output=True, text=True,
                          env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory worker {name} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def markdown_table(report: dict) -> str:
    """The results as a Markdown table (`to ntp` compares median tokens/s in the same run)."""
    cpu = report["device"] == "cpu"
    lines = [f"| variant | selection | tokens/s | best tok/s | to ntp | peak MiB{' | delta MiB' if cpu else ''} |",
             f"|---|---|---|---|---|---|{'---|' if cpu else ''}"]
    for r in report["results"]:
        selection = VARIANTS[r["variant"]]
        label = "all tokens" if selection["kind"] == "all" else (
            f"top {selection['keep_ratio']:.0%} {selection['score']}, rank_over={selection['rank_over']}")
        cells = [r["variant"], label, f"{r['tokens_per_s']:,.0f}", f"{r['tokens_per_s_best']:,.0f}",
                 f"{r['to_ntp']:.2f}", f"{r['peak_mem_mib']:,.1f}"]
        if cpu:
            cells.append(f"{r['mem_delta_mib']:,.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Device {report['device']} ({report['num_threads']} threads); {report['steps']} timed steps per "
                 f"variant, alternating; step = {SHAPE['accum_steps']} x {SHAPE['micro_batch']} x "
                 f"{SHAPE['seq_len']} tokens; 1-min load average {report['load_average_1min']}.")
    return "\n".join(lines)


def main() -> None:
    """Parse flags, time the variants interleaved, measure each one's memory in a subprocess, print JSON and
    Markdown."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="timed optimiser steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    parser.add_argument("--memory-steps", type=int, default=3, help="steps of each memory subprocess")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {list(VARIANTS)}")
    parser.add_argument("--json-out", type=Path, default=None, help="also write the JSON report here")
    parser.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_worker is not None:
        spec = json.loads(args.memory_worker)
        print(json.dumps(memory_worker(spec["name"], torch.device(spec["device"]), spec["steps"])))
        return

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    if set(names) - set(VARIANTS) or "ntp" not in names:
        parser.error(f"--variants takes ntp and any of {list(VARIANTS)}, got {names}")
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be >= 1")
    load_before = os.getloadavg()[0]
    seconds = measure_throughput(names, device, args.steps, args.warmup)
    memory = {name: spawn_memory_worker(name, device, args.memory_steps) for name in names}
    step_tokens = SHAPE["accum_steps"] * SHAPE["micro_batch"] * SHAPE["seq_len"]
    ntp_rate = step_tokens / statistics.median(seconds["ntp"])
    results = []
    for name in names:
        rate = step_tokens / statistics.median(seconds[name])
        results.append({"variant": name, "selection": VARIANTS[name], "tokens_per_s": rate,
                        "tokens_per_s_best": step_tokens / min(seconds[name]), "to_ntp": rate / ntp_rate,
                        "step_seconds": seconds[name], **memory[name]})
    report = {"device": device.type, "num_threads": torch.get_num_threads(), "torch": torch.__version__,
              "shape": SHAPE, "steps": args.steps, "warmup": args.warmup,
              "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
              "memory": ("torch.cuda.max_memory_allocated" if device.type == "cuda" else
                         "subprocess VmHWM (peak) and VmHWM - VmRSS before model build (delta)"),
              "results": results}
    emit(report, markdown_table(report), args.json_out)


if __name__ == "__main__":
    main()
