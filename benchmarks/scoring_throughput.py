"""Scoring throughput: forward + per-token loss/entropy against the bare forward pass, in one process.

    python benchmarks/scoring_throughput.py [--quick] [--repeats 9] [--batch 32] [--json-out PATH]

Model: stages.models.gpt.GPT, random init, the default preset's shape (ModelConfig(num_layers=4, num_heads=4,
d_model=128), swiglu), vocab 4096, seq_len 128; inputs: `--batch` windows of random token ids. CPU, fp32
(what score_reference runs on CPU), torch.inference_mode. Measured, per batch:
- forward:             `model(inputs)` only (the baseline, ratio 1.0);
- forward + old:       the former score_reference.score_logits (log_softmax, gather, exp * logp sum; copied below);
- forward + new:       stages.models.losses.token_loss_and_entropy on the logits;
- hidden + fused:      the model up to the final norm (lm_head swapped for Identity), then
                       losses.hidden_loss_and_entropy(h, lm_head.weight, targets): no (B, T, V) logits tensor;
- forward + CE:        loss only, F.cross_entropy (the former gpt.per_token_loss), what evaluation runs;
- forward + token_loss: loss only, losses.token_loss.
Variants run round-robin inside each repeat (so load drift hits all of them alike); tokens/s per repeat =
calls * batch * seq_len / seconds; reported: median and best over repeats, ratio = variant / forward tokens/s
(median: `ratio`; best: `ratio best`). The machine may be shared: the busy fraction of all CPUs before the run
(and, with --wait-quiet, before each repeat, after waiting for < 25% busy) and the 1-minute load average before
and after are in the JSON; rerun when the median and best disagree much.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import emit, load_average
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from schemas.configs import ModelConfig  # noqa: E402
from stages.models.gpt import GPT  # noqa: E402
from stages.models.losses import hidden_loss_and_entropy, token_loss, token_loss_and_entropy  # noqa: E402

VOCAB, SEQ_LEN = 4096, 128


def old_score_logits(logits_BTV: torch.Tensor, targets_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """score_reference.score_logits before stages.models.losses (the reference being replaced)."""
    logp_BTV = F.log_softmax(logits_BTV.float(), dim=-1)
    loss_BT = -logp_BTV.gather(-1, targets_BT.unsqueeze(-1)).squeeze(-1)
    entropy_BT = -(logp_BTV.exp() * logp_BTV).sum(-1)
    return loss_BT, entropy_BT


def old_per_token_loss(logits_BTV: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
    """gpt.per_token_loss before stages.models.losses."""
    B, T, V = logits_BTV.shape
    return F.cross_entropy(logits_BTV.float().reshape(B * T, V), targets_BT.reshape(B * T),
                           reduction="none").view(B, T)


def cpu_busy_fraction(seconds: float = 0.5) -> float:
    """Fraction of all CPUs busy over `seconds` (from /proc/stat; NaN where unavailable)."""
    def read():
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(values), values[3] + values[4]
    try:
        total0, idle0 = read()
        time.sleep(seconds)
        total1, idle1 = read()
    except OSError:
        return float("nan")
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def wait_quiet(max_seconds: float, threshold: float = 0.25) -> float:
    """Wait (up to max_seconds) until under `threshold` of the CPUs are busy; returns the last busy fraction."""
    deadline = time.monotonic() + max_seconds
    busy = cpu_busy_fraction()
    while busy > threshold and time.monotonic() < deadline:
        busy = cpu_busy_fraction()
    return busy


def build(batch: int, seed: int = 0):
    torch.manual_seed(seed)
    model = GPT(ModelConfig(num_layers=4, num_heads=4, d_model=128), VOCAB, SEQ_LEN).eval()
    tokens = torch.randint(0, VOCAB, (batch, SEQ_LEN + 1))
    return model, tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def final_hidden(model: nn.Module, inputs_BT: torch.Tensor) -> torch.Tensor:
    """What model.lm_head reads (after the final norm), via the model's own forward with lm_head = Identity."""
    lm_head = model.lm_head
    model.lm_head = nn.Identity()
    try:
        return model(inputs_BT)
    finally:
        model.lm_head = lm_head


def variants(model: nn.Module, inputs_BT: torch.Tensor, targets_BT: torch.Tensor) -> dict:
    weight = model.lm_head.weight
    return {
        "forward": lambda: model(inputs_BT),
        "forward + old score_logits": lambda: old_score_logits(model(inputs_BT), targets_BT),
        "forward + token_loss_and_entropy": lambda: token_loss_and_entropy(model(inputs_BT), targets_BT),
        "hidden + hidden_loss_and_entropy": lambda: hidden_loss_and_entropy(final_hidden(model, inputs_BT), weight,
                                                                            targets_BT),
        "forward + F.cross_entropy (loss only)": lambda: old_per_token_loss(model(inputs_BT), targets_BT),
        "forward + token_loss (loss only)": lambda: token_loss(model(inputs_BT), targets_BT),
    }


