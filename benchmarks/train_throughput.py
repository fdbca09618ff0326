"""Training throughput, MFU and peak memory of lmpipe's train step against a plain PyTorch reference.

Usage: python benchmarks/train_throughput.py [--steps 10] [--warmup 2] [--device auto|cpu|cuda]
                                             [--configs default,large] [--no-compile] [--json-out PATH]

Measured, per model config x implementation x (eager, torch.compile):
- `ours`: the real step of stages/training/run.py (`Trainer.step`: make_batch from a memory-mapped token stream,
  the TokenPrediction objective with one head and all tokens, autocast, backward, grad-norm clip, AdamW from
  training.optim.build_optimizer, lr from lr_at) on `stages.models.gpt.GPT`;
- `plain`: a minimal reference written below with no lmpipe import: the same architecture (RMSNorm pre-norm,
  rotary rotate-half, SDPA causal attention, SwiGLU, tied embeddings, same layer shapes) and a bare loop
  (index a batch from a tensor, cross-entropy, backward, clip at 1.0, AdamW step).
  ours/plain tokens/s is the overhead of our loop and model code (1.0 = none).
- compile: every transformer block is compiled in place (`block.compile()`, what the trainer does on CUDA) in
  both implementations, so compile rows compare loops too. The trainer ignores train.compile on CPU; the
  benchmark compiles there anyway to show what it would give. `first step s` includes compilation, cold:
  each worker gets an empty Inductor cache directory.

Definitions:
- tokens/s = micro_batch * seq_len / step seconds, each of `--steps` steps timed on its own after `--warmup`
  unmeasured steps: `tokens/s` from the median step, `best tok/s` from the fastest. The development machines
  are shared (other processes compete for the 2 cores; the 1-minute load average before and after is in the
  JSON), so MFU and ours/plain use the fastest step, the least disturbed estimate; on a quiet machine the two
  agree within a few percent.
- FLOPs/token = 6*N + 12*L*T*d (PaLM, Chowdhery et al. 2022, App. B): N = every parameter except the input
  embedding table (the tied unembedding matrix V*d counts, norm gains too); L layers, T seq_len, d d_model;
  the attention term counts the full T x T score and value matmuls (no causal halving), forward + backward.
- MFU = best tok/s * FLOPs/token / peak, peak = best of 10 large square torch.matmul in this run on this device:
  fp32 (n=2048) on CPU; on CUDA bf16 (n=8192), the dtype autocast trains in (the fp32 peak is reported too).
- Peak memory: CUDA: torch.cuda.max_memory_allocated of the step. CPU: each measurement runs in its own
  subprocess; `peak MiB` is its resource.getrusage(RUSAGE_SELF).ru_maxrss (the process high-water mark, torch
  libraries included), `delta MiB` is that minus the resident set (VmRSS) just before the model was built:
  parameters, optimizer state, activations and, for compile rows, the compiler's own memory.
"""

import argparse
import contextlib
import math
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import (
    MEMORY_METHOD,
    REPO_ROOT,
    PeakMemory,
    emit,
    flops_per_token,
    load_average,
    matmul_peak_flops,
    parse_args,
    pick_device,
    spawn_worker,
    step_seconds,
)
from torch import nn

CONFIGS = {
    # The default preset's model (schemas.presets.default: ModelConfig() 4 x 128, 4 heads, vocab 4096, ctx 128,
    # micro batch 16).
    "default": {"num_layers": 4, "d_model": 128, "num_heads": 4, "vocab_size": 4096, "seq_len": 128,
                "micro_batch": 16},
    # Larger: 6 x 256, 4 heads (head dim 64), vocab 8192, ctx 256; micro batch 8 keeps a step ~2 s on 2 CPU cores.
    "large": {"num_layers": 6, "d_model": 256, "num_heads": 4, "vocab_size": 8192, "seq_len": 256,
              "micro_batch": 8},
}
MLP_RATIO = 8 / 3  # ModelConfig default; hidden = 8 * ceil(ratio * d / 8) in both implementations
NORM_EPS = 1e-5
ROPE_THETA = 10000.0
NUM_WINDOWS = 64  # windows in the synthetic token stream (random ids: throughput does not depend on the data)


# ---------------------------------------------------------------------------------------------------------------
# Plain reference: the same architecture in plain PyTorch (no lmpipe imports).

