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
