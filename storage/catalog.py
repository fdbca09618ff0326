"""DuckDB catalog: views over the Parquet tables of every artifact (which tables: the stage registry).

- `<table>`: the artifacts of the current config (one per stage; metrics and probe losses carry a `model`
  column naming the node, e.g. `train_target.slm`);
- `<table>_all`: every finished artifact under the root, with an `artifact_key` column;
- join views declared by the stages (e.g. `scored_tokens`, `target_token_losses`, `metrics`).
Views are registered for the tables that exist; nothing is copied (DuckDB reads the Parquet files; for an
object-store root it reads them in the store, through the root's fsspec filesystem registered with DuckDB).
"""

from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from storage.artifacts import artifact_root, artifact_store
from storage.store import SUCCESS, Store


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


def sql_list(paths: list[Path]) -> str:
    """A DuckDB list literal of file paths (quotes escaped), e.g. for read_parquet([...])."""
    return "[" + ", ".join("'" + str(p).replace("'", "''") + "'" for p in paths) + "]"


def _finished_dir(store: Store, directory: Path) -> str | None:
    """A current node's artifact directory (a local path under the store's root) where it is finished, as the
    store names it (the bucket's path for a mirror path), else None."""
    directory = Path(directory)
    if directory.parent.parent == store.root:
        stage, key = directory.parent.name, directory.name
        return store.path(stage, key) if store.is_finished(stage, key) else None
    return str(directory) if (directory / SUCCESS).exists() else None


def _unreadable(store: Store, files: list[str]) -> str | None:
    """The first file whose Parquet footer cannot be read (cheap: metadata only), or None."""
    for name in files:
        try:
            with store.fs.open(name, "rb") as handle:
                pq.read_metadata(handle)
        except (OSError, pa.ArrowException):
            return name
    return None


def connect(tables: dict[str, TableSpec], views: dict[str, JoinView], current: dict[str, Path] | None = None,
            root: Path | None = None, database: str = ":memory:") -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the catalog views (tables and join views as the stage registry declares them).

    `current` maps node name -> artifact dir of the config."""
    store = artifact_store(root or artifact_root())
    con = duckdb.connect(database)
    store.attach(con)
    registered = set()
    for table, spec in tables.items():
        if _register_all(con, store, table, spec):
            registered.add(f"{table}_all")
        if current and _register_current(con, store, current, table, spec):
            registered.add(table)
    for name, view in views.items():
        if view.needs <= registered:
            con.execute(f"CREATE VIEW {name} AS {view.sql}")
    return con


def _create_view(con, store: Store, name: str, selects: list[str], files: list[str]) -> None:
    """The union view, or, when one of its files is unreadable, a view whose every query fails naming the file
    (so one damaged file breaks only the views that read it)."""
    bad = _unreadable(store, files)
    if bad is None:
        con.execute(f"CREATE VIEW {name} AS " + " UNION ALL BY NAME ".join(selects))
        return
    message = (f"view {name} reads {bad}, which is not readable Parquet; rebuild that artifact "
               f"(lmpipe verify names it; lmpipe run --force STAGE)").replace("'", "''")
    con.execute(f"CREATE VIEW {name} AS SELECT error('{message}') AS error")


def _register_all(con, store: Store, table: str, spec: TableSpec) -> bool:
    selects, all_files = [], []
    for stage, key in store.finished(spec.stage):
        files = store.files(store.path(stage, key), spec.pattern)
        if files:
            all_files += files
            selects.append(f"SELECT '{key}' AS artifact_key, * FROM read_parquet({sql_list(files)})")
    if selects:
        _create_view(con, store, f"{table}_all", selects, all_files)
    return bool(selects)


def _register_current(con, store: Store, current: dict[str, Path], table: str, spec: TableSpec) -> bool:
    selects, all_files = [], []
    for node, path in current.items():
        if node.split(".")[0] != spec.stage or (directory := _finished_dir(store, path)) is None:
            continue
        files = store.files(directory, spec.pattern)
        if files:
            all_files += files
            label = f"'{node}' AS model, " if spec.per_model else ""
            selects.append(f"SELECT {label}* FROM read_parquet({sql_list(files)})")
    if selects:
        _create_view(con, store, table, selects, all_files)
    return bool(selects)


WRITING_STATEMENTS = ("COPY", "COPY_DATABASE", "EXPORT", "ATTACH", "DETACH", "LOAD", "EXTENSION")
"""DuckDB statement types that write or open files; `lmpipe sql` refuses them (the catalog is in memory, so
CREATE/INSERT only touch that)."""


def check_read_only(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    """ValueError when the SQL contains a statement that could write files (e.g. COPY ... TO an artifact)."""
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as err:
        raise ValueError(f"SQL error: {err}") from None
    for statement in statements:
        kind = str(statement.type).rsplit(".", 1)[-1]
        if kind in WRITING_STATEMENTS:
            raise ValueError(f"lmpipe sql is read-only: {kind} statements are refused so that artifacts cannot be "
                             "overwritten; run the SELECT and redirect its --csv/--json output instead")


def list_views(con: duckdb.DuckDBPyConnection) -> list[str]:
    """Names of the registered views."""
    query = "SELECT view_name FROM duckdb_views() WHERE NOT internal ORDER BY 1"
    return [row[0] for row in con.execute(query).fetchall()]
