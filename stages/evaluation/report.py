"""The evaluation report: Markdown tables and matplotlib plots of the comparison."""

import math
from pathlib import Path

import pyarrow as pa

from schemas.configs import variant_of
from schemas.configs.pipeline import REFERENCE_NAME as REFERENCE
from stages.evaluation.curves import metric_curve

VAL_SPLITS = ("val", "ref_val")


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


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> list[str]:
    """Markdown table lines: columns are (key, header, format spec); None/NaN print as `-`."""
    lines = ["| " + " | ".join(header for _, header, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row.get(key), spec) for key, _, spec in columns) + " |" for row in rows]
    return lines


def _fmt(value, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def report_markdown(rows: list[dict], entropy: float, baseline: str, extra: list[dict],
                    selection: list[dict] = ()) -> str:
    """report.md text: the comparison tables (losses and tokens to the baseline; token dynamics), extra-file
    losses and the unigram-entropy reference line. Tables stay narrow enough for the Prefect UI's page."""
    lines = ["# lmpipe evaluation", ""]
    lines += markdown_table(rows, [("model", "model", "s"), ("val_loss", "val loss", ".4f"),
                                   ("ref_val_loss", "ref_val loss", ".4f"),
                                   ("tokens_to_baseline_val", f"tokens to {baseline} val", ",.0f"),
                                   ("ratio_to_baseline_val", "ratio", ".3f"),
                                   ("tokens_to_baseline_ref_val", f"tokens to {baseline} ref_val", ",.0f"),
                                   ("ratio_to_baseline_ref_val", "ratio", ".3f")])
    lines += [""] + markdown_table([r for r in rows if r["frac_h_to_l"] is not None], [
        ("model", "model", "s"), ("frac_h_to_h", "H->H", ".1%"), ("frac_l_to_h", "L->H", ".1%"),
        ("frac_h_to_l", "H->L", ".1%"), ("frac_l_to_l", "L->L", ".1%")])
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
    lines = ["", "Training compute (val split; FLOPs = 3 x forward matmul FLOPs, stages/evaluation/flops.py):", ""]
    lines += markdown_table(rows, [("model", "model", "s"), ("num_params", "params", ","),
                                   ("train_flops_per_token", "train FLOPs/token", ".4g"),
                                   ("train_flops", "train FLOPs", ".3g"),
                                   ("val_loss_at_baseline_flops", f"val loss at {baseline}'s FLOPs", ".4f"),
                                   ("flops_to_baseline_val", f"FLOPs to {baseline} val", ".3g"),
                                   ("flops_ratio_to_baseline_val", "ratio", ".3f")])
    lines += ["", "Counting what each model's inputs cost once (the reference's training, scoring, the SAE and "
              "concept labels it reads; Rho-1 Sec. 3.4 discusses both views):", ""]
    lines += markdown_table(rows, [("model", "model", "s"), ("upstream_flops", "upstream FLOPs", ".3g"),
                                   ("flops_to_baseline_val_with_upstream", f"FLOPs to {baseline} val with upstream",
                                    ".3g"),
                                   ("flops_ratio_with_upstream", "ratio", ".3f")])
    return "\n".join(lines) + "\n"


SEED_LABELS = {"val_loss": ("val loss", ".4f"), "ref_val_loss": ("ref_val loss", ".4f"),
               "tokens_to_baseline_val": ("tokens to baseline val", ",.0f"),
               "tokens_to_baseline_ref_val": ("tokens to baseline ref_val", ",.0f"),
               "val_loss_at_baseline_flops": ("val loss at baseline FLOPs", ".4f"),
               "flops_to_baseline_val": ("FLOPs to baseline val", ".3g"), "frac_h_to_l": ("H->L share", ".3f")}


SEED_GROUPS = (("val_loss", "ref_val_loss", "val_loss_at_baseline_flops"),
               ("tokens_to_baseline_val", "tokens_to_baseline_ref_val", "flops_to_baseline_val", "frac_h_to_l"))
"""The seed tables of the report (two, so each fits the page)."""


def seeds_markdown(rows: list[dict]) -> str:
    """Mean ± sample std over seed runs per variant (only when some variant has several runs); a `~` marks a
    difference to the baseline smaller than its spread, `k/n` how many of n runs have a value."""
    if not any(r["models"] > 1 for r in rows):
        return ""
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    cell = {(r["variant"], r["metric"]): r for r in rows}
    lines = ["", "Across seed runs (mean ± sample std; `~` = the difference to the baseline is smaller than its "
             "spread sqrt(std² + std_baseline²), i.e. not distinguishable from seed noise; (k/n) = k of n runs "
             "reached it; seed_summary.parquet):"]
    for group in SEED_GROUPS:
        metrics = [m for m in group if any(r["metric"] == m for r in rows)]
        table = [{"variant": variant, "runs": max(r["models"] for r in rows if r["variant"] == variant),
                  **{metric: _seed_cell(cell.get((variant, metric)), SEED_LABELS[metric][1]) for metric in metrics}}
                 for variant in variants]
        lines += [""] + markdown_table(table, [("variant", "variant", "s"), ("runs", "runs", "d")]
                                       + [(m, SEED_LABELS[m][0], "s") for m in metrics])
    return "\n".join(lines) + "\n"


def _seed_cell(row: dict | None, spec: str) -> str:
    """`mean ± std (k/n) ~` of one variant and metric."""
    if row is None or row["mean"] is None:
        return "never" if row is not None and row["models"] else "-"
    text = format(row["mean"], spec) + (f" ± {format(row['std'], spec)}" if row["std"] is not None else "")
    text += f" ({row['runs']}/{row['models']})" if row["runs"] < row["models"] else ""
    return text + (" ~" if row["within_spread"] else "")


def domains_markdown(rows: list[dict]) -> str:
    """Selection and excess loss inside vs outside the reference subset (selection_by_domain.parquet)."""
    if not rows:
        return ""
    lines = ["", "Selection on `train` by side of the reference subset (documents the reference never trained on; "
             "losses on windows spread over `train`):", ""]
    lines += markdown_table([r | {"side": "in" if r["in_reference_subset"] else "out"} for r in rows], [
        ("model", "model", "s"), ("side", "reference subset", "s"), ("documents", "documents", "d"),
        ("tokens", "tokens", ","), ("selection_rate", "selected", ".1%"), ("mean_ref_loss", "reference loss", ".4f"),
        ("mean_target_loss", "target loss", ".4f"), ("mean_excess_loss", "excess loss", ".4f")])
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
    lines += ["", "Self-speculative greedy decoding (identical output; draft 0 = plain greedy, adaptive = the default "
              "draft length; speculative.parquet):",
              "", "| model | drafts | new tokens | forwards | tokens/forward | seconds | speed-up |",
              "|---|---|---|---|---|---|---|"]
    for r in speculative:
        drafts = f"adaptive (<= {r['draft']})" if r.get("adaptive") else r["draft"]
        lines.append(f"| {r['model']} | {drafts} | {r['new_tokens']} | {r['forwards']} | "
                     f"{r['tokens_per_forward']:.2f} | {r['seconds']:.2f} | {r['speedup']:.2f}x |")
    return "\n".join(lines) + "\n"


REACH_SPLITS = {"ratio_to_baseline_val": "val", "ratio_to_baseline_ref_val": "ref_val"}
"""reach_rows metrics -> the validation split they are measured on."""


def reach_markdown(rows: list[dict], baseline: str) -> str:
    """Tokens-to-reach per variant as a fraction of the baseline's budget: mean ± std over seed runs, how many runs
    reach it, and whether it is a finding (stages/evaluation/seeds.reach_rows); printed for one seed run too."""
    cells = {(r["variant"], r["metric"]): r for r in rows if r["metric"] in REACH_SPLITS}
    if not cells:
        return ""
    variants = list(dict.fromkeys(variant for variant, _ in cells))
    splits = {metric: split for metric, split in REACH_SPLITS.items() if any(m == metric for _, m in cells)}
    table = [{"variant": variant} | {split: _reach_cell(cells.get((variant, metric)), variant == baseline)
                                     for metric, split in splits.items()} for variant in variants]
    lines = ["", f"Tokens to reach {baseline}'s mean final loss, as a fraction of {baseline}'s budget (mean ± sample "
             "std over the runs that reach it; (k/n) = k of n runs reach it). `not a finding`: the difference to "
             f"{baseline}'s own crossing is within the spread of that crossing (its std over seeds, or with one "
             "run how early it reaches its own final level; at least one evaluation interval):", ""]
    lines += markdown_table(table, [("variant", "variant", "s")] + [(s, f"{s} (fraction)", "s")
                                                                    for s in splits.values()])
    return "\n".join(lines) + "\n"


def _reach_cell(row: dict | None, is_baseline: bool) -> str:
    """`0.91 ± 0.03 (2/3), finding` for one variant and split."""
    if row is None or row["mean"] is None:
        return "never" if row is not None and row["models"] else "-"
    text = format(row["mean"], ".2f") + (f" ± {row['std']:.2f}" if row["std"] is not None else "")
    text += f" ({row['runs']}/{row['models']})"
    if is_baseline:
        return text + (f", spread {row['diff_spread']:.2f}" if row["diff_spread"] is not None else "")
    if row["within_spread"] is None:
        return text
    return text + (", not a finding" if row["within_spread"] else f", finding ({row['diff_to_baseline']:+.2f})")
