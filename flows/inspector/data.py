"""What the inspector's pages read: bounded, parameterised DuckDB queries over the sandboxed catalog.

One document or one latent at a time: a document is a keyed range of token_index (its rows of `tokens`, then
that range of each per-token view), a latent is a keyed lookup in the latent_dashboards tables. Values from the
request are always bound as `?` parameters, never put into SQL text; view names come from this module.
"""

import threading
from collections.abc import Callable
from dataclasses import dataclass

from flows.inspector.columns import Columns
from flows.inspector.pieces import TokenPieces


@dataclass
class InspectError(Exception):
    """A request the run cannot answer: HTTP status and one line for the page."""

    status: int
    message: str


class RunData:
    """The catalog of one run (sandboxed), its tokenizer's pieces and its evaluate artifact's plots (file name ->
    a function reading the PNG's bytes: from a local root or an object store alike)."""

    def __init__(self, catalog, pieces: TokenPieces | None, plots: dict[str, Callable[[], bytes]] | None = None,
                 max_tokens: int = 20_000):
        self.catalog, self.pieces, self.plots, self.max_tokens = catalog, pieces, plots or {}, max_tokens
        self.lock = threading.Lock()  # one DuckDB connection: requests take turns
        self.views = set(self.rows("SELECT view_name FROM duckdb_views() WHERE NOT internal UNION "
                                   "SELECT table_name FROM duckdb_tables()", view=None, columns=False))
        self.columns = Columns(self)
        self._ranked: dict[tuple, list[dict]] = {}

    def has(self, view: str) -> bool:
        """True when the catalog created the view for this run."""
        return view in self.views

    def why_missing(self, view: str) -> str:
        """The catalog's one line on why a view is not there (what to run)."""
        return self.catalog.unavailable.get(view, f"this run has no {view} view")

    def rows(self, sql: str, params: list | None = None, view: str | None = "", columns: bool = True):
        """A query's rows as dicts (or first-column values); InspectError 404 when `view` is not in the catalog."""
        if view and view not in self.views:
            raise InspectError(404, self.why_missing(view))
        with self.lock:
            result = self.catalog.execute(sql, params or [])
            names = [d[0] for d in result.description]
            values = result.fetchall()
        return [dict(zip(names, row, strict=True)) for row in values] if columns else [row[0] for row in values]

    def overview(self) -> dict:
        """Splits with their document counts, the per-token columns, the rankable models, what is missing."""
        if not self.has("documents"):
            return {"error": self.why_missing("documents")}
        splits = self.rows("SELECT split, count(*) AS documents, sum(num_tokens) AS tokens FROM documents "
                           "GROUP BY split ORDER BY split")
        return {"splits": splits, "columns": self.columns.available(),
                "selection_models": self.columns.selection_models, "probe_models": self.columns.probe_models,
                "latents": self.has("latent_summary") or self.why_missing("latent_summary"),
                "warnings": self.catalog.warnings()}

    def documents(self, split: str, query: str = "", order: str = "doc_id", model: str = "",
                  limit: int = 50) -> list[dict]:
        """Documents of a split: those whose text contains `query`, or ranked by selection rate or excess loss."""
        limit = max(1, min(int(limit), 200))
        if order in ("selection_desc", "selection_asc", "excess_desc", "excess_asc"):
            return self._ranked_documents(split, order, model)[:limit]
        return self.rows(
            "SELECT doc_id, num_tokens, substr(text, greatest(1, strpos(lower(text), lower(?)) - 40), 160) AS snippet "
            "FROM documents WHERE split = ? AND contains(lower(text), lower(?)) ORDER BY doc_id LIMIT ?",
            [query, split, query, limit], view="documents")

    def _ranked_documents(self, split: str, order: str, model: str) -> list[dict]:
        kind, direction = order.split("_")
        known = self.columns.selection_models if kind == "selection" else self.columns.probe_models
        if model not in known:
            raise InspectError(400, f"no {kind} data for model {model!r} in this run; models with it: "
                               f"{', '.join(known) or 'none'}")
        key = (split, kind, model)
        if key not in self._ranked:  # one aggregate per (split, model), kept for the session
            if kind == "selection":
                sql = ("SELECT t.doc_id, count(*) AS tokens, sum(s.times_selected) / sum(s.times_seen) AS value "
                       "FROM token_selection s JOIN tokens t USING (split, token_index) "
                       "WHERE s.model = ? AND s.split = ? AND s.times_seen > 0 GROUP BY t.doc_id")
                rows = self.rows(sql, [model, split], view="token_selection")
            else:
                sql = ("SELECT doc_id, count(*) AS tokens, avg(excess_loss) AS value FROM target_token_losses "
                       "WHERE model = ? AND split = ? GROUP BY doc_id")
                rows = self.rows(sql, [model, split], view="target_token_losses")
            self._ranked[key] = sorted(rows, key=lambda r: (-r["value"], r["doc_id"]))
        ranked = self._ranked[key]
        return ranked if direction == "desc" else ranked[::-1]

    def document(self, split: str, doc_id: int, column: str | None = None) -> dict:
        """One document's tokens (pieces as drawn) with every per-token column this run has."""
        if column and column not in self.columns.ids():
            raise InspectError(400, f"this run has no column {column!r}; it has: {', '.join(self.columns.ids())}")
        meta = self.rows("SELECT * EXCLUDE (text) FROM documents WHERE split = ? AND doc_id = ?", [split, doc_id],
                         view="documents")
        if not meta:
            count = self.rows("SELECT count(*), min(doc_id), max(doc_id) FROM documents WHERE split = ?", [split],
                              view="documents", columns=False)
            raise InspectError(404, f"no document {doc_id} in split {split!r} (it has {count[0]} documents)")
        tokens = self.rows("SELECT token_index, position, token_id FROM tokens WHERE split = ? AND doc_id = ? "
                           "ORDER BY token_index LIMIT ?", [split, doc_id, self.max_tokens], view="tokens")
        ids = [t["token_id"] for t in tokens]
        first, last = (tokens[0]["token_index"], tokens[-1]["token_index"]) if tokens else (0, -1)
        values, labels = self.columns.values(split, first, last)
        return {"split": split, "doc_id": doc_id, "meta": meta[0], "first_index": first,
                "truncated": meta[0]["num_tokens"] + 1 > len(tokens) and len(tokens) == self.max_tokens,
                "text": self.pieces.texts(ids) if self.pieces else [str(i) for i in ids],
                "special": [self.pieces.is_special(i) for i in ids] if self.pieces else [False] * len(ids),
                "token_id": ids, "position": [t["position"] for t in tokens], "values": values, **labels}

    def plot(self, name: str) -> bytes:
        """A PNG of the evaluate artifact by file name (only those it has)."""
        if name not in self.plots:
            raise InspectError(404, f"no plot {name!r}; this run has: "
                               f"{', '.join(self.plots) or 'none (evaluate is not built)'}")
        return self.plots[name]()
