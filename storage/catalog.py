"""DuckDB catalog: views over the Parquet tables of every artifact (which tables: the stage registry).

- `<table>`: the artifacts of the current config (one per stage; metrics and probe losses carry a `model`
  column naming the node, e.g. `train_target.slm`);
- `<table>_all`: every finished artifact under the root, with an `artifact_key` column;
- join views declared by the stages (e.g. `scored_tokens`, `target_token_losses`, `metrics`).
Views are registered for the tables that exist; nothing is copied (DuckDB reads the Parquet files; for an
object-store root it reads them in the store, through the root's fsspec filesystem registered with DuckDB).

Nothing damaged is served: the files a view reads are checked against their manifests first
(storage/checked_files.py). A view whose files fail is not created, nor is a join view that reads it; a query
naming one fails with one line naming the artifact, the file and the fix, and every other view works. A query
naming a view that is not built says which stage builds it. `sandbox=True` locks the connection to the artifact
directories its views read (no other file, no network, no extension installs, no persistent secrets).
"""

import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import duckdb

from storage.artifacts import artifact_root, artifact_store
from storage.checked_files import CheckedFiles
from storage.store import LocalStore, Store


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


class UnavailableViewError(ValueError):
    """A query names a catalog view that is refused (damaged files) or not built."""


def sql_list(paths: list[Path | str]) -> str:
    """A DuckDB list literal of file paths (quotes escaped), e.g. for read_parquet([...])."""
    return "[" + ", ".join("'" + str(p).replace("'", "''") + "'" for p in paths) + "]"


MISSING_TABLE = re.compile(r"Table with name (.+?) does not exist!")
SANDBOX_AT_START = {"autoinstall_known_extensions": False, "autoload_known_extensions": False}
SANDBOX_OFF = ("enable_external_access", "allow_persistent_secrets", "allow_community_extensions")


class Catalog:
    """A DuckDB connection with the catalog views (`con`; other attributes are the connection's), and why each
    catalog view that is not there is missing (`unavailable`: view -> one line with the fix; `refused`: the views
    taken offline by a damaged artifact -> the problem)."""

    def __init__(self, con: duckdb.DuckDBPyConnection, unavailable: dict[str, str], refused: dict[str, str],
                 spill: str):
        self.con, self.unavailable, self.refused, self.spill = con, unavailable, refused, spill

    def __getattr__(self, name: str):
        return getattr(self.con, name)

    def execute(self, sql: str, parameters=None) -> duckdb.DuckDBPyConnection:
        """The connection's execute, with a refused or unbuilt view and a full spill disk explained in one line."""
        with self._explained():
            return self.con.execute(sql) if parameters is None else self.con.execute(sql, parameters)

    def rows(self, sql: str) -> tuple[list[str], list[tuple]]:
        """Column names and every row of a query (errors explained as by `execute`)."""
        with self._explained():
            result = self.con.execute(sql)
            return [d[0] for d in result.description or []], result.fetchall()

    def warnings(self) -> list[str]:
        """One line per damaged artifact: the views it takes offline, the file and the fix."""
        grouped: dict[str, list[str]] = {}
        for view, problem in self.refused.items():
            grouped.setdefault(problem, []).append(view)
        return [f"views {', '.join(views)} unavailable: {problem}" for problem, views in grouped.items()]

    @contextmanager
    def _explained(self) -> Iterator[None]:
        try:
            yield
        except duckdb.CatalogException as err:
            match = MISSING_TABLE.search(str(err))
            if match and (why := self.unavailable.get(match.group(1).lower())):
                raise UnavailableViewError(why) from None
            raise
        except (duckdb.OutOfMemoryException, duckdb.IOException) as err:
            if isinstance(err, duckdb.IOException) and "No space left" not in str(err):
                raise
            raise ValueError(_out_of_space(err, self.spill)) from None


def _out_of_space(err: duckdb.Error, spill: str) -> str:
    existing = next(p for p in [Path(spill), *Path(spill).parents] if p.exists())
    free = shutil.disk_usage(existing).free / 2**20
    return (f"the query ran out of memory ({str(err).splitlines()[0].rstrip('.')}); what does not fit in memory "
            f"spills to {spill}, which has {free:.0f} MiB free: free disk space there, or narrow the query (WHERE, "
            "LIMIT, fewer columns)")


def connect(tables: dict[str, TableSpec], views: dict[str, JoinView], current: dict[str, Path] | None = None,
            root: Path | None = None, database: str = ":memory:", *, sandbox: bool = False) -> Catalog:
    """The DuckDB catalog (used like a connection) with the views the stage registry declares whose files pass
    their checks. `current` maps node name -> artifact dir of the config; `sandbox` confines the connection to
    the artifact directories its views read."""
    store = artifact_store(root or artifact_root())
    spill = _spill_directory(store)
    con = duckdb.connect(database, config={"temp_directory": spill} | (SANDBOX_AT_START if sandbox else {}))
    store.attach(con)
    found = _Views(con, store)
    for table, spec in tables.items():
        found.every_artifact(table, spec)
        if current:
            found.current(table, spec, current)
    for name, view in views.items():
        found.join(name, view)
    found.checks.save()
    if sandbox:
        con.execute(f"SET allowed_directories = {sql_list(sorted(found.allowed))}")
        for setting in SANDBOX_OFF:
            con.execute(f"SET {setting} = false")
        con.execute("SET lock_configuration = true")
    return Catalog(con, found.unavailable, found.refused, spill)


