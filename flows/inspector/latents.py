"""The concept view's and the run view's data: one latent's dashboard, latent search, the run's summary tables."""

from flows.inspector.data import InspectError, RunData

ORDERS = {"labelled": "num_labelled DESC, concept_id", "density": "density DESC, concept_id",
          "rare": "density ASC, concept_id", "id": "concept_id"}
"""Latent list orders (the SQL is chosen from here by key, never taken from the request)."""


def latent_list(data: RunData, query: str = "", order: str = "labelled", limit: int = 50) -> list[dict]:
    """Latents whose id is `query`, whose contexts contain it, or which promote it as a token; else all, ordered."""
    if order not in ORDERS:
        raise InspectError(400, f"unknown order {order!r}; choose from {', '.join(ORDERS)}")
    limit, query = max(1, min(int(limit), 500)), query.strip()
    columns = "concept_id, density, num_active, num_labelled, dead, max_activation, top_tokens"
    if not query:
        return data.rows(f"SELECT {columns} FROM latent_summary ORDER BY {ORDERS[order]} LIMIT ?", [limit],
                         view="latent_summary")
    return data.rows(
        f"SELECT {columns} FROM latent_summary WHERE CAST(concept_id AS VARCHAR) = ? "
        "OR concept_id IN (SELECT concept_id FROM latent_contexts WHERE contains(lower(text), lower(?))) "
        "OR concept_id IN (SELECT concept_id FROM latent_logits WHERE direction = 'promoted' "
        "                  AND lower(trim(token)) = lower(?)) "
        f"ORDER BY {ORDERS[order]} LIMIT ?", [query, query, query, limit], view="latent_summary")


def latent(data: RunData, concept_id: int) -> dict:
    """One latent: its numbers, its top contexts (pieces, per-token activations, document), its logit effects."""
    found = data.rows("SELECT * FROM latent_summary WHERE concept_id = ?", [concept_id], view="latent_summary")
    if not found:
        count = data.rows("SELECT count(*) FROM latents", columns=False)[0]
        raise InspectError(404, f"no latent {concept_id}: this SAE has {count} latents (0..{count - 1})")
    logits = data.rows("SELECT direction, rank, token_id, logit FROM latent_logits WHERE concept_id = ? "
                       "ORDER BY direction, rank", [concept_id], view="latent_logits")
    for row in logits:
        row["text"] = data.pieces.texts([row["token_id"]])[0] if data.pieces else str(row["token_id"])
    contexts = data.rows("SELECT rank, split, token_index, activation, start_index, token_ids, activations "
                         "FROM latent_contexts WHERE concept_id = ? ORDER BY rank", [concept_id],
                         view="latent_contexts")
    for context in contexts:
        ids = context["token_ids"]
        context["text"] = data.pieces.texts(ids) if data.pieces else [str(i) for i in ids]
        where = data.rows("SELECT doc_id, position FROM tokens WHERE split = ? AND token_index = ?",
                          [context["split"], context["token_index"]], view="tokens")
        context["doc_id"] = where[0]["doc_id"] if where else None
    return {**found[0], "logits": logits, "contexts": contexts}


def run_summary(data: RunData) -> dict:
    """The run view: plot names, selection by domain, the comparison table (with the dynamics fractions)."""
    plots = sorted(data.plots)
    tables = {}
    for view in ("selection_by_domain", "comparison"):
        tables[view] = data.rows(f"SELECT * FROM {view}") if data.has(view) else data.why_missing(view)
    return {"plots": plots, **tables}
