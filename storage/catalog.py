"""DuckDB catalog: views over the Parquet tables of every artifact.

- `<table>`: the artifacts of the current config (one per stage; metrics and probe losses carry a `model`
  column naming the node, e.g. `train_target.slm`);
- `<table>_all`: every finished artifact under the root, with an `artifact_key` column;
- join views for inspection: `scored_tokens` (reference scores + token strings + document metadata),
  `target_token_losses` (each target's final per-token loss on the probe set beside the reference loss, i.e.
  the Rho-1 excess loss) and `metrics` (reference and target training curves in one table).
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


TABLES = {
    "documents": TableSpec("tokenize_corpus", "documents.parquet"),
    "vocab": TableSpec("tokenize_corpus", "vocab.parquet"),
    "tokens": TableSpec("tokenize_corpus", "tokens.parquet"),
    "token_scores": TableSpec("score_reference", "part-*.parquet"),
    "reference_metrics": TableSpec("train_reference", "metrics.parquet"),
    "target_metrics": TableSpec("train_target", "metrics.parquet", per_model=True),
    "probe_losses": TableSpec("train_target", "probe_losses.parquet", per_model=True),
    "token_selection": TableSpec("train_target", "token_selection.parquet", per_model=True),
    "eval_losses": TableSpec("evaluate", "eval_losses.parquet"),
    "comparison": TableSpec("evaluate", "comparison.parquet"),
    "token_dynamics": TableSpec("evaluate", "token_dynamics.parquet"),
}

JOIN_VIEWS = {
    "scored_tokens": (
        {"token_scores", "vocab", "documents"},
        """SELECT s.*, v.token, d.* EXCLUDE (doc_id, split, text)
           FROM token_scores s JOIN vocab v USING (token_id) JOIN documents d USING (doc_id)""",
    ),
    "target_token_losses": (
        {"probe_losses", "token_scores", "vocab"},
        """SELECT p.model, p.split, p.token_index, s.doc_id, s.position, v.token, p.loss AS target_loss,
                  s.ref_loss, p.loss - s.ref_loss AS excess_loss, s.ref_entropy
           FROM probe_losses p
           JOIN (SELECT model, max(step) AS step FROM probe_losses GROUP BY model) last USING (model, step)
           JOIN token_scores s USING (split, token_index) JOIN vocab v USING (token_id)""",
    ),
    "metrics": (
        {"reference_metrics", "target_metrics"},
        """SELECT 'train_reference' AS model, * FROM reference_metrics
           UNION ALL BY NAME SELECT * FROM target_metrics""",
    ),
}


def _sql_list(paths: list[Path]) -> str:
    return "[" + ", ".join("'" + str(p).replace("'", "''") + "'" for p in paths) + "]"


def _finished_dirs(root: Path, stage: str) -> list[Path]:
    stage_dir = root / stage
    return sorted(p for p in stage_dir.iterdir() if (p / SUCCESS).exists()) if stage_dir.is_dir() else []


def connect(current: dict[str, Path] | None = None, root: Path | None = None,
            database: str = ":memory:") -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the catalog views. `current` maps node name -> artifact dir of the config."""
    root = root or artifact_root()
    con = duckdb.connect(database)
    registered = set()
    for table, spec in TABLES.items():
        if _register_all(con, root, table, spec):
            registered.add(f"{table}_all")
        if current and _register_current(con, current, table, spec):
            registered.add(table)
    for view, (needs, sql) in JOIN_VIEWS.items():
        if needs <= registered:
            con.execute(f"CREATE VIEW {view} AS {sql}")
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
