"""Parquet IO: every write passes an explicit schema, compresses with zstd and lands atomically."""

from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from storage.atomic import atomic_path

ROW_GROUP_ROWS = 128 * 1024
"""Row groups of ~128k rows: small enough that DuckDB skips groups by min/max of sorted keys."""


def write_table(path: Path, table: pa.Table | dict, schema: pa.Schema) -> int:
    """Write one table with the given schema (zstd, sorted row groups as given); returns the row count."""
    if isinstance(table, dict):
        table = pa.Table.from_pydict(table, schema=schema)
    else:
        table = table.cast(schema)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", row_group_size=ROW_GROUP_ROWS)
    return table.num_rows


def write_batches(path: Path, batches: Iterable[pa.RecordBatch | pa.Table | dict], schema: pa.Schema) -> int:
    """Stream record batches (or tables, or column dicts) into one file with bounded memory; returns the row
    count."""
    num_rows = 0
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
        for batch in batches:
            if isinstance(batch, dict):
                batch = pa.RecordBatch.from_pydict(batch, schema=schema)
            writer.write(batch, row_group_size=ROW_GROUP_ROWS)
            num_rows += batch.num_rows
    return num_rows


def read_table(path: Path, columns: list[str] | None = None, filters=None) -> pa.Table:
    """Read a Parquet file or directory of files, with a clear error if it is not readable Parquet."""
    try:
        return pq.read_table(path, columns=columns, filters=filters)
    except (pa.ArrowInvalid, OSError) as err:
        raise ValueError(f"cannot read Parquet {path}: {err}. "
                         "Rebuild the artifact (lmpipe run --force STAGE).") from err
