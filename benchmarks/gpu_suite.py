"""GPU benchmark suite: tokens/s (rows/s), MFU and peak memory of lmpipe's heavy steps at the `gpt2_small` shape.

Usage: python benchmarks/gpu_suite.py [--device auto|cpu|cuda] [--rows train_eager,train_compile,score,sae,extract]
                                      [--size KEY=VALUE ...] [--steps ROW=N ...] [--json-out PATH] [--dry-run]

Rows, each timed for its own `--steps` (after untimed warm-up steps; the first warm-up step, which compiles, is
reported as `first step s`), one after another in this process:
- `train_eager` / `train_compile`: the real optimiser step (stages/training/run.py `Trainer.step`, driven as in
  benchmarks/train_throughput.py: TokenPrediction, bf16 autocast on CUDA, grad clip, fused AdamW) on the
  `gpt2_small` preset's model (12 x 768, 12 heads, GPT-2 BPE vocab 50257, context 1024, micro batch 32, one
  micro-batch per step); `train_compile` compiles every block as the trainer does (`compile_blocks`);
- `score`: the window-loss pass of scoring and evaluation (stages/models/window_losses.py iter_window_losses),
  score.batch_size windows per step;
- `sae`: one TopK SAE training step (stages/models/sae.py, the `sparse` step of benchmarks/sae_throughput.py) at
  train_sae's shape for d_model 768: 12288 latents, k 32, 4096 rows, fp32;
- `extract`: concept extraction's labelling step (stages/models/sae.py window_concepts: forward to the SAE site,
  forward + activation-gradient backward of the rest, SAE encode, attribution), ExtractConfig's 32 windows, fp32.
Synthetic data: random token ids (throughput does not depend on them) and Gaussian SAE rows.

Definitions:
- FLOPs per token: training 6N + 12LTd (benchmarks/common.py flops_per_token; N without the input embedding,
  the tied unembedding counted); scoring one forward, a third of that; extraction one forward plus, for the
  blocks after the SAE site and the unembedding, a backward w.r.t. activations only (counted as one forward of
  them), plus the SAE encoder (2 D L) and the attribution (2 K D); SAE per row 4 D L + 6 K D (encoder forward
  and weight gradient, sparse decode forward and backward).
- MFU = best-step throughput * FLOPs per unit / the device's bf16 peak, MEASURED in this run (best of 10
  8192^3 bf16 matmuls); `MFU nominal` divides by 989 TFLOP/s, the dense bf16 peak of an H100/H200 SXM. fp32 rows
  (sae, extract: their stages run without autocast) also get `MFU fp32` against the measured fp32 matmul peak.
  On the CPU (the dry run) every MFU is against the measured fp32 peak.
- Peak memory: torch.cuda.max_memory_allocated from a reset before the row's model is built (CPU: the process's
  ru_maxrss high-water mark, meaningless per row; the dry run only checks the rows run).
Budget: at the default sizes every row takes seconds on an H200 except train_compile (a cold Inductor compile
of the block, about a minute or two); rows start only while the elapsed time is under --budget-s (default 420).

`--dry-run`: every row on the CPU at tiny sizes with 2 timed steps, compiling with Dynamo's `eager` backend
(graph capture without Inductor's 25 s CPU code generation), so the suite is exercised in CI (tests/test_benchmarks.py).
Imports only torch, numpy, pyarrow, safetensors and pydantic through lmpipe (no prefect, no duckdb): the JSON lists
any such module found loaded (`heavy_modules`).
"""

import argparse
import contextlib
import functools
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import (
    MEMORY_METHOD,
    REPO_ROOT,
    PeakMemory,
    emit,
    flops_per_token,
    load_average,
    matmul_peak_flops,
    pick_device,
    step_seconds,
    sync,
)
from sae_throughput import build_step as build_sae_step
from torch import nn
from train_throughput import build_ours, write_stream

sys.path.insert(0, str(REPO_ROOT))

