"""Per-token Parquet columns as dense arrays indexed by token_index (the lookups objectives train with).

Scalar columns become (N,) arrays, fixed-size list columns (N, K) arrays; float rows without a token are NaN,
integer rows -1. `present_N` says which token_index values had a row. Files are read one at a time.
"""

from pathlib import Path

import numpy as np
import pyarrow as pa

from storage.parquet import read_table


def _fill_value(dtype: np.dtype):
    return np.nan if np.issubdtype(dtype, np.floating) else -1


def _as_numpy(column: pa.ChunkedArray) -> np.ndarray:
    """A scalar column as (n,), a list column as (n, K) (every list of the same length K)."""
    if pa.types.is_list(column.type) or pa.types.is_fixed_size_list(column.type):
        array = column.combine_chunks()
        lengths = np.unique(array.value_lengths().to_numpy(zero_copy_only=False)) if len(array) else np.array([0])
        if len(lengths) != 1:
            raise ValueError(f"list column has rows of different lengths {lengths.tolist()}")
        return array.flatten().to_numpy(zero_copy_only=False).reshape(len(array), int(lengths[0]))
    return column.to_numpy()


def dense_token_columns(paths: list[Path], columns: tuple[str, ...], num_tokens: int
                        ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """({column: array indexed by token_index}, present_N) from per-token files with a token_index column."""
    if not paths:
        raise ValueError("no per-token files to read")
    dense: dict[str, np.ndarray] = {}
    present_N = np.zeros(num_tokens, dtype=bool)
    for path in paths:
        table = read_table(path, columns=["token_index", *columns])
        index = table["token_index"].to_numpy()
        if len(index) and (index.min() < 0 or index.max() >= num_tokens):
            raise ValueError(f"{path} has token_index up to {index.max()} but the split has {num_tokens} tokens; "
                             "it belongs to another tokens artifact: rebuild the stage that wrote it")
        for name in columns:
            values = _as_numpy(table[name])
            if name not in dense:
                dense[name] = np.full((num_tokens, *values.shape[1:]), _fill_value(values.dtype), values.dtype)
            dense[name][index] = values
        present_N[index] = True
    return dense, present_N
