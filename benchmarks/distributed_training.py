"""Training throughput on 1 and N processes (torch.distributed: ddp and fsdp) with lmpipe's real train loop.

Usage: python benchmarks/distributed_training.py [--processes 1,2] [--parallelism ddp,fsdp] [--tokens 65536]
                                                 [--device auto|cpu|cuda] [--json-out PATH]

Each row is one `stages.training.loop.train` call (the default preset's target model and batch: 4 x 128, vocab
4096, seq_len 128, 4,096-token steps of micro-batches of 16 windows, next-token objective) on a synthetic token
stream, run in its own subprocess; with N > 1 the loop launches N workers with torch's elastic launcher (gloo on
CPU, NCCL with one GPU each on CUDA), exactly as `train.num_processes=N` does in the pipeline.
- tokens/s: the run's tokens / its training seconds (rank 0's step times; throughput over all ranks).
  `wall s` includes process start, the launch and the rendezvous, evaluation and checkpoints.
- ratio: tokens/s against the 1-process row of the same run (scaling efficiency = ratio / N).
- MFU: tokens/s * FLOPs/token / (peak * GPUs): FLOPs/token = 6N + 12*L*T*d (see train_throughput.py); the peak is
  the best large matmul of this device (fp32 on CPU, where all processes share the same cores, so the CPU peak
  is counted once; bf16 per GPU on CUDA).
- peak MiB: the largest resident set (ru_maxrss) of the processes of a row; on CUDA also the largest
  torch.cuda.max_memory_allocated of its ranks.
On a 2-core CPU two processes share the cores (a correctness check, not a speed-up); on a GPU machine run
`--processes 1,2,4,8 --device cuda` for the scaling efficiency.
"""

import argparse
import os
import resource
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from common import (
    REPO_ROOT,
    emit,
    flops_per_token,
    load_average,
    matmul_peak_flops,
    parse_args,
    pick_device,
    spawn_worker,
)

VOCAB, SEQ_LEN = 4096, 128


def run_row(spec: dict) -> dict:
    """One training run (in this subprocess, launching workers when spec['processes'] > 1)."""
    sys.path.insert(0, str(REPO_ROOT))
    from schemas.configs import ModelConfig, TargetVariant, TrainConfig
    from stages.objectives.token_prediction import TokenPrediction
    from stages.training.loop import TrainRun, train
    from storage.windows import TokenWindows

    with tempfile.TemporaryDirectory() as tmp:
        stream = np.random.default_rng(0).integers(0, VOCAB, spec["tokens"] + 64 * SEQ_LEN + 1).astype(np.uint16)
        np.save(Path(tmp) / "stream-train.npy", stream)
        np.save(Path(tmp) / "stream-val.npy", stream[: 8 * SEQ_LEN + 1])
        train_windows = TokenWindows(Path(tmp) / "stream-train.npy", SEQ_LEN, "train")
        val = {"val": TokenWindows(Path(tmp) / "stream-val.npy", SEQ_LEN, "val")}
        cfg = TrainConfig(max_tokens=spec["tokens"], batch_size_tokens=4096, micro_batch_size=16, warmup_steps=2,
                          eval_every_steps=10_000, eval_max_windows=8, log_every_steps=5, checkpoint_every_steps=10_000,
                          device=spec["device"], num_processes=spec["processes"],
                          parallelism=spec["parallelism"] if spec["processes"] > 1 else "ddp")
        model_cfg = ModelConfig()
        summary = train(TrainRun(TokenPrediction(model_cfg, TargetVariant(name="ntp")), train_windows, val, cfg,
                                 Path(tmp) / "work", vocab_size=VOCAB, label="bench"))
    usage = [resource.getrusage(who).ru_maxrss / 1024 for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return {"processes": spec["processes"], "parallelism": spec["parallelism"] if spec["processes"] > 1 else "-",
            "tokens": summary["tokens_seen"], "tokens_per_s": summary["tokens_per_s"],
            "train_seconds": summary["train_seconds"], "wall_seconds": summary["wall_seconds"],
            "final_train_loss": summary["train_loss"], "num_params": summary["num_params"],
            "flops_per_token": flops_per_token(  # N without the input embedding (a tied one counts as unembedding)
                summary["num_params"] - (0 if model_cfg.tie_embeddings else VOCAB * model_cfg.d_model),
                model_cfg.num_layers, SEQ_LEN, model_cfg.d_model),
            "peak_rss_mib": max(usage)}


def markdown_table(report: dict) -> str:
    lines = ["| processes | parallelism | tokens/s | ratio | scaling eff. | MFU | train s | wall s | peak MiB |"
             " final loss |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in report["results"]:
        lines.append(f"| {row['processes']} | {row['parallelism']} | {row['tokens_per_s']:,.0f} | "
                     f"{row['ratio']:.2f}x | {row['ratio'] / row['processes']:.0%} | {row['mfu']:.1%} | "
                     f"{row['train_seconds']:.1f} | {row['wall_seconds']:.1f} | {row['peak_rss_mib']:,.0f} | "
                     f"{row['final_train_loss']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--processes", default="1,2", help="comma list of process counts (1 is the baseline)")
    parser.add_argument("--parallelism", default="ddp,fsdp", help="comma list of ddp, fsdp (for counts > 1)")
    parser.add_argument("--tokens", type=int, default=65_536, help="training tokens per row (4,096 per step)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = parse_args(parser, run_row)
    device = pick_device(args.device)
    counts = sorted({int(n) for n in args.processes.split(",")} | {1})
    kinds = [k.strip() for k in args.parallelism.split(",") if k.strip()]
    if set(kinds) - {"ddp", "fsdp"}:
        parser.error(f"--parallelism takes ddp and/or fsdp, got {kinds}")
    peak_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = matmul_peak_flops(device, peak_dtype, 8192 if device.type == "cuda" else 2048)
    report = {"device": device.type, "cpu_count": os.cpu_count(), "torch": torch.__version__,
              "gpus": torch.cuda.device_count() if device.type == "cuda" else 0,
              "peak_flops": peak, "peak_dtype": str(peak_dtype).removeprefix("torch."), "tokens": args.tokens,
              "load_average_1min": {"before": load_average()}, "results": []}
    for count in counts:
        for kind in (["-"] if count == 1 else kinds):
            spec = {"processes": count, "parallelism": kind, "tokens": args.tokens, "device": str(device.type)}
            row = spawn_worker(__file__, spec, cwd=REPO_ROOT)
            print(f"# {count} process(es) {kind}: {row['tokens_per_s']:,.0f} tok/s", file=sys.stderr)
            report["results"].append(row)
    base = report["results"][0]["tokens_per_s"]
    for row in report["results"]:
        row["ratio"] = row["tokens_per_s"] / base
        devices = row["processes"] if device.type == "cuda" else 1
        row["mfu"] = row["tokens_per_s"] * row["flops_per_token"] / (peak * devices)
    report["load_average_1min"]["after"] = load_average()
    emit(report, markdown_table(report), args.json_out)


if __name__ == "__main__":
    main()