ROWS = ("train_eager", "train_compile", "score", "sae", "extract")
NOMINAL_BF16_PEAK = 989e12
"""Dense bf16 tensor-core peak of an H100 / H200 SXM (FLOP/s), printed beside the measured one."""
GPT2_VOCAB = 50257
HEAVY_MODULES = ("prefect", "duckdb", "dask", "ray", "pandas")
DEFAULT_STEPS = {"train_eager": 20, "train_compile": 20, "score": 20, "sae": 30, "extract": 10}
WARMUP = 3
DRY_SIZES = {"num_layers": 2, "d_model": 32, "num_heads": 2, "vocab_size": 128, "seq_len": 16, "micro_batch": 4,
             "score_batch": 8, "extract_batch": 4, "sae_rows": 64, "sae_latents": 256, "sae_k": 4, "sae_layer": 0,
             "top": 2}


def preset_sizes() -> dict:
    """Row sizes from the gpt2_small preset (its model, context, micro batch, score and extract batch sizes; the
    SAE at train_sae's defaults for this width: 16 x d_model latents, k 32, 4096 rows, the middle layer)."""
    from schemas.presets import gpt2_small

    cfg = gpt2_small()
    model = cfg.target.model
    return {"num_layers": model.num_layers, "d_model": model.d_model, "num_heads": model.num_heads,
            "vocab_size": GPT2_VOCAB, "seq_len": cfg.tokenize.seq_len, "micro_batch": cfg.target.train.micro_batch_size,
            "score_batch": cfg.score.batch_size, "extract_batch": cfg.concepts.batch_size,
            "sae_rows": cfg.sae.batch_rows, "sae_latents": cfg.sae.expansion * model.d_model,
            "sae_k": cfg.sae.k or min(32, model.d_model // 8), "sae_layer": model.num_layers // 2 - 1,
            "top": cfg.concepts.top}


@contextlib.contextmanager
def compile_backend(backend: str | None):
    """Module.compile() uses `backend` inside the block (None: Inductor, unchanged)."""
    if backend is None:
        yield
        return
    original = nn.Module.compile
    nn.Module.compile = functools.partialmethod(original, backend=backend)
    try:
        yield
    finally:
        nn.Module.compile = original


def model_flops(model, sizes: dict) -> dict:
    """Training, forward and extraction FLOPs per token of a GPT (see the module docstring)."""
    T, d, V = sizes["seq_len"], sizes["d_model"], sizes["vocab_size"]
    tied = model.lm_head.weight is model.embed.weight
    num_params = model.num_params() + (model.lm_head.weight.numel() if tied else 0)
    train = flops_per_token(num_params, sizes["num_layers"], T, d)
    after = range(sizes["sae_layer"] + 1, model.num_trunk_layers + 1)  # blocks the extraction backward crosses
    after_fwd = sum(2 * sum(p.numel() for p in model._block(i).parameters()) + 4 * T * d for i in after) + 2 * V * d
    extract = train / 3 + after_fwd + 2 * d * sizes["sae_latents"] + 2 * sizes["sae_k"] * d
    return {"num_params": num_params, "train": train, "forward": train / 3, "extract": extract}


def build_row(name: str, sizes: dict, device: torch.device, stream_path: Path):
    """(unit, units per step, FLOPs per unit, compute dtype, step function) of one row."""
    from schemas.configs import ModelConfig
    from stages.models.gpt import GPT
    from stages.models.sae import TopKSAE, window_concepts
    from stages.models.window_losses import iter_window_losses
    from storage.windows import TokenWindows

    T, amp = sizes["seq_len"], "bf16 autocast" if device.type == "cuda" else "fp32"
    shape = {k: sizes[k] for k in ("num_layers", "d_model", "num_heads", "vocab_size", "seq_len", "micro_batch")}
    if name.startswith("train"):
        model, step = build_ours({"config": shape, "compile": name == "train_compile"}, device, stream_path)
        return "tokens", sizes["micro_batch"] * T, model_flops(model, sizes)["train"], amp, step
    if name == "sae":
        cfg = {"d_model": sizes["d_model"], "num_latents": sizes["sae_latents"], "k": sizes["sae_k"]}
        x = torch.randn(2, sizes["sae_rows"], sizes["d_model"], device=device)
        pool = list(((x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True) + 1e-5)).unbind(0))
        _, step = build_sae_step({"variant": "sparse", "config": cfg}, device, pool)
        D, L, K = sizes["d_model"], sizes["sae_latents"], sizes["sae_k"]
        return "rows", sizes["sae_rows"], 4 * D * L + 6 * K * D, "fp32", step
    windows = TokenWindows(stream_path, T)
    model = GPT(ModelConfig(num_layers=sizes["num_layers"], num_heads=sizes["num_heads"], d_model=sizes["d_model"]),
                sizes["vocab_size"], T).to(device)
    flops = model_flops(model, sizes)
    if name == "score":
        ids = np.arange(sizes["score_batch"]) % len(windows)
        return "tokens", len(ids) * T, flops["forward"], amp, \
            lambda: list(iter_window_losses(model, windows, ids, len(ids), device))
    model.eval().requires_grad_(False)
    sae = TopKSAE(sizes["d_model"], sizes["sae_latents"], sizes["sae_k"]).to(device).eval()
    inputs_BT, targets_BT = windows.batch(np.arange(sizes["extract_batch"]) % len(windows), device)
    return "tokens", sizes["extract_batch"] * T, flops["extract"], "fp32", \
        lambda: window_concepts(model, sae, inputs_BT, targets_BT, sizes["sae_layer"], sizes["top"])


