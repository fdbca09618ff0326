"""Multi-token prediction costs: training tokens/s and peak memory for n = 1, 2, 4 heads with the joint and the
sequential per-head backward, and greedy vs self-speculative decoding tokens/s per draft count (same prompts,
same run).

Usage: python benchmarks/mtp_throughput.py [--steps 6] [--quick] [--decode-only] [--repeats N] [--root DIR]
                                          [--json-out PATH]

Training rows run in their own subprocess each (CPU peak memory = that process's ru_maxrss high-water mark;
on CUDA torch.cuda.max_memory_allocated), with the default preset's model shape (4 x 128, vocab 4096, context
128, micro batch 16) and a larger-vocabulary shape (vocab 32768) where the heads' logits dominate memory.
Decoding rows compare plain greedy (draft 0), every fixed draft count and the adaptive draft length (the
default of generate_speculative and `lmpipe generate --speculative`) on the same prompts in one process, for a
model whose extra heads copy head 1 (drafts often right on its repetitive greedy text), a random one, and tiny
mtp2 / mtp4 models trained on a noisy successor walk; speed-up = greedy seconds / seconds (wall-clock).
--root DIR adds every trained multi-token target of that run root (evaluate's prompts: 8 windows of `val`, 48
new tokens). --repeats N measures each model N times (greedy re-timed each time) and reports the median
speed-up with its range: a decoding row lasts well under a second here, so one measurement is noise-dominated.
"""

import argparse
import statistics
import sys
from pathlib import Path

import torch
from common import emit, parse_args, peak_mib, pick_device, spawn_worker, step_seconds

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


