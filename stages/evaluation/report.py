"""The evaluation report: Markdown tables and matplotlib plots of the comparison."""

import math
from pathlib import Path

import pyarrow as pa

from schemas.configs import variant_of
from schemas.tables import COMPARISON
from stages.evaluation.curves import metric_curve

VAL_SPLITS = ("val", "ref_val")
REFERENCE = "reference"


def plot_curves(metrics: dict[str, pa.Table], eval_losses: dict, out: Path,
                flops_per_token: dict[str, float] | None = None) -> list[str]:
    """val_loss.png (one subplot per validation split), train_loss.png and, given FLOPs per token,
    val_loss_flops.png; returns the file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    style = _line_styles(list(metrics))
    fig, axes = plt.subplots(1, len(VAL_SPLITS), figsize=(6 * len(VAL_SPLITS), 4), squeeze=False)
    for ax, split in zip(axes[0], VAL_SPLITS, strict=True):
        curves = [metric_curve(table, f"val/{split}/loss") for table in metrics.values()]
        for name, curve in zip(metrics, curves, strict=True):
            ax.plot(*curve, marker=".", **style[name])
        reference = [eval_losses[REFERENCE, split]] if (REFERENCE, split) in eval_losses else []
        for value in reference:
            ax.axhline(value, color="grey", linestyle="--", label="reference (final)")
        _zoom(ax, curves, also=reference)
        ax.set(title=f"validation loss: {split}", xlabel="tokens seen", ylabel="loss (nats/token)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "val_loss.png", dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    curves = [metric_curve(table, "train/head1/loss") for table in metrics.values()]
    for name, curve in zip(metrics, curves, strict=True):
        ax.plot(*curve, **style[name])
    _zoom(ax, curves)
    # head1/loss is the next-token loss over ALL tokens; train/loss is what each objective optimises (selected
    # tokens only, or a sum over heads), which is not comparable between variants
    ax.set(title="training next-token loss (all tokens)", xlabel="tokens seen", ylabel="loss (nats/token)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "train_loss.png", dpi=100)
    plt.close(fig)
    files = ["val_loss.png", "train_loss.png"]
    if flops_per_token:
        fig, ax = plt.subplots(figsize=(6, 4))
        curves = [(tokens_seen * flops_per_token[name], values) for name, (tokens_seen, values)
                  in ((name, metric_curve(table, "val/val/loss")) for name, table in metrics.items())]
        for name, curve in zip(metrics, curves, strict=True):
            ax.plot(*curve, marker=".", **style[name])
        _zoom(ax, curves)
        ax.set(title="validation loss (val) at equal training compute", xlabel="training FLOPs",
               ylabel="loss (nats/token)", xscale="log")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "val_loss_flops.png", dpi=100)
        plt.close(fig)
        files.append("val_loss_flops.png")
    return files


def _zoom(ax, curves: list[tuple], skip_fraction: float = 0.15, also: list[float] = ()) -> None:
    """y range of the curves after the first skip_fraction of the x range (the untrained start, ~log V, would
    squash the differences that matter) and of the `also` values; the start stays in the data, off the top."""
    import numpy as np

    x_max = max((float(np.max(x)) for x, _ in curves if len(x)), default=0.0)
    tail = np.concatenate([y[x >= skip_fraction * x_max] for x, y in curves if len(x)] + [np.asarray(also, float)])
    if len(tail) and np.isfinite(tail).all() and tail.max() > tail.min():
        pad = 0.05 * (tail.max() - tail.min())
        ax.set_ylim(tail.min() - pad, tail.max() + pad)


def _line_styles(names: list[str]) -> dict[str, dict]:
    """One colour per variant; its seed runs share it and only the first is in the legend."""
    variants = list(dict.fromkeys(variant_of(name) for name in names))
    styles, labelled = {}, set()
    for name in names:
        variant = variant_of(name)
        styles[name] = {"color": f"C{variants.index(variant) % 10}", "linewidth": 1.2,
                        "label": None if variant in labelled else variant}
        labelled.add(variant)
    return styles


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


def compute_markdown(rows: list[dict], baseline: str) -> str:
    """The compute-ledger section of report.md."""
    lines = ["", "Training compute (val split; FLOPs = 3 x forward matmul FLOPs, stages/evaluation/flops.py; "
             "upstream = the reference's training, scoring, SAE and concept labels the model reads, paid once):", "",
             f"| model | params | train FLOPs/token | train FLOPs | val loss at {baseline}'s FLOPs | "
             f"FLOPs to {baseline} val | ratio | upstream FLOPs | FLOPs to {baseline} val with upstream | ratio |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['num_params']:,} | {r['train_flops_per_token']:.4g} | "
                     f"{_fmt(r['train_flops'], '.3g')} | "
                     f"{_fmt(r['val_loss_at_baseline_flops'], '.4f')} | {_fmt(r['flops_to_baseline_val'], '.3g')} | "
                     f"{_fmt(r['flops_ratio_to_baseline_val'], '.3f')} | {_fmt(r['upstream_flops'], '.3g')} | "
                     f"{_fmt(r['flops_to_baseline_val_with_upstream'], '.3g')} | "
                     f"{_fmt(r['flops_ratio_with_upstream'], '.3f')} |")
    return "\n".join(lines) + "\n"


SEED_LABELS = {"val_loss": ("val loss", ".4f"), "ref_val_loss": ("ref_val loss", ".4f"),
               "tokens_to_baseline_val": ("tokens to baseline val", ",.0f"),
               "tokens_to_baseline_ref_val": ("tokens to baseline ref_val", ",.0f"),
               "val_loss_at_baseline_flops": ("val loss at baseline FLOPs", ".4f"),
               "flops_to_baseline_val": ("FLOPs to baseline val", ".3g"), "frac_h_to_l": ("H->L share", ".3f")}


def seeds_markdown(rows: list[dict]) -> str:
    """Mean ± sample std over seed runs per variant (only when some variant has several runs); a `~` marks a
    difference to the baseline smaller than its spread, `k/n` how many of n runs have a value."""
    if not any(r["models"] > 1 for r in rows):
        return ""
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    metrics = [m for m in SEED_LABELS if any(r["metric"] == m for r in rows)]
    cell = {(r["variant"], r["metric"]): r for r in rows}
    lines = ["", "Across seed runs (mean ± sample std; `~` = the difference to the baseline is smaller than its "
             "spread sqrt(std² + std_baseline²), i.e. not distinguishable from seed noise; seed_summary.parquet):", "",
             "| variant | runs | " + " | ".join(SEED_LABELS[m][0] for m in metrics) + " |",
             "|---|---|" + "---|" * len(metrics)]
    for variant in variants:
        cells = []
        for metric in metrics:
            r, spec = cell.get((variant, metric)), SEED_LABELS[metric][1]
            if r is None or r["mean"] is None:
                cells.append("never" if r is not None and r["models"] else "-")
                continue
            text = format(r["mean"], spec) + (f" ± {format(r['std'], spec)}" if r["std"] is not None else "")
            text += f" ({r['runs']}/{r['models']})" if r["runs"] < r["models"] else ""
            cells.append(text + (" ~" if r["within_spread"] else ""))
        lines.append(f"| {variant} | {max(r['models'] for r in rows if r['variant'] == variant)} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def domains_markdown(rows: list[dict]) -> str:
    """Selection and excess loss inside vs outside the reference subset (selection_by_domain.parquet)."""
    if not rows:
        return ""
    lines = ["", "Selection on `train` by side of the reference subset (documents the reference never trained on; "
             "losses on windows spread over `train`):", "",
             "| model | reference subset | documents | tokens | selected | reference loss | target loss | "
             "excess loss |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {'in' if r['in_reference_subset'] else 'out'} | {r['documents']} | {r['tokens']:,} | "
              f"{_fmt(r['selection_rate'], '.1%')} | {_fmt(r['mean_ref_loss'], '.4f')} | "
              f"{_fmt(r['mean_target_loss'], '.4f')} | {_fmt(r['mean_excess_loss'], '.4f')} |" for r in rows]
    return "\n".join(lines) + "\n"


def concept_markdown(rows: list[dict], sae=None) -> str:
    """The SAE's final quality (a train_sae manifest, when given) and concept prediction of the CoCoMix variants."""
    lines = []
    if sae is not None:
        m = sae.summary
        lines += ["", f"Sparse autoencoder (train_sae, layer {m.get('layer')}, {m.get('num_latents')} latents, "
                  f"k = {m.get('k')}, on `val`):", "",
                  "| FVU | L0 | dead latents | reference loss | with the reconstruction spliced in | increase |",
                  "|---|---|---|---|---|---|",
                  f"| {_fmt(m.get('fvu'), '.4f')} | {_fmt(m.get('l0'), '.1f')} | "
                  f"{_fmt(m.get('dead_fraction'), '.1%')} | "
                  f"{_fmt(m.get('clean_loss'), '.4f')} | {_fmt(m.get('spliced_loss'), '.4f')} | "
                  f"{_fmt(m.get('spliced_loss_increase'), '.4f')} |"]
    if rows:
        lines += ["", "Concept prediction during training (mean over the last 10% of steps):", "",
                  "| model | concept loss (CE over the K labels) | top-1 predicted concept among the labels |",
                  "|---|---|---|"]
        lines += [f"| {r['model']} | {_fmt(r['concept_loss'], '.4f')} | {_fmt(r['top1_in_labels'], '.1%')} |"
                  for r in rows]
    return "\n".join(lines) + "\n" if lines else ""


def heads_markdown(head_rows: list[dict], speculative: list[dict]) -> str:
    """Per-head accuracy and self-speculative decoding speed of the multi-token models."""
    if not head_rows:
        return ""
    lines = ["", "Multi-token heads on val (head i predicts token t+i; head_metrics.parquet):", "",
             "| model | head | loss | top-1 accuracy |", "|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['head']} | {r['loss']:.4f} | {r['accuracy']:.1%} |"
              for r in head_rows if r["split"] == "val"]
    lines += ["", "Self-speculative greedy decoding (identical output; draft 0 = plain greedy; speculative.parquet):",
              "", "| model | drafts | new tokens | forwards | tokens/forward | seconds | speed-up |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['draft']} | {r['new_tokens']} | {r['forwards']} | {r['tokens_per_forward']:.2f} | "
              f"{r['seconds']:.2f} | {r['speedup']:.2f}x |" for r in speculative]
    return "\n".join(lines) + "\n"