class PlainBlock(nn.Module):
    """Pre-norm block: x + o(attn(rope(q), rope(k), v)), then x + down(silu(gate) * up)."""

    def __init__(self, d_model: int, num_heads: int, hidden: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm1, self.norm2 = nn.RMSNorm(d_model, eps=NORM_EPS), nn.RMSNorm(d_model, eps=NORM_EPS)
        self.q, self.k, self.v, self.o = (nn.Linear(d_model, d_model, bias=False) for _ in range(4))
        self.gate, self.up = nn.Linear(d_model, hidden, bias=False), nn.Linear(d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x_BTD: torch.Tensor, cos_TK: torch.Tensor, sin_TK: torch.Tensor) -> torch.Tensor:
        B, T, D = x_BTD.shape
        h_BTD = self.norm1(x_BTD)
        heads = [t(h_BTD).view(B, T, self.num_heads, -1).transpose(1, 2) for t in (self.q, self.k, self.v)]
        q_BHTK, k_BHTK, v_BHTK = heads
        half = q_BHTK.shape[-1] // 2
        rope = lambda t: t * cos_TK + torch.cat([-t[..., half:], t[..., :half]], -1) * sin_TK  # noqa: E731
        y_BHTK = F.scaled_dot_product_attention(rope(q_BHTK), rope(k_BHTK), v_BHTK, is_causal=True)
        x_BTD = x_BTD + self.o(y_BHTK.transpose(1, 2).reshape(B, T, D))
        h_BTD = self.norm2(x_BTD)
        return x_BTD + self.down(F.silu(self.gate(h_BTD)) * self.up(h_BTD))


class PlainGPT(nn.Module):
    """Embedding, blocks, final RMSNorm, tied unembedding."""

    def __init__(self, vocab_size: int, d_model: int, num_heads: int, num_layers: int, seq_len: int):
        super().__init__()
        hidden = 8 * math.ceil(MLP_RATIO * d_model / 8)
        self.embed = nn.Embedding(vocab_size, d_model)
        self.blocks = nn.ModuleList(PlainBlock(d_model, num_heads, hidden) for _ in range(num_layers))
        self.norm = nn.RMSNorm(d_model, eps=NORM_EPS)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.lm_head.weight = self.embed.weight
        for p in self.parameters():
            if p.ndim == 2:
                nn.init.normal_(p, std=0.02)
        head_dim = d_model // num_heads
        inv_freq = ROPE_THETA ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles_TK = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq).repeat(1, 2)
        self.register_buffer("cos_TK", angles_TK.cos(), persistent=False)
        self.register_buffer("sin_TK", angles_TK.sin(), persistent=False)

    def forward(self, idx_BT: torch.Tensor) -> torch.Tensor:
        x_BTD = self.embed(idx_BT)
        for block in self.blocks:
            x_BTD = block(x_BTD, self.cos_TK, self.sin_TK)
        return self.lm_head(self.norm(x_BTD))


def autocast_ctx(device: torch.device):
    """bf16 autocast on CUDA, nothing on CPU (mirrors stages.runtime.devices.autocast)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------------------------
# Workers: one (config, impl, compile) measurement, run in a fresh subprocess.

def write_stream(path: Path, vocab_size: int, seq_len: int) -> np.ndarray:
    """A random token stream of NUM_WINDOWS windows, saved as .npy (ours reads it memory-mapped)."""
    stream = np.random.default_rng(0).integers(0, vocab_size, NUM_WINDOWS * seq_len + 1).astype(np.int32)
    np.save(path, stream)
    return stream


def build_ours(spec: dict, device: torch.device, stream_path: Path):
    """lmpipe's model + trainer step; returns (model, step function)."""
    sys.path.insert(0, str(REPO_ROOT))
    from schemas.configs import ModelConfig, TargetVariant, TrainConfig
    from stages.objectives.token_prediction import TokenPrediction
    from stages.training.data import WindowOrder
    from stages.training.loop import Trainer, TrainRun, compile_blocks
    from stages.training.optim import BatchSchedule, build_optimizer, lr_at
    from storage.windows import TokenWindows

    cfg = spec["config"]
    model_cfg = ModelConfig(num_layers=cfg["num_layers"], num_heads=cfg["num_heads"], d_model=cfg["d_model"])
    tokens_per_step = cfg["micro_batch"] * cfg["seq_len"]
    train_cfg = TrainConfig(max_tokens=1_000 * tokens_per_step, batch_size_tokens=tokens_per_step,
                            micro_batch_size=cfg["micro_batch"], device=device.type)
    objective = TokenPrediction(model_cfg, TargetVariant(name="ntp"))
    model = objective.build_model(cfg["vocab_size"], cfg["seq_len"]).to(device)
    optimizer = build_optimizer(model, train_cfg, device)
    if spec["compile"]:
        compile_blocks(model)
    windows = TokenWindows(stream_path, cfg["seq_len"])
    order, plan = WindowOrder(len(windows), seed=0), BatchSchedule.of(train_cfg, cfg["seq_len"])
    model.train()
    step_count = [0]
    # the trainer's own step (one process); the run's work_dir is never written by a step
    run = TrainRun(objective, windows, {}, train_cfg, stream_path.parent, vocab_size=cfg["vocab_size"], label="bench")
    trainer = Trainer(run, model, optimizer, order, plan, device)

    def step() -> None:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step_count[0], train_cfg, plan.total_steps)
        trainer.step(step_count[0])
        step_count[0] += 1

    return model, step


