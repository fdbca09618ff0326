"""Stage evaluate: compare the reference and every target variant on the same held-out tokens.

Output files in `out`:
    eval_losses.parquet    schemas.tables.EVAL_LOSSES (model, split, num_tokens, loss, perplexity): each model on
                           the first evaluate.max_windows windows of `val` and `ref_val` and of each extra file
                           (split `file:<name>`, tokenized with the corpus tokenizer and packed with <|endoftext|>)
    comparison.parquet     schemas.tables.COMPARISON: one row per model with final losses, tokens seen to reach the
                           baseline's final validation loss (and the ratio to the baseline's), dynamics fractions
    token_dynamics.parquet schemas.tables.TOKEN_DYNAMICS of every target that recorded >= 2 probe checkpoints
    report.md              the comparison as a Markdown table, plus the train split's unigram entropy
    val_loss.png           validation loss vs tokens seen per variant (one subplot per validation split)
    train_loss.png         training loss vs tokens seen per variant
"""

import logging
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from tokenizers import Tokenizer

from schemas.configs import DynamicsConfig, EvaluateConfig, PipelineConfig
from schemas.manifest import Manifest
from schemas.tables import COMPARISON, EVAL_LOSSES, TOKEN_DYNAMICS
from stages.corpus.packing import pack_stream
from stages.corpus.tokenizers import EOT, encode_documents
from stages.evaluation import dynamics
from stages.models.saved import load_model
from stages.registry import NodeDecl, Stage
from stages.training.devices import resolve_device
from stages.training.windowed import token_losses
from storage.catalog import TableSpec
from storage.parquet import read_table, write_table
from storage.windows import TokenWindows, stream_file

log = logging.getLogger(__name__)

VAL_SPLITS = ("val", "ref_val")
REFERENCE = "reference"
EVAL_BATCH_WINDOWS = 16
FRACTION_COLUMNS = ("frac_h_to_h", "frac_l_to_h", "frac_h_to_l", "frac_l_to_l")
"""comparison.parquet columns of dynamics.CATEGORIES, in that order."""


def variant_name(target: Manifest) -> str:
    """The variant name of a train_target artifact."""
    return str(target.config["variant"]["name"])


def extra_file_stream(tokens: Manifest, path: str) -> np.ndarray:
    """A text file tokenized with the corpus tokenizer and packed like a corpus document (tokens + EOT)."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"evaluate.extra_files: {path!r} does not exist; give paths of existing .txt files")
    tokenizer = Tokenizer.from_file(tokens.file("tokenizer.json"))
    flat_ids, lengths, _ = encode_documents(tokenizer, [file.read_text(encoding="utf-8")])
    stream, _, _ = pack_stream(flat_ids, np.zeros(1, np.int64), lengths, np.zeros(1, np.int64),
                               tokenizer.token_to_id(EOT))
    if len(stream) < 2:
        raise ValueError(f"evaluate.extra_files: {path!r} has no text to evaluate")
    return stream


def mean_window_loss(model, stream_N: np.ndarray, seq_len: int, max_windows: int,
                     device: torch.device) -> tuple[int, float]:
    """(targets, mean loss in nats) over the first max_windows windows (one short window if none is full)."""
    windows = TokenWindows.from_array(stream_N, min(seq_len, len(stream_N) - 1), "eval")
    loss_NT = token_losses(model, windows, np.arange(min(len(windows), max_windows)), EVAL_BATCH_WINDOWS, device)
    return loss_NT.size, float(loss_NT.astype(np.float64).mean())


def first_reach(tokens_seen: np.ndarray, values: np.ndarray, level: float) -> float | None:
    """Tokens seen when a loss curve first reaches `level`, linearly interpolated between evals; None if never."""
    hits = np.flatnonzero(values <= level)
    if not len(hits):
        return None
    i = int(hits[0])
    if i == 0:
        return float(tokens_seen[0])
    t0, t1, v0, v1 = float(tokens_seen[i - 1]), float(tokens_seen[i]), float(values[i - 1]), float(values[i])
    return t0 + (v0 - level) / (v0 - v1) * (t1 - t0)


def metric_curve(metrics: pa.Table, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(tokens_seen, value) of one metric sorted by tokens seen; a repeated eval keeps its last value."""
    rows = metrics.filter(pc.equal(metrics["name"], name)).sort_by([("tokens_seen", "ascending"),
                                                                            ("step", "ascending")])
    tokens_seen, values = rows["tokens_seen"].to_numpy(), rows["value"].to_numpy().astype(np.float64)
    keep = np.append(tokens_seen[1:] != tokens_seen[:-1], True) if len(tokens_seen) else np.zeros(0, bool)
    return tokens_seen[keep], values[keep]


