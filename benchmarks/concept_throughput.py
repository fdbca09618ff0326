"""CoCoMix costs, measured in one process: concept extraction tokens/s against plain reference forward passes,
and training tokens/s of the cocomix, pause and kd targets as a ratio to ntp training (same model, same run).

Usage: python benchmarks/concept_throughput.py [--steps 8] [--warmup 2] [--quick] [--json-out PATH]

- model: the default preset's shape (4 x 128, 4 heads, vocab 4096, context 128, micro batch 16), random init;
  SAE: 1024 latents (8 x 128), k 16, on the residual after block 1 (the default preset's SAE);
- `forward`: reference model(inputs) under inference_mode (the floor of any per-token pass);
- `extract`: window_concepts, extract_concepts' labelling step (forward to the SAE site, forward + backward of
  the remaining blocks for dL/dh, SAE encode, attribution over the active latents, top-4), batch 32 windows;
- training rows: stages.training.run.Trainer.step with each variant's real objective (random concept labels
  for cocomix; the reference as the kd teacher); ratio = variant tokens/s / ntp tokens/s. The official CoCoMix
  code runs its teacher forward+backward every step (a ratio of ~0.3 per research/cocomix.md); lmpipe reads
  offline labels instead.
Each timing is the median of `--steps` runs after `--warmup` (forward and extract: 2 x `--steps`, alternating);
the 1-minute load average is printed because the development machines are shared (a second torch process on 2
cores distorts everything: measure alone).
"""

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from common import emit, load_average, step_seconds

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from schemas.configs import (  # noqa: E402
    ConceptsConfig,
    DistillConfig,
    ModelConfig,
    PauseConfig,
    TargetVariant,
    TrainConfig,
)
from schemas.manifest import Manifest  # noqa: E402
from stages.models.gpt import GPT  # noqa: E402
from stages.models.sae import TopKSAE, window_concepts  # noqa: E402
from stages.objectives.factory import build_objective  # noqa: E402
from stages.training.data import WindowOrder  # noqa: E402
from stages.training.loop import Trainer, TrainRun  # noqa: E402
from stages.training.optim import BatchSchedule, build_optimizer  # noqa: E402
from storage.windows import TokenWindows  # noqa: E402

MODEL = ModelConfig(num_layers=4, num_heads=4, d_model=128)
VOCAB, SEQ_LEN, MICRO, LATENTS, K, TOP, LAYER = 4096, 128, 16, 1024, 16, 4, 1
NUM_WINDOWS = 256


def median_seconds(fn, steps: int, warmup: int) -> float:
    """Median wall time of fn() over `steps` calls after `warmup` calls."""
    return statistics.median(step_seconds(fn, steps, warmup=warmup))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="2 steps, 1 warmup: a smoke run")
    parser.add_argument("--json-out")
    args = parser.parse_args()
    steps, warmup = (2, 1) if args.quick else (args.steps, args.warmup)
    torch.manual_seed(0)
    device = torch.device("cpu")
    tmp = Path(tempfile.mkdtemp())
    stream = np.random.default_rng(0).integers(0, VOCAB, NUM_WINDOWS * SEQ_LEN + 1).astype(np.int32)
    np.save(tmp / "stream-train.npy", stream)
    windows = TokenWindows(tmp / "stream-train.npy", SEQ_LEN)
    reference = GPT(MODEL, VOCAB, SEQ_LEN).eval().requires_grad_(False)
    sae = TopKSAE(MODEL.d_model, LATENTS, K).eval()
    rows = []

    batch = 32
    inputs_BT, targets_BT = windows.batch(np.arange(batch))

    def forward():
        with torch.inference_mode():
            reference(inputs_BT)

    def extract():
        window_concepts(reference, sae, inputs_BT, targets_BT, LAYER, TOP)

    for _ in range(warmup):
        forward()
        extract()
    timed = {"forward": [], "extract": []}
    for _ in range(2 * steps):  # alternating, so a slow spell of the shared machine hits both alike
        timed["forward"] += step_seconds(forward, 1)
        timed["extract"] += step_seconds(extract, 1)
    for name, seconds in timed.items():
        rows.append({"measurement": name, "tokens_per_s": batch * SEQ_LEN / statistics.median(seconds)})

    labels = np.random.default_rng(1).integers(0, LATENTS, (len(stream), TOP)).astype(np.int32)
    concepts = Manifest(stage="extract_concepts", key="bench", path=str(tmp), code_version="bench", config={},
                        upstream={}, summary={"num_latents": LATENTS, "k": K})
    variants = [TargetVariant(name="ntp"), TargetVariant(name="cocomix", concepts=ConceptsConfig()),
                TargetVariant(name="cocomix_add", concepts=ConceptsConfig(mixing="add")),
                TargetVariant(name="pause", pause=PauseConfig()), TargetVariant(name="kd", distill=DistillConfig())]
    cfg = TrainConfig(max_tokens=10**9, batch_size_tokens=MICRO * SEQ_LEN, micro_batch_size=MICRO, device="cpu")
    schedule = BatchSchedule.of(cfg, SEQ_LEN)
    for variant in variants:
        torch.manual_seed(0)
        objective = build_objective(MODEL, variant, {"concepts": concepts})
        objective.attach({"teacher": reference})
        model = objective.build_model(VOCAB, SEQ_LEN)
        optimizer = build_optimizer(model, cfg, device)
        order = WindowOrder(len(windows), 0)
        lookups = {"concept_ids": labels} if variant.concepts else {}
        run = TrainRun(objective, windows, {}, cfg, tmp, vocab_size=VOCAB, label=variant.name, lookups=lookups)
        trainer = Trainer(run, model, optimizer, order, schedule, device)
        seconds = median_seconds(lambda t=trainer: t.step(0), steps, warmup)
        rows.append({"measurement": f"train {variant.name}", "tokens_per_s": MICRO * SEQ_LEN / seconds,
                     "params": sum(p.numel() for p in model.parameters())})
    forward_tps = rows[0]["tokens_per_s"]
    ntp_tps = next(r["tokens_per_s"] for r in rows if r["measurement"] == "train ntp")
    for row in rows:
        base = forward_tps if not row["measurement"].startswith("train") else ntp_tps
        row["ratio"] = row["tokens_per_s"] / base
    result = {"rows": rows, "load_average_1m": load_average(), "torch_threads": torch.get_num_threads(),
              "steps": steps, "warmup": warmup}
    table = ["| measurement | tokens/s | ratio (extract: to forward; train: to ntp) |", "|---|---|---|"]
    table += [f"| {row['measurement']} | {row['tokens_per_s']:,.0f} | {row['ratio']:.2f} |" for row in rows]
    emit(result, "\n".join(table), args.json_out)


if __name__ == "__main__":
    main()
