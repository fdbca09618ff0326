"""Token-loss training dynamics (Rho-1, sec 2.1 and App. D.1): pure functions over a probe-loss table.

Input: schemas.tables.PROBE_LOSSES rows (step, split, token_index, loss) of one variant, every probe token
measured at every checkpoint. Output: schemas.tables.TOKEN_DYNAMICS, one row per (split, token_index):
    a least-squares line l ~ a*x + b over the checkpoints, x = tokens seen at each (the training loop evaluates
    at step 0 too, and the last interval may be shorter than the others, so x is tokens, not checkpoint index),
    loss_start = the line at the first checkpoint, loss_end = at the last, delta = loss_end - loss_start,
    loss_last = measured loss at the last checkpoint;
    category: delta < -threshold -> H->L, delta > threshold -> L->H, otherwise L->L when loss_last <= L_mean
    else H->H, with L_mean the mean loss over the split's probe tokens at the last checkpoint.
"""

import numpy as np
import pyarrow as pa

from schemas.tables import TOKEN_DYNAMICS

CATEGORIES = ("H->H", "L->H", "H->L", "L->L")
"""Rho-1's four token classes (loss high/low at the start -> high/low at the end)."""


def loss_matrix(probe: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(split per token, token_index per token, losses of shape (num_tokens, num_checkpoints) in step order,
    tokens seen at each checkpoint)."""
    steps = probe["step"].to_numpy()
    split_codes = probe["split"].combine_chunks().dictionary_encode()
    split_names = np.asarray(split_codes.dictionary.to_pylist(), dtype=object)
    order = np.argsort(split_names)  # codes in name order, so rows come out sorted by (split, token_index)
    split_names = split_names[order]
    split_ids = np.argsort(order)[split_codes.indices.to_numpy()].astype(np.int64)
    token_index = probe["token_index"].to_numpy()
    unique_steps, step_col = np.unique(steps, return_inverse=True)
    num_checkpoints = len(unique_steps)
    if num_checkpoints < 2:
        raise ValueError(f"token dynamics need probe losses at >= 2 checkpoints, got {num_checkpoints} "
                         f"(steps {unique_steps.tolist()}); evaluate more often (train.eval_every_steps)")
    # one row per (split, token_index): combine both into one sortable int64 key
    keys = split_ids * (int(token_index.max()) + 1) + token_index
    unique_keys, row = np.unique(keys, return_inverse=True)
    losses_NC = np.full((len(unique_keys), num_checkpoints), np.nan)
    counts_NC = np.zeros((len(unique_keys), num_checkpoints), np.int64)
    np.add.at(counts_NC, (row, step_col), 1)
    if (counts_NC != 1).any():
        missing = int((counts_NC == 0).sum())
        raise ValueError(f"probe table is not one loss per token and checkpoint ({missing} missing, "
                         f"{int((counts_NC > 1).sum())} duplicated); pass the probe losses of a single variant")
    losses_NC[row, step_col] = probe["loss"].to_numpy().astype(np.float64)
    first_row = np.zeros(len(unique_keys), np.int64)
    first_row[row] = np.arange(len(row))
    tokens_C = np.zeros(num_checkpoints, np.float64)
    tokens_C[step_col] = probe["tokens_seen"].to_numpy()
    return split_names[split_ids[first_row]], token_index[first_row], losses_NC, tokens_C


def fit_lines(losses_NC: np.ndarray, x_C: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares line per row over x (default 0..C-1): (fitted loss at the first x, at the last x)."""
    x_C = np.arange(losses_NC.shape[1], dtype=np.float64) if x_C is None else np.asarray(x_C, np.float64)
    x_centered_C = x_C - x_C.mean()
    if not (x_centered_C @ x_centered_C) > 0:
        raise ValueError(f"token dynamics need checkpoints at >= 2 different x values, got {x_C.tolist()}")
    slope_N = (losses_NC - losses_NC.mean(axis=1, keepdims=True)) @ x_centered_C / (x_centered_C @ x_centered_C)
    intercept_N = losses_NC.mean(axis=1) - slope_N * x_C.mean()
    return intercept_N + slope_N * x_C[0], intercept_N + slope_N * x_C[-1]


def categorize(delta_N: np.ndarray, last_N: np.ndarray, mean_last: np.ndarray | float,
               threshold: float) -> np.ndarray:
    """Rho-1 category per token from its fitted delta and its measured last loss."""
    return np.where(delta_N < -threshold, "H->L",
                    np.where(delta_N > threshold, "L->H", np.where(last_N <= mean_last, "L->L", "H->H")))


def classify(probe: pa.Table, threshold: float = 0.2, variant: str = "") -> pa.Table:
    """TOKEN_DYNAMICS rows (with `variant`) for every probe token, sorted by (split, token_index)."""
    if threshold <= 0:
        raise ValueError(f"delta threshold must be > 0, got {threshold}")
    if probe.num_rows == 0:
        raise ValueError("probe table is empty; train with dynamics.probe_windows >= 1")
    split_N, token_index_N, losses_NC, tokens_C = loss_matrix(probe)
    start_N, end_N = fit_lines(losses_NC, tokens_C)
    delta_N = end_N - start_N
    last_N = losses_NC[:, -1]
    mean_last_N = np.empty_like(last_N)
    for split in np.unique(split_N):  # L_mean is per probe set (split), over all its tokens
        mask = split_N == split
        mean_last_N[mask] = last_N[mask].mean()
    return pa.table({
        "variant": pa.repeat(pa.scalar(variant, pa.string()), len(split_N)),
        "split": pa.array(split_N.tolist(), pa.string()),
        "token_index": pa.array(token_index_N, pa.int64()),
        "loss_start": pa.array(start_N.astype(np.float32)),
        "loss_end": pa.array(end_N.astype(np.float32)),
        "loss_last": pa.array(last_N.astype(np.float32)),
        "delta": pa.array(delta_N.astype(np.float32)),
        "category": pa.array(categorize(delta_N, last_N, mean_last_N, threshold).tolist(), pa.string()),
    }, schema=TOKEN_DYNAMICS)


def fractions(table: pa.Table) -> dict[str, float]:
    """Fraction of tokens in each of the four categories (all four keys; they sum to 1)."""
    categories = np.asarray(table["category"].to_pylist(), dtype=object)
    if len(categories) == 0:
        raise ValueError("no token dynamics rows to count")
    return {name: float((categories == name).mean()) for name in CATEGORIES}