def check_outputs(model, inputs_BT, targets_BT) -> dict:
    """Max abs differences of the new functions from the old formulas on this batch."""
    with torch.inference_mode():
        logits_BTV = model(inputs_BT)
        old_loss, old_entropy = old_score_logits(logits_BTV, targets_BT)
        new_loss, new_entropy = token_loss_and_entropy(logits_BTV, targets_BT)
        fused_loss, fused_entropy = hidden_loss_and_entropy(final_hidden(model, inputs_BT), model.lm_head.weight,
                                                            targets_BT)
        ce = old_per_token_loss(logits_BTV, targets_BT)
        diff = lambda a, b: float((a - b).abs().max())  # noqa: E731
        return {"new_loss": diff(new_loss, old_loss), "new_entropy": diff(new_entropy, old_entropy),
                "fused_loss": diff(fused_loss, old_loss), "fused_entropy": diff(fused_entropy, old_entropy),
                "token_loss": diff(token_loss(logits_BTV, targets_BT), ce)}


def measure(batch: int, repeats: int, warmup: int, calls: int, quiet_s: float) -> tuple[dict, list[float]]:
    model, inputs_BT, targets_BT = build(batch)
    fns = variants(model, inputs_BT, targets_BT)
    seconds = {name: [] for name in fns}
    busy = []
    with torch.inference_mode():
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        for _ in range(repeats):
            if quiet_s > 0:
                busy.append(round(wait_quiet(quiet_s), 3))
            for name, fn in fns.items():
                started = time.perf_counter()
                for _ in range(calls):
                    fn()
                seconds[name].append((time.perf_counter() - started) / calls)
    tokens = batch * SEQ_LEN
    rows = {}
    for name, values in seconds.items():
        rows[name] = {"tokens_per_s": tokens / statistics.median(values), "tokens_per_s_best": tokens / min(values),
                      "ms_per_batch": 1e3 * statistics.median(values), "ms_per_batch_best": 1e3 * min(values)}
    base = rows["forward"]
    for row in rows.values():
        row["ratio"] = row["tokens_per_s"] / base["tokens_per_s"]
        row["ratio_best"] = row["tokens_per_s_best"] / base["tokens_per_s_best"]
        row["overhead_ms"] = row["ms_per_batch"] - base["ms_per_batch"]
    return rows, busy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short run: 3 repeats, 1 warmup, 1 call each")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--calls", type=int, default=3, help="calls per variant per repeat")
    parser.add_argument("--batch", type=int, default=32, help="windows per batch")
    parser.add_argument("--wait-quiet", type=float, default=30.0, metavar="SECONDS",
                        help="before each repeat wait up to this long for the CPUs to be < 25%% busy (0: never)")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.warmup, args.calls = 3, 1, 1
    busy = cpu_busy_fraction()
    load_before = load_average()
    rows, busy_per_repeat = measure(args.batch, args.repeats, args.warmup, args.calls, args.wait_quiet)
    model, inputs_BT, targets_BT = build(args.batch)
    result = {
        "config": {"num_layers": 4, "num_heads": 4, "d_model": 128, "mlp": "swiglu", "vocab_size": VOCAB,
                   "seq_len": SEQ_LEN, "batch": args.batch, "repeats": args.repeats, "warmup": args.warmup,
                   "calls": args.calls, "threads": torch.get_num_threads(), "torch": torch.__version__,
                   "device": "cpu"},
        "cpu_busy_before": round(busy, 3), "cpu_busy_before_each_repeat": busy_per_repeat,
        "load_before": load_before, "load_after": load_average(),
        "max_abs_diff_vs_old": check_outputs(model, inputs_BT, targets_BT),
        "rows": rows,
    }
    lines = [f"{args.batch} x {SEQ_LEN} tokens per batch, {args.repeats} repeats x {args.calls} calls, "
             f"{torch.get_num_threads()} threads; CPU busy before {busy:.0%}", "",
             "| variant | tokens/s (median) | best tokens/s | ms/batch | overhead ms | ratio | ratio best |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {name} | {row['tokens_per_s']:,.0f} | {row['tokens_per_s_best']:,.0f} | {row['ms_per_batch']:.1f} "
              f"| {row['overhead_ms']:+.1f} | {row['ratio']:.3f} | {row['ratio_best']:.3f} |"
              for name, row in rows.items()]
    emit(result, "\n".join(lines), args.json_out)


if __name__ == "__main__":
    main()
