"""DuckDB catalog: views over the Parquet tables of every artifact (which tables: the stage registry).

- `<table>`: the artifacts of the current config (one per stage; metrics and probe losses carry a `model`
  column naming the node, e.g. `train_target.slm`);
- `<table>_all`: every finished artifact under the root, with an `artifact_key` column;
- join views declared by the stages (e.g. `scored_tokens`, `target_token_losses`, `metrics`).
Views are registered for the tables that exist; nothing is copied (DuckDB reads the Parquet files).
"""

from dataclasses import dataclass
from pathlib import Path

import duckdb

from storage.artifacts import SUCCESS, artifact_root


@dataclass(frozen=True)
class TableSpec:
    """A Parquet table that some stage writes into its artifact dir."""

    stage: str
    pattern: str
    per_model: bool = False
    """True when several nodes of the current config write it (a `model` column tells them apart)."""


@dataclass(frozen=True)
class JoinView:
    """A view joining catalog tables, registered when every table it needs exists."""

    needs: frozenset[str]
    sql: str


def _sql_list(paths: list[Path]) -> str:
    return "[" + ", ".join("'" + str(p).replace("'", "''") + "'" for p in paths) + "]"


def _finished_dirs(root: Path, stage: str) -> list[Path]:
    stage_dir = root / stage
    return sorted(p for p in stage_dir.iterdir() if (p / SUCCESS).exists()) if stage_dir.is_dir() else []


def connect(tables: dict[str, TableSpec], views: dict[str, JoinView], current: dict[str, Path] | None = None,
            root: Path | None = None, database: str = ":memory:") -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the catalog views (tables and join views as the stage registry declares them).

    `current` maps node name -> artifact dir of the config."""
    root = root or artifact_root()
    con = duckdb.connect(database)
    registered = set()
    for table, spec in tables.items():
        if _register_all(con, root, table, spec):
            registered.add(f"{table}_all")
        if current and _register_current(con, current, table, spec):
            registered.add(table)
    for name, view in views.items():
        if view.needs <= registered:
            con.execute(f"CREATE VIEW {name} AS {view.sql}")
    return con


def _register_all(con, root: Path, table: str, spec: TableSpec) -> bool:
    selects = []
    for directory in _finished_dirs(root, spec.stage):
        files = sorted(directory.glob(spec.pattern))
        if files:
            selects.append(f"SELECT '{directory.name}' AS artifact_key, * FROM read_parquet({_sql_list(files)})")
    if selects:
        con.execute(f"CREATE VIEW {table}_all AS " + " UNION ALL BY NAME ".join(selects))
    return bool(selects)


def _register_current(con, current: dict[str, Path], table: str, spec: TableSpec) -> bool:
    selects = []
    for node, directory in current.items():
        if node.split(".")[0] != spec.stage or not (directory / SUCCESS).exists():
            continue
        files = sorted(directory.glob(spec.pattern))
        if files:
            label = f"'{node}' AS model, " if spec.per_model else ""
            selects.append(f"SELECT {label}* FROM read_parquet({_sql_list(files)})")
    if selects:
        con.execute(f"CREATE VIEW {table} AS " + " UNION ALL BY NAME ".join(selects))
    return bool(selects)


def list_views(con: duckdb.DuckDBPyConnection) -> list[str]:
    """Names of the registered views."""
    query = "SELECT view_name FROM duckdb_views() WHERE NOT internal ORDER BY 1"
    return [row[0] for row in con.execute(query).fetchall()]
