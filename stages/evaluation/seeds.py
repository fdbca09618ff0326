"""Aggregation over seed runs (TargetConfig.seeds): mean and spread of every number, per variant.

A variant trained with n seeds has models `<variant>`, `<variant>.seed1`, ... (schemas.configs.replica_name).
For each variant and metric: runs (models with a value), mean, std (sample standard deviation, ddof=1; None
with one run), min and max. Against the baseline variant: diff = mean - baseline mean, and the spread of that
difference between two single runs, sqrt(std^2 + std_baseline^2); `within_spread` flags a difference smaller
than that spread (None when either side has a single run, so no spread is known).
Tokens-to-reach (reach_rows) is judged against the spread of the baseline's own crossing instead.
"""

import math

import numpy as np

from schemas.configs import variant_of

SEED_METRICS = ("val_loss", "ref_val_loss", "tokens_to_baseline_val", "tokens_to_baseline_ref_val",
                "val_loss_at_baseline_flops", "flops_to_baseline_val", "frac_h_to_l")
"""The per-model numbers (comparison.parquet and compute.parquet columns) aggregated over seeds."""


def _stats(values: list[float]) -> dict:
    array = np.asarray(values, np.float64)
    return {"runs": len(array), "mean": float(array.mean()) if len(array) else None,
            "std": float(array.std(ddof=1)) if len(array) > 1 else None,
            "min": float(array.min()) if len(array) else None, "max": float(array.max()) if len(array) else None}


def seed_rows(per_model: dict[str, dict], baseline: str, metrics: tuple[str, ...] = SEED_METRICS) -> list[dict]:
    """SEED_SUMMARY rows from per-model numbers ({model: {metric: value or None}}); models grouped by variant.

    `models` counts every run of the variant, `runs` those with a value (e.g. runs that reached the baseline)."""
    groups: dict[str, list[str]] = {}
    for model in per_model:
        groups.setdefault(variant_of(model), []).append(model)
    rows = []
    for metric in metrics:
        stats = {variant: _stats([per_model[m][metric] for m in models if _present(per_model[m].get(metric))])
                 for variant, models in groups.items()}
        base = stats.get(baseline)
        for variant, stat in stats.items():
            row = {"variant": variant, "metric": metric, "models": len(groups[variant]), **stat,
                   "diff_to_baseline": None, "diff_spread": None, "within_spread": None}
            if base is not None and stat["mean"] is not None and base["mean"] is not None and variant != baseline:
                row["diff_to_baseline"] = stat["mean"] - base["mean"]
                if stat["std"] is not None and base["std"] is not None:
                    row["diff_spread"] = math.hypot(stat["std"], base["std"])
                    row["within_spread"] = abs(row["diff_to_baseline"]) < row["diff_spread"]
            rows.append(row)
    return rows


def _present(value) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


REACH_METRICS = ("ratio_to_baseline_val", "ratio_to_baseline_ref_val")
"""Tokens-to-reach as a fraction of the baseline's budget, per validation split (comparison.parquet columns)."""


def reach_rows(per_model: dict[str, dict], baseline: str, resolution: float = 0.0,
               metrics: tuple[str, ...] = REACH_METRICS) -> list[dict]:
    """SEED_SUMMARY rows of tokens-to-reach (the fraction of the budget at which a run's validation curve first
    reached the baseline runs' mean final value): mean ± std over the runs that reach it (runs of models), and
    whether the difference to the baseline's own crossing is a finding.

    diff_to_baseline = mean - the baseline runs' mean crossing; diff_spread = the spread of the baseline's own
    crossing: the sample std of its runs' crossings when two or more cross, else how early its one crossing
    comes (1 - crossing: a single run reaches its own final level before its end by its end-of-run noise), and at
    least `resolution` (the evaluation interval over the budget: finer differences are interpolation);
    within_spread (= not a finding) = |diff| <= diff_spread. A variant none of whose runs reach it gets
    within_spread None (`never` is its own statement)."""
    rows = seed_rows(per_model, baseline, metrics)
    for metric in metrics:
        base = next((r for r in rows if r["metric"] == metric and r["variant"] == baseline), None)
        if base is None or base["mean"] is None:
            continue
        spread = base["std"] if base["std"] is not None else 1.0 - base["mean"]
        spread = max(spread, resolution)
        base["diff_spread"] = spread
        for row in rows:
            if row["metric"] == metric and row["variant"] != baseline and row["mean"] is not None:
                row["diff_spread"] = spread
                row["within_spread"] = abs(row["diff_to_baseline"]) <= spread
    return rows