def train_walk_model(heads: int, steps: int, noise: float) -> torch.nn.Module:
    """The tiny preset's model shape (4 x 32, 2 heads, vocab 512, context 64) with `heads` prediction heads,
    trained `steps` Adam steps on a successor walk x -> (3x + 1) mod V where a `noise` share of the tokens is
    random: the extra heads learn the walk, so their drafts are right except around the noise."""
    from schemas.configs import ModelConfig, TargetVariant
    from stages.objectives.base import Batch
    from stages.objectives.factory import build_objective

    V, T, B = 512, 64, 16
    torch.manual_seed(heads)
    objective = build_objective(ModelConfig(num_layers=4, num_heads=2, d_model=32),
                                TargetVariant(name=f"mtp{heads}", num_future_tokens=heads))
    model = objective.build_model(V, T)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        rows = [torch.randint(0, V, (B, 1))]
        for _ in range(T):
            walk, random = (3 * rows[-1] + 1) % V, torch.randint(0, V, (B, 1))
            rows.append(torch.where(torch.rand(B, 1) < noise, random, walk))
        rows = torch.cat(rows, dim=1)
        objective.step(model, Batch(rows[:, :-1], rows[:, 1:], torch.zeros(B, T, dtype=torch.long)), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model.eval()


def decoding_rows(quick: bool, repeats: int = 1, root: Path | None = None) -> list[dict]:
    """Greedy vs fixed-draft vs adaptive self-speculative decoding, same prompts, one process: a 6 x 128 4-head
    model whose extra heads copy head 1 (drafts often right on its repetitive greedy text) and a random one, and
    tiny mtp2 / mtp4 models trained on a noisy successor walk (prompts from the walk)."""
    from schemas.configs import ModelConfig
    from stages.evaluation.heads import speculative_rows
    from stages.models.gpt import GPT

    models = {}
    for kind in ("heads copy head 1", "random heads"):
        torch.manual_seed(0)
        model = GPT(ModelConfig(num_layers=6, num_heads=4, d_model=128), 4096, 256, num_future_tokens=4).eval()
        if kind == "heads copy head 1":
            for block in model.head_blocks[1:]:
                block.load_state_dict(model.head_blocks[0].state_dict())
        prompts = [torch.randint(0, 4096, (16,), generator=torch.Generator().manual_seed(i)).tolist()
                   for i in range(2 if quick else 6)]
        models[kind] = (model, prompts, 32 if quick else 96)
    for heads in (2, 4):
        model = train_walk_model(heads, 20 if quick else 150, noise=0.1)
        prompts = [[(3 ** j * i + (3 ** j - 1) // 2) % 512 for j in range(4)] for i in range(2 if quick else 6)]
        models[f"trained mtp{heads} (walk)"] = (model, prompts, 24 if quick else 56)
    models.update(run_root_models(root) if root else {})
    rows = []
    for kind, (model, prompts, new_tokens) in models.items():
        measured = [speculative_rows(model, prompts, new_tokens) for _ in range(repeats)]  # greedy, drafts, adaptive
        for row, *again in zip(*measured, strict=True):
            speedups = sorted(r["speedup"] for r in (row, *again))
            rows.append({"model": kind, **row, "draft": "adaptive" if row["adaptive"] else row["draft"],
                         "tokens_per_forward": statistics.median(r["tokens_per_forward"] for r in (row, *again)),
                         "tokens_per_s": statistics.median(r["new_tokens"] / r["seconds"] for r in (row, *again)),
                         "speedup": statistics.median(speedups), "speedup_min": speedups[0],
                         "speedup_max": speedups[-1], "repeats": repeats})
    return rows


def run_root_models(root: Path) -> dict:
    """The finished multi-token targets of a run root, with evaluate's default prompts from their token split."""
    import numpy as np

    from stages.evaluate import speculative_prompts
    from stages.models.saved import load_model
    from storage.artifacts import is_built, load_manifest
    from storage.checkpoints import read_model_meta
    from storage.windows import stream_file

    models = {}
    for directory in sorted(Path(root, "train_target").glob("*/")):
        if not is_built("train_target", directory.name, Path(root)):
            continue
        model = load_model(directory)
        if model.num_future_tokens < 2:
            continue
        tokens = load_manifest(Path(root, "tokenize_corpus", load_manifest(directory).upstream["tokens"]))
        stream = np.load(Path(tokens.path) / stream_file("val"), mmap_mode="r")
        name = read_model_meta(directory)["variant"]["name"]
        models[f"{name} {directory.name[:6]}"] = (model, speculative_prompts(stream, model.max_seq_len, 8), 48)
    return models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--decode-only", action="store_true", help="only the decoding rows")
    parser.add_argument("--repeats", type=int, default=1, help="measure each decoding model this many times")
    parser.add_argument("--root", type=Path, help="also decode with the multi-token targets of this run root")
    args = parse_args(parser, train_worker)
    steps, warmup = (2, 1) if args.quick else (args.steps, 2)
    train = []
    for shape, sizes in ({} if args.decode_only else SHAPES).items():
        for heads in (1, 2, 4):
            for backward in (("joint",) if heads == 1 else ("joint", "sequential")):
                spec = {"shape": shape, **sizes, "heads": heads, "backward": backward, "steps": steps,
                        "warmup": warmup}
                train.append(spawn_worker(__file__, spec))
    decode = decoding_rows(args.quick, args.repeats, args.root)
    emit({"train": train, "decode": decode}, markdown(train, decode), args.json_out)


def markdown(train: list[dict], decode: list[dict]) -> str:
    """The training rows and the decoding rows as two Markdown tables."""
    lines = ["| shape | heads | backward | tokens/s | peak MiB |", "|---|---|---|---|---|"]
    lines += [f"| {r['shape']} | {r['heads']} | {r['backward']} | {r['tokens_per_s']:,.0f} | {r['peak_mib']:,.0f} |"
              for r in train]
    lines += ["", "| model | drafts | tokens/forward | tokens/s | speed-up vs greedy (median, range) |",
              "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['draft']} | {r['tokens_per_forward']:.2f} | {r['tokens_per_s']:,.0f} | "
              f"{r['speedup']:.2f}x ({r['speedup_min']:.2f}-{r['speedup_max']:.2f}) |" for r in decode]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
