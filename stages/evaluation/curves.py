"""Training curves from metrics.parquet: a metric against tokens seen, when a curve first reaches a level."""

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


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


def baseline_level(curves: dict[str, tuple[np.ndarray, np.ndarray]],
                   baseline_models: list[str]) -> tuple[float | None, float | None]:
    """(mean final value, mean final x) over the baseline's seed runs; (None, None) when none has a point."""
    missing = [name for name in baseline_models if name not in curves]
    if not baseline_models or missing:
        raise ValueError(f"evaluate.baseline: {missing or baseline_models} not among the targets {sorted(curves)}")
    ends = [(float(x[-1]), float(y[-1])) for x, y in (curves[name] for name in baseline_models) if len(y)]
    if not ends:
        return None, None
    return float(np.mean([y for _, y in ends])), float(np.mean([x for x, _ in ends]))


def tokens_to_reach(metrics: dict[str, pa.Table], baseline_models: list[str], split: str) -> dict[str, tuple]:
    """Per model: (tokens seen when `val/<split>/loss` first reached the baseline runs' mean final value, that over
    the baseline's mean token budget); (None, None) when never."""
    curves = {name: metric_curve(table, f"val/{split}/loss") for name, table in metrics.items()}
    level, budget = baseline_level(curves, baseline_models)
    if level is None:
        return {name: (None, None) for name in curves}
    result = {}
    for name, (tokens_seen, values) in curves.items():
        reached = first_reach(tokens_seen, values, level)
        result[name] = (reached, reached / budget if reached is not None and budget else None)
    return result


def eval_resolution(metrics: dict[str, pa.Table], baseline_models: list[str], split: str = "val") -> float:
    """The baseline's evaluation interval over its budget (median spacing of its `val/<split>/loss` points): how
    finely a curve resolves tokens-to-reach; 0.0 when no baseline run has two points."""
    spacings, budgets = [], []
    for name in baseline_models:
        tokens_seen, _ = metric_curve(metrics[name], f"val/{split}/loss")
        if len(tokens_seen) > 1:
            spacings.append(float(np.median(np.diff(tokens_seen))))
            budgets.append(float(tokens_seen[-1]))
    return float(np.mean(spacings) / np.mean(budgets)) if spacings else 0.0


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


def tail_mean(table: pa.Table, name: str, last_fraction: float = 0.1) -> float | None:
    """Mean of a metric over the last `last_fraction` of its logged steps (None when never logged)."""
    _, values = metric_curve(table, name)
    if not len(values):
        return None
    return float(np.mean(values[-max(1, int(len(values) * last_fraction)):]))


def value_at(x: np.ndarray, y: np.ndarray, at: float) -> float | None:
    """y linearly interpolated at x = at (None outside the curve)."""
    if not len(x) or at < x[0] or at > x[-1]:
        return None
    return float(np.interp(at, x, y))