def run_row(name: str, sizes: dict, steps: int, device: torch.device, stream_path: Path, peaks: dict,
            backend: str | None) -> dict:
    """Build and time one row; returns its report row."""
    torch.manual_seed(0)
    memory = PeakMemory(device)
    with compile_backend(backend):
        unit, per_step, flops, dtype, step = build_row(name, sizes, device, stream_path)
        first_step_s = step_seconds(step, 1, device=device)[0]
        seconds = step_seconds(step, steps, warmup=WARMUP - 1, device=device)
    best = per_step / min(seconds)
    mfu_peak = peaks["bfloat16"] if device.type == "cuda" else peaks["float32"]
    row = {"row": name, "unit": unit, "per_step": per_step, "per_s": per_step / statistics.median(seconds),
           "per_s_best": best, "flops_per_unit": flops, "tflops_best": best * flops / 1e12, "compute": dtype,
           "mfu": best * flops / mfu_peak, "first_step_s": first_step_s, "step_seconds": seconds}
    if device.type == "cuda":
        row["mfu_nominal"] = best * flops / NOMINAL_BF16_PEAK
        if dtype == "fp32":
            row["mfu_fp32"] = best * flops / peaks["float32"]
    row.update(memory.row())
    del step
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def markdown_table(report: dict) -> str:
    """The rows as a Markdown table, then the peaks and sizes."""
    cuda = report["device"] == "cuda"
    extra = " MFU nominal % | MFU fp32 % |" if cuda else ""
    lines = [f"| row | compute | unit/s | best unit/s | TFLOP/s | MFU % |{extra} first step s | peak MiB |",
             "|---|---|---|---|---|---|" + ("---|---|" if cuda else "") + "---|---|"]
    for r in report["results"]:
        cells = [r["row"], r["compute"], f"{r['per_s']:,.0f} {r['unit']}", f"{r['per_s_best']:,.0f}",
                 f"{r['tflops_best']:.1f}", f"{100 * r['mfu']:.1f}"]
        if cuda:
            cells += [f"{100 * r['mfu_nominal']:.1f}", f"{100 * r['mfu_fp32']:.1f}" if "mfu_fp32" in r else "-"]
        cells += [f"{r['first_step_s']:.1f}", f"{r['peak_mem_mib']:,.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    peaks = ", ".join(f"{dtype} {flops / 1e12:,.1f} TFLOP/s" for dtype, flops in report["peak_flops"].items())
    lines += ["", f"Device {report['device_name']}; measured matmul peaks: {peaks}"
              + (f"; nominal bf16 {NOMINAL_BF16_PEAK / 1e12:.0f} TFLOP/s" if cuda else "")
              + f". Sizes: {report['sizes']}. Total {report['elapsed_s']:.0f} s."]
    return "\n".join(lines)


def parse_pairs(pairs: list[str], parser: argparse.ArgumentParser, known) -> dict[str, int]:
    """KEY=VALUE flags as {key: int}, keys checked against `known`."""
    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in known or not value.lstrip("-").isdigit():
            parser.error(f"{pair!r}: expected KEY=INT with KEY one of {sorted(known)}")
        out[key] = int(value)
    return out


def main(argv: list[str] | None = None) -> dict:
    """Parse flags, measure the matmul peaks and every row, print JSON and Markdown; returns the report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {list(ROWS)}")
    parser.add_argument("--size", action="append", default=[], help=f"KEY=INT, keys {sorted(DRY_SIZES)}")
    parser.add_argument("--steps", action="append", default=[], help=f"ROW=INT timed steps (default {DEFAULT_STEPS})")
    parser.add_argument("--budget-s", type=float, default=420.0, help="start no row after this many seconds")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU, 2 steps per row")
    parser.add_argument("--json-out", type=Path, default=None, help="also write the JSON report here")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    if set(rows) - set(ROWS):
        parser.error(f"unknown row(s) {sorted(set(rows) - set(ROWS))}; choose from {list(ROWS)}")
    device = torch.device("cpu") if args.dry_run else pick_device(args.device)
    sizes = {**(DRY_SIZES if args.dry_run else preset_sizes()), **parse_pairs(args.size, parser, DRY_SIZES)}
    steps = {**DEFAULT_STEPS, **({r: 2 for r in ROWS} if args.dry_run else {}),
             **parse_pairs(args.steps, parser, ROWS)}
    n = 256 if args.dry_run else (8192 if device.type == "cuda" else 2048)
    peaks = {"float32": matmul_peak_flops(device, torch.float32, n)}
    if device.type == "cuda":
        peaks["bfloat16"] = matmul_peak_flops(device, torch.bfloat16, n)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    report = {"device": device.type, "device_name": name, "torch": torch.__version__, "dry_run": args.dry_run,
              "sizes": sizes, "steps": steps, "warmup": WARMUP, "peak_flops": peaks,
              "nominal_bf16_peak_flops": NOMINAL_BF16_PEAK, "memory": MEMORY_METHOD[device.type],
              "load_average_1min": load_average(), "results": [], "skipped": []}
    # a cold Inductor cache, so the compile row's first step is the compile a first run pays
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="gpu-suite-inductor-"))
    with tempfile.TemporaryDirectory() as tmp:
        stream_path = Path(tmp) / "stream-train.npy"
        write_stream(stream_path, sizes["vocab_size"], sizes["seq_len"])
        for row in rows:
            if time.perf_counter() - started > args.budget_s:
                report["skipped"].append(row)
                continue
            result = run_row(row, sizes, steps[row], device, stream_path, peaks, "eager" if args.dry_run else None)
            report["results"].append(result)
            sync(device)
            print(f"# {row}: {result['per_s']:,.0f} {result['unit']}/s, MFU {100 * result['mfu']:.1f}% "
                  f"({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    report["elapsed_s"] = time.perf_counter() - started
    report["heavy_modules"] = sorted({m.split(".")[0] for m in sys.modules} & set(HEAVY_MODULES))
    emit(report, markdown_table(report), args.json_out)
    return report


if __name__ == "__main__":
    main()
