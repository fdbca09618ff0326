"""What exists for a config: per-node status rows and the DuckDB catalog over its artifacts (no prefect)."""

from schemas.configs import PipelineConfig
from stages.dag import plan
from stages.registry import stages
from storage.artifacts import CorruptArtifactError, read_manifest
from storage.catalog import Catalog, connect


def _human_bytes(num: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if num < 1024:
            return f"{num:.0f}{unit}" if unit == "B" else f"{num:.1f}{unit}"
        num /= 1024
    return f"{num:.1f}TB"


def headline(summary: dict, limit: int = 4) -> str:
    """A few scalar summary numbers as `name=value` (floats to 4 significant digits)."""
    items = [(k, v) for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in items[:limit])


def status_rows(cfg: PipelineConfig) -> list[dict]:
    """One row per node: key, built, size, created, headline numbers."""
    rows = []
    for name, node in plan(cfg).items():
        row = {"node": name, "key": node.key, "built": node.is_built(), "size": "", "created": "", "summary": ""}
        if row["built"]:
            try:
                manifest = read_manifest(node.stage, node.key)
            except CorruptArtifactError as err:
                row |= {"built": "CORRUPT", "summary": str(err)}
            else:
                row |= {"size": _human_bytes(sum(f.size_bytes for f in manifest.files)),
                        "created": manifest.created_at, "summary": headline(manifest.summary)}
        rows.append(row)
    return rows


def catalog_for(cfg: PipelineConfig, *, sandbox: bool = False) -> Catalog:
    """The DuckDB catalog (storage.catalog.Catalog, used like a connection) whose plain views point at this
    config's artifacts; `sandbox` confines it to the artifacts (storage.catalog.connect)."""
    registry = stages()
    tables = {name: spec for stage in registry.values() for name, spec in stage.tables.items()}
    views = {name: view for stage in registry.values() for name, view in stage.views.items()}
    current = {name: node.path() for name, node in plan(cfg, registry).items()}
    return connect(tables, views, current, sandbox=sandbox)