def tokens_to_reach(metrics: dict[str, pa.Table], baseline: str, split: str) -> dict[str, tuple]:
    """Per variant: (tokens seen to reach the baseline's final `val/<split>/loss`, ratio to the baseline's)."""
    if baseline not in metrics:
        raise ValueError(f"evaluate.baseline: {baseline!r} is not among the targets {sorted(metrics)}")
    curves = {name: metric_curve(table, f"val/{split}/loss") for name, table in metrics.items()}
    if not len(curves[baseline][1]):
        return {name: (None, None) for name in curves}
    level = float(curves[baseline][1][-1])
    base_tokens = first_reach(*curves[baseline], level)
    result = {}
    for name, (tokens_seen, values) in curves.items():
        reached = first_reach(tokens_seen, values, level)
        ratio = reached / base_tokens if reached is not None and base_tokens else None
        result[name] = (reached, ratio)
    return result


def unigram_entropy(stream_N: np.ndarray, vocab_size: int, chunk: int = 1 << 24) -> float:
    """Entropy in nats/token of the token frequencies of a stream (counted chunk by chunk)."""
    counts_V = np.zeros(vocab_size, np.int64)
    for start in range(0, len(stream_N), chunk):
        counts_V += np.bincount(np.asarray(stream_N[start:start + chunk]), minlength=vocab_size)[:vocab_size]
    p_V = counts_V[counts_V > 0] / counts_V.sum()
    return float(-(p_V * np.log(p_V)).sum())


def dynamics_threshold(target: Manifest) -> float:
    """delta_threshold of the target's dynamics config (TargetRun or {target, variant} layout)."""
    config = target.config.get("dynamics") or target.config.get("target", {}).get("dynamics") or {}
    return float(config.get("delta_threshold", DynamicsConfig().delta_threshold))