def _spill_directory(store: Store) -> str:
    """Where DuckDB spills what does not fit in memory: under the root's `_tmp/` (the disk meant for big files;
    DuckDB's default is the working directory), else (no root yet, or not writable) in the system's temp
    directory. DuckDB creates it when it first spills and removes it when the connection closes."""
    base = Path(tempfile.gettempdir())
    if store.root.is_dir():
        try:
            (store.root / "_tmp").mkdir(exist_ok=True)
            base = store.root / "_tmp" if os.access(store.root / "_tmp", os.W_OK) else base
        except OSError:  # another user's or a read-only root: the system's temp directory
            pass
    return str(base / f"sql-{os.getpid()}-{uuid.uuid4().hex[:8]}")


@dataclass
class _Source:
    """The files of one artifact that a view reads, and the SELECT that reads them."""

    store: Store
    stage: str
    key: str
    files: list[str]
    select: str


class _Views:
    """Creates the catalog's views on a connection, refusing those whose files fail their checks; notes why each
    view it does not create is missing."""

    def __init__(self, con: duckdb.DuckDBPyConnection, store: Store):
        self.con, self.store, self.checks = con, store, CheckedFiles(store)
        self.root = store.full_url(store.base)
        self.built = bool(store.finished())
        self.created: set[str] = set()
        self.allowed: set[str] = set()
        self.unavailable: dict[str, str] = {}
        self.refused: dict[str, str] = {}

    def every_artifact(self, table: str, spec: TableSpec) -> None:
        """`<table>_all`: the table of every finished artifact of its stage."""
        sources = []
        for stage, key in self.store.finished(spec.stage):
            if files := self.store.files(self.store.path(stage, key), spec.pattern):
                select = f"SELECT '{key}' AS artifact_key, * FROM read_parquet({sql_list(files)})"
                sources.append(_Source(self.store, stage, key, files, select))
        self._table(f"{table}_all", sources, f"no {spec.stage} artifact is built under {self.root} yet: run "
                    "`lmpipe run`")

    def current(self, table: str, spec: TableSpec, current: dict[str, Path]) -> None:
        """`<table>`: the table of the current config's nodes of its stage."""
        sources, built = [], 0
        for node, path in current.items():
            if node.split(".")[0] != spec.stage or (node != spec.stage and not spec.per_model):
                continue  # a table of one artifact reads the stage's own node, not its `<stage>.<name>` variants
            path = Path(path)
            owner = self.store if path.parent.parent == self.store.root else LocalStore(path.parent.parent)
            stage, key = path.parent.name, path.name
            if not owner.is_finished(stage, key):
                continue
            built += 1
            if files := owner.files(owner.path(stage, key), spec.pattern):
                label = f"'{node}' AS model, " if spec.per_model else ""
                select = f"SELECT {label}* FROM read_parquet({sql_list(files)})"
                sources.append(_Source(owner, stage, key, files, select))
        if built:
            missing = f"no {spec.stage} artifact of this config has {spec.pattern} files"
        elif any(node.split(".")[0] == spec.stage for node in current):
            missing = (f"stage {spec.stage} is not built for this config yet: run `lmpipe run` (or `lmpipe run "
                       f"--only {spec.stage}` once its upstream is built)")
        else:
            missing = f"this config has no {spec.stage} stage ({table}_all holds every one built under the root)"
        self._table(table, sources, missing)

    def join(self, name: str, view: JoinView) -> None:
        """A join view, when every view it reads was created."""
        lacking = sorted(view.needs - self.created)
        if not lacking:
            self._create(name, view.sql, [])
        elif all(need in self.refused for need in lacking):  # only damage keeps it out: refused with them
            self._refuse(name, self.refused[lacking[0]])
        elif not self.built:
            self.unavailable[name] = self._nothing_built()
        else:
            need = next(need for need in lacking if need not in self.refused)
            self.unavailable[name] = f"view {name} reads {need}; {self.unavailable.get(need, 'not in the catalog')}"

    def _table(self, name: str, sources: list[_Source], missing: str) -> None:
        if not sources:
            self.unavailable[name] = f"view {name}: {missing}" if self.built else self._nothing_built()
            return
        for source in sources:
            if problem := self.checks.problem(source.store, source.stage, source.key, source.files):
                where = source.store.location(source.stage, source.key)
                self._refuse(name, f"{problem}; rebuild it with `lmpipe run --force {source.stage}` or delete {where}")
                return
        self._create(name, " UNION ALL BY NAME ".join(s.select for s in sources), sources)

    def _create(self, name: str, sql: str, sources: list[_Source]) -> None:
        try:
            self.con.execute(f"CREATE VIEW {name} AS {sql}")
        except duckdb.Error as err:  # e.g. a schema an old artifact no longer shares: only this view is lost
            self._refuse(name, f"DuckDB cannot create it: {str(err).splitlines()[0]}")
            return
        self.created.add(name)
        self.allowed |= {s.store.location(s.stage, s.key) + "/" for s in sources}

    def _refuse(self, name: str, problem: str) -> None:
        self.refused[name] = problem
        self.unavailable[name] = f"view {name} is refused: {problem}"

    def _nothing_built(self) -> str:
        return (f"nothing is built yet under {self.root}: run `lmpipe run --preset tiny` (a small demo, a minute "
                "or two) or `lmpipe run`, then query again")


WRITING_STATEMENTS = ("COPY", "COPY_DATABASE", "EXPORT", "ATTACH", "DETACH", "LOAD", "EXTENSION")
"""DuckDB statement types that write or open files; `lmpipe sql` refuses them (the catalog is in memory, so
CREATE/INSERT only touch that)."""


def check_read_only(con: duckdb.DuckDBPyConnection | Catalog, sql: str) -> None:
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


def list_views(con: duckdb.DuckDBPyConnection | Catalog) -> list[str]:
    """Names of the registered views."""
    query = "SELECT view_name FROM duckdb_views() WHERE NOT internal ORDER BY 1"
    return [row[0] for row in con.execute(query).fetchall()]
