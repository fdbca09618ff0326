"""Multi-token prediction costs: training tokens/s and peak memory for n = 1, 2, 4 heads with the joint and the
sequential per-head backward, and greedy vs self-speculative decoding tokens/s per draft count (same prompts,
same run).

Usage: python benchmarks/mtp_throughput.py [--steps 6] [--quick] [--json-out PATH]

Training rows run in their own subprocess each (CPU peak memory = that process's ru_maxrss high-water mark;
on CUDA torch.cuda.max_memory_allocated), with the default preset's model shape (4 x 128, vocab 4096, context
128, micro batch 16) and a larger-vocabulary shape (vocab 32768) where the heads' logits dominate memory.
Decoding rows use a model whose extra heads copy head 1 (so drafts are often right, as in a trained model on
repetitive text) and a random one (drafts rarely right): the speed-up depends on acceptance, which this shows.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from common import emit, peak_mib, pick_device, spawn_worker, step_seconds

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = {"default": {"vocab": 4096}, "vocab32k": {"vocab": 32768}}


def train_worker(spec: dict) -> dict:
    """Measure one (shape, n, backward) training configuration in this process."""
    from schemas.configs import ModelConfig, TargetVariant
    from stages.objectives.base import Batch
    from stages.objectives.factory import build_objective

    device = pick_device("auto")
    T, B, V = 128, 16, spec["vocab"]
    variant = TargetVariant(name="b", num_future_tokens=spec["heads"], mtp_backward=spec["backward"])
    objective = build_objective(ModelConfig(num_layers=4, num_heads=4, d_model=128), variant)
    torch.manual_seed(0)
    model = objective.build_model(V, T).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rows = torch.randint(0, V, (B, T + 1), device=device)
    batch = Batch(rows[:, :-1], rows[:, 1:], torch.zeros(B, T, dtype=torch.long, device=device))

    def step() -> None:
        objective.step(model, batch, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = step_seconds(step, spec["steps"], warmup=spec["warmup"], device=device)
    return {**spec, "tokens_per_s": B * T / statistics.median(times), "peak_mib": peak_mib(device),
            "device": device.type}


def decoding_rows(quick: bool) -> list[dict]:
    """Greedy vs speculative decoding tokens/s for 4-head models, same prompts."""
    from schemas.configs import ModelConfig
    from stages.evaluation.heads import speculative_rows
    from stages.models.gpt import GPT

    rows = []
    for kind in ("heads copy head 1", "random heads"):
        torch.manual_seed(0)
        model = GPT(ModelConfig(num_layers=6, num_heads=4, d_model=128), 4096, 256, num_future_tokens=4).eval()
        if kind == "heads copy head 1":
            for block in model.head_blocks[1:]:
                block.load_state_dict(model.head_blocks[0].state_dict())
        prompts = [torch.randint(0, 4096, (16,), generator=torch.Generator().manual_seed(i)).tolist()
                   for i in range(2 if quick else 6)]
        for row in speculative_rows(model, prompts, 32 if quick else 96):
            rows.append({"model": kind, **row, "tokens_per_s": row["new_tokens"] / row["seconds"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json-out")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(train_worker(json.loads(args.worker))))
        return
    steps, warmup = (2, 1) if args.quick else (args.steps, 2)
    train = []
    for shape, sizes in SHAPES.items():
        for heads in (1, 2, 4):
            for backward in (("joint",) if heads == 1 else ("joint", "sequential")):
                spec = {"shape": shape, **sizes, "heads": heads, "backward": backward, "steps": steps,
                        "warmup": warmup}
                train.append(spawn_worker(__file__, spec))
    decode = decoding_rows(args.quick)
    emit({"train": train, "decode": decode}, markdown(train, decode), args.json_out)


def markdown(train: list[dict], decode: list[dict]) -> str:
    """The training rows and the decoding rows as two Markdown tables."""
    lines = ["| shape | heads | backward | tokens/s | peak MiB |", "|---|---|---|---|---|"]
    lines += [f"| {r['shape']} | {r['heads']} | {r['backward']} | {r['tokens_per_s']:,.0f} | {r['peak_mib']:,.0f} |"
              for r in train]
    lines += ["", "| model | drafts | tokens/forward | tokens/s | speed-up |", "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['draft']} | {r['tokens_per_forward']:.2f} | {r['tokens_per_s']:,.0f} | "
              f"{r['speedup']:.2f}x |" for r in decode]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