def plot_curves(metrics: dict[str, pa.Table], eval_losses: dict, out: Path) -> list[str]:
    """val_loss.png (one subplot per validation split) and train_loss.png; returns the file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(VAL_SPLITS), figsize=(6 * len(VAL_SPLITS), 4), squeeze=False)
    for ax, split in zip(axes[0], VAL_SPLITS, strict=True):
        for name, table in metrics.items():
            ax.plot(*metric_curve(table, f"val/{split}/loss"), marker=".", label=name)
        if (REFERENCE, split) in eval_losses:
            ax.axhline(eval_losses[REFERENCE, split], color="grey", linestyle="--", label="reference (final)")
        ax.set(title=f"validation loss: {split}", xlabel="tokens seen", ylabel="loss (nats/token)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "val_loss.png", dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, table in metrics.items():
        ax.plot(*metric_curve(table, "train/head1/loss"), label=name)
    # head1/loss is the next-token loss over ALL tokens; train/loss is what each objective optimises (selected
    # tokens only, or a sum over heads), which is not comparable between variants
    ax.set(title="training next-token loss (all tokens)", xlabel="tokens seen", ylabel="loss (nats/token)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "train_loss.png", dpi=100)
    plt.close(fig)
    return ["val_loss.png", "train_loss.png"]


def selection_summary(metrics: dict[str, pa.Table], last_fraction: float = 0.1) -> list[dict]:
    """Selecting variants: selected fraction and loss on selected / unselected tokens, averaged over the last
    `last_fraction` of logged steps."""
    rows = []
    for name, table in metrics.items():
        steps, fraction = metric_curve(table, "train/selected_fraction")
        if not len(steps):
            continue
        row = {"model": name}
        for key in ("selected_fraction", "loss_selected", "loss_unselected"):
            _, values = metric_curve(table, f"train/{key}")
            tail = values[-max(1, int(len(values) * last_fraction)):]
            row[key] = float(np.mean(tail)) if len(tail) else float("nan")
        rows.append(row)
    return rows


def _fmt(value, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def report_markdown(rows: list[dict], entropy: float, baseline: str, extra: list[dict],
                    selection: list[dict] = ()) -> str:
    """report.md text: the comparison table, extra-file losses and the unigram-entropy reference line."""
    head = ["model", "val loss", "val ppl", "ref_val loss", "ref_val ppl", f"tokens to {baseline} val", "ratio",
            f"tokens to {baseline} ref_val", "ratio", "H->H", "L->H", "H->L", "L->L"]
    specs = [".4f", ".2f", ".4f", ".2f", ",.0f", ".3f", ",.0f", ".3f", ".1%", ".1%", ".1%", ".1%"]
    keys = COMPARISON.names[1:]
    lines = ["# lmpipe evaluation", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join([row["model"]] + [_fmt(row[k], f) for k, f in zip(keys, specs, strict=True)]) + " |"
              for row in rows]
    lines += ["", f"- Unigram entropy of the train split: {entropy:.4f} nats/token (the train loss of the best "
              "context-free model).",
              f"- Tokens to reach: tokens seen when the training-time `val/<split>/loss` first reached {baseline}'s "
              "final value (linear interpolation between evaluations); ratio < 1 means fewer tokens than the baseline.",
              "- H->H ... L->L: share of probe tokens per loss-trajectory class (Rho-1 sec 2.1; "
              "token_dynamics.parquet)."]
    if selection:
        lines += ["", "Token selection during training (mean over the last 10% of steps; next-token head, nats):",
                  "", "| model | selected | loss on selected | loss on unselected |", "|---|---|---|---|"]
        lines += [f"| {r['model']} | {_fmt(r['selected_fraction'], '.1%')} | {_fmt(r['loss_selected'], '.4f')} | "
                  f"{_fmt(r['loss_unselected'], '.4f')} |" for r in selection]
    if extra:
        lines += ["", "| model | file | tokens | loss | ppl |", "|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['split']} | {r['num_tokens']} | {r['loss']:.4f} | {r['perplexity']:.2f} |"
                  for r in extra]
    return "\n".join(lines) + "\n"


def run(cfg: EvaluateConfig, inputs: dict[str, Manifest], out: Path) -> dict:
    """Evaluate every model, compare training curves and token dynamics; write tables, report and plots."""
    tokens, reference = inputs["tokens"], inputs["reference"]
    targets = [manifest for role, manifest in inputs.items() if role.startswith("target.")]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device("auto")
    seq_len = int(tokens.config["seq_len"])
    names = [variant_name(t) for t in targets]
    if REFERENCE in names or len(set(names)) != len(names):
        raise ValueError(f"target variant names must be unique and not {REFERENCE!r}, got {names}")
    if cfg.baseline not in names:
        raise ValueError(f"evaluate.baseline: {cfg.baseline!r} is not among the target variants {names}")
    metrics = {}  # read first: a broken target fails before any model is evaluated
    for name, target in zip(names, targets, strict=True):
        path = Path(target.file("metrics.parquet"))
        if not path.is_file():
            raise ValueError(f"target {name!r} has no metrics.parquet in {target.path}; rebuild it (train_target)")
        metrics[name] = read_table(path)
    streams = {split: np.load(Path(tokens.path) / stream_file(split), mmap_mode="r") for split in VAL_SPLITS}
    for path in cfg.extra_files:
        split = f"file:{Path(path).name}"
        if split in streams:
            raise ValueError(f"evaluate.extra_files: two files are named {Path(path).name!r}; rename one")
        streams[split] = extra_file_stream(tokens, path)

    eval_rows = []
    for name, manifest in [(REFERENCE, reference)] + list(zip(names, targets, strict=True)):
        model = load_model(Path(manifest.path), device)
        for split, stream_N in streams.items():
            num_tokens, loss = mean_window_loss(model, stream_N, seq_len, cfg.max_windows, device)
            eval_rows.append({"model": name, "split": split, "num_tokens": num_tokens, "loss": loss,
                              "perplexity": math.exp(min(loss, 700.0))})
            log.info("%s on %s: loss %.4f over %d tokens", name, split, loss, num_tokens)
        del model
    write_table(out / "eval_losses.parquet", pa.Table.from_pylist(eval_rows, EVAL_LOSSES), EVAL_LOSSES)
    losses = {(r["model"], r["split"]): r["loss"] for r in eval_rows}

    reach = {split: tokens_to_reach(metrics, cfg.baseline, split) for split in VAL_SPLITS}

    dynamics_tables, fractions = [], {}
    for name, target in zip(names, targets, strict=True):
        probe_path = Path(target.file("probe_losses.parquet"))
        if probe_path.is_file():
            probe = read_table(probe_path)
            if len(np.unique(probe["step"].to_numpy())) < 2:
                log.info("%s: probe losses at fewer than 2 checkpoints; no token dynamics", name)
                continue
            dynamics_tables.append(dynamics.classify(probe, dynamics_threshold(target), variant=name))
            fractions[name] = dynamics.fractions(dynamics_tables[-1])
    write_table(out / "token_dynamics.parquet",
                pa.concat_tables(dynamics_tables) if dynamics_tables else TOKEN_DYNAMICS.empty_table(), TOKEN_DYNAMICS)

    rows = []
    for name in [REFERENCE] + names:
        row = {"model": name}
        for split in VAL_SPLITS:
            row[f"{split}_loss"] = losses[name, split]
            row[f"{split}_perplexity"] = math.exp(min(losses[name, split], 700.0))
        for split in VAL_SPLITS:
            row[f"tokens_to_baseline_{split}"], row[f"ratio_to_baseline_{split}"] = reach[split].get(name, (None, None))
        for category, column in zip(dynamics.CATEGORIES, FRACTION_COLUMNS, strict=True):
            row[column] = fractions.get(name, {}).get(category)
        rows.append(row)
    write_table(out / "comparison.parquet", pa.Table.from_pylist(rows, COMPARISON), COMPARISON)

    train_stream = np.load(Path(tokens.path) / stream_file("train"), mmap_mode="r")
    vocab_size = int(tokens.summary.get("vocab_size") or int(train_stream.max()) + 1)
    entropy = unigram_entropy(train_stream, vocab_size)
    extra = [r for r in eval_rows if r["split"].startswith("file:")]
    (out / "report.md").write_text(report_markdown(rows, entropy, cfg.baseline, extra, selection_summary(metrics)))
    plots = plot_curves(metrics, losses, out)
    summary = {
        "final_losses": {name: {s: losses[name, s] for s in streams} for name in [REFERENCE] + names},
        "tokens_to_baseline": {s: {n: v[0] for n, v in r.items()} for s, r in reach.items()},
        "dynamics_fractions": fractions,
        "unigram_entropy_nats": entropy,
        "files": ["eval_losses.parquet", "comparison.parquet", "token_dynamics.parquet", "report.md", *plots],
    }
    log.info("evaluate: %s", summary)
    return summary


def nodes(cfg: PipelineConfig) -> list[NodeDecl]:
    """One evaluation of the reference and every target variant."""
    upstream = {"tokens": "tokenize_corpus", "reference": "train_reference"}
    upstream |= {f"target.{v.name}": f"train_target.{v.name}" for v in cfg.target.variants}
    return [NodeDecl("evaluate", cfg.evaluate, upstream)]


STAGE = Stage(
    name="evaluate", code_version="1", config_type=EvaluateConfig, nodes=nodes, run=run,
    tables={"eval_losses": TableSpec("evaluate", "eval_losses.parquet"),
            "comparison": TableSpec("evaluate", "comparison.parquet"),
            "token_dynamics": TableSpec("evaluate", "token_dynamics.parquet")},
    description="comparison tables, plots, token dynamics",
)