def build_plain(spec: dict, device: torch.device, stream: np.ndarray):
    """The plain reference model + a bare AdamW loop; returns (model, step function)."""
    cfg = spec["config"]
    B, T = cfg["micro_batch"], cfg["seq_len"]
    model = PlainGPT(cfg["vocab_size"], cfg["d_model"], cfg["num_heads"], cfg["num_layers"], T).to(device)
    extra = {"fused": True} if device.type == "cuda" else {}
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1, **extra)
    if spec["compile"]:
        for block in model.blocks:
            block.compile()
    ids = torch.from_numpy(stream[: NUM_WINDOWS * T + 1].astype(np.int64))
    inputs_NT = ids[:-1].view(NUM_WINDOWS, T).to(device)  # window n: inputs [nT, nT+T), targets shifted by one
    targets_NT = ids[1:].view(NUM_WINDOWS, T).to(device)
    generator = torch.Generator().manual_seed(0)
    model.train()

    def step() -> None:
        rows = torch.randint(0, NUM_WINDOWS, (B,), generator=generator).to(device)
        with autocast_ctx(device):
            logits_BTV = model(inputs_NT[rows])
        loss = F.cross_entropy(logits_BTV.float().flatten(0, 1), targets_NT[rows].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, step


def run_worker(spec: dict) -> dict:
    """Measure one configuration in this process; returns the result row."""
    device = torch.device(spec["device"])
    cfg = spec["config"]
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        stream_path = Path(tmp) / "stream-train.npy"
        stream = write_stream(stream_path, cfg["vocab_size"], cfg["seq_len"])
        memory = PeakMemory(device)
        if spec["impl"] == "ours":
            model, step = build_ours(spec, device, stream_path)
        else:
            model, step = build_plain(spec, device, stream)
        # Every parameter except the input embedding table (the tied unembedding counts once, via lm_head).
        num_params = sum(p.numel() for p in model.parameters()) - model.embed.weight.numel()
        if model.lm_head.weight is model.embed.weight:
            num_params += model.lm_head.weight.numel()
        first_step_s = step_seconds(step, 1, device=device)[0]  # the first warmup step: compilation happens here
        seconds = step_seconds(step, spec["steps"], warmup=spec["warmup"] - 1, device=device)
    step_tokens = cfg["micro_batch"] * cfg["seq_len"]
    row = {"config": spec["config_name"], "impl": spec["impl"], "mode": "compile" if spec["compile"] else "eager",
           "device": device.type, "num_params": num_params,
           "flops_per_token": flops_per_token(num_params, cfg["num_layers"], cfg["seq_len"], cfg["d_model"]),
           "tokens_per_s": step_tokens / statistics.median(seconds),
           "tokens_per_s_best": step_tokens / min(seconds), "tokens_per_s_mean": step_tokens * len(
               seconds) / sum(seconds), "step_seconds": seconds, "first_step_s": first_step_s}
    return {**row, **memory.row()}


def spawn_fresh(spec: dict) -> dict:
    """Run one measurement in a fresh Python process (own peak RSS, own compile caches)."""
    with tempfile.TemporaryDirectory() as cache_dir:
        # A fresh Inductor cache per worker: `first step s` is then the cold compile time a first run pays.
        return spawn_worker(__file__, spec, env={"TORCHINDUCTOR_CACHE_DIR": cache_dir})


# ---------------------------------------------------------------------------------------------------------------

def markdown_table(report: dict) -> str:
    """The results as a Markdown table (ours/plain compares the same config and mode)."""
    rows = report["results"]
    plain = {(r["config"], r["mode"]): r["tokens_per_s_best"] for r in rows if r["impl"] == "plain"}
    cpu = report["device"] == "cpu"
    lines = ["| config | impl | mode | N (params) | tokens/s | best tok/s | MFU % | ours/plain | first step s "
             f"| peak MiB{' | delta MiB' if cpu else ''} |",
             f"|---|---|---|---|---|---|---|---|---|---|{'---|' if cpu else ''}"]
    for r in rows:
        key = (r["config"], r["mode"])
        ratio = f"{r['tokens_per_s_best'] / plain[key]:.2f}" if key in plain else "-"
        cells = [r["config"], r["impl"], r["mode"], f"{r['num_params'] / 1e6:.2f}M", f"{r['tokens_per_s']:,.0f}",
                 f"{r['tokens_per_s_best']:,.0f}", f"{100 * r['mfu']:.1f}", ratio, f"{r['first_step_s']:.1f}",
                 f"{r['peak_mem_mib']:,.0f}"]
        if cpu:
            cells.append(f"{r['mem_delta_mib']:,.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    peak = report["peak_flops"]
    lines.append("")
    lines.append(f"Device {report['device']} ({report['num_threads']} threads); MFU peak = measured "
                 f"{report['mfu_peak_dtype']} matmul {peak[report['mfu_peak_dtype']] / 1e9:,.1f} GFLOP/s; "
                 f"FLOPs/token = {report['flops_formula']}.")
    return "\n".join(lines)


def main() -> None:
    """Parse flags, measure the matmul peak, run every measurement in a subprocess, print JSON and Markdown."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="measured optimizer steps per row")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured steps first (compilation happens here)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--configs", default="default,large", help=f"comma list of {sorted(CONFIGS)}")
    parser.add_argument("--impls", default="ours,plain", help="comma list of ours, plain")
    parser.add_argument("--micro-batch", type=int, default=None, help="override every config's micro batch")
    parser.add_argument("--no-compile", action="store_true", help="eager rows only")
    args = parse_args(parser, run_worker)

    device = pick_device(args.device)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown config(s) {unknown}; choose from {sorted(CONFIGS)}")
    impls = [n.strip() for n in args.impls.split(",") if n.strip()]
    if set(impls) - {"ours", "plain"}:
        parser.error(f"--impls takes ours and/or plain, got {impls}")
    if args.warmup < 1 or args.steps < 1:
        parser.error("--steps and --warmup must be >= 1")

    peak = {"float32": matmul_peak_flops(device, torch.float32, 2048 if device.type == "cpu" else 8192)}
    if device.type == "cuda":
        peak["bfloat16"] = matmul_peak_flops(device, torch.bfloat16, 8192)
    mfu_dtype = "bfloat16" if device.type == "cuda" else "float32"
    report = {"device": device.type, "num_threads": torch.get_num_threads(), "torch": torch.__version__,
              "steps": args.steps, "warmup": args.warmup, "peak_flops": peak, "mfu_peak_dtype": mfu_dtype,
              "flops_formula": "6*N + 12*L*T*d (N = params without the input embedding table, tied unembedding "
                               "counted; L layers, T seq_len, d d_model)",
              "memory": MEMORY_METHOD[device.type],
              "configs": {n: {**CONFIGS[n], **({"micro_batch": args.micro_batch} if args.micro_batch else {})}
                          for n in names},
              "load_average_1min": {"before": load_average()}, "results": []}
    modes = [False] if args.no_compile else [False, True]
    for name in names:
        for compile_ in modes:
            for impl in impls:
                spec = {"config_name": name, "config": report["configs"][name], "impl": impl, "compile": compile_,
                        "device": str(device), "steps": args.steps, "warmup": args.warmup}
                row = spawn_fresh(spec)
                row["mfu"] = row["tokens_per_s_best"] * row["flops_per_token"] / peak[mfu_dtype]
                report["results"].append(row)
                print(f"# {name} {impl} {row['mode']}: {row['tokens_per_s']:,.0f} tok/s", file=sys.stderr)
    report["load_average_1min"]["after"] = load_average()
    emit(report, markdown_table(report), args.json_out)


if __name__ == "__main__":
    main()
