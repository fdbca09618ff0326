"""The per-token columns the document view can colour by, and their values over one document's token range.

Column ids: `ref_loss`, `ref_entropy` (score_reference), `target_loss:<model>` and `excess_loss:<model>` (the
probe tokens of each target, at its last checkpoint: the target_token_losses view), `selected:<model>`
(times selected / times seen by a selecting variant), `dynamics:<variant>` (the Rho-1 loss-dynamics class) and
`concept` (the top attribution label of the hidden state after the token, as the concept_labels view shows it).
Values are aligned with the document's tokens (None where a token has no row, e.g. not a probe token).
"""

class Columns:
    """Which columns this run has, and their values for a token range of one split."""

    def __init__(self, data):
        self.data = data
        self.probe_models = (data.rows("SELECT DISTINCT model FROM probe_losses ORDER BY 1", columns=False)
                             if data.has("target_token_losses") else [])
        self.selection_models = (data.rows("SELECT DISTINCT model FROM token_selection ORDER BY 1", columns=False)
                                 if data.has("token_selection") else [])
        self.dynamics_variants = (data.rows("SELECT DISTINCT variant FROM token_dynamics ORDER BY 1", columns=False)
                                  if data.has("token_dynamics") else [])

    def available(self) -> list[dict]:
        """Every column of this run: id, label, kind (sequential, diverging, rate, category)."""
        found = []
        if self.data.has("token_scores"):
            found += [{"id": "ref_loss", "label": "reference loss (nats)", "kind": "sequential"},
                      {"id": "ref_entropy", "label": "reference entropy (nats)", "kind": "sequential"}]
        for model in self.probe_models:
            found += [{"id": f"excess_loss:{model}", "label": f"excess loss, {model} - reference", "kind": "diverging"},
                      {"id": f"target_loss:{model}", "label": f"loss of {model} (nats)", "kind": "sequential"}]
        found += [{"id": f"selected:{m}", "label": f"selected by {m} (times selected / seen)", "kind": "rate"}
                  for m in self.selection_models]
        found += [{"id": f"dynamics:{v}", "label": f"loss dynamics of {v} (Rho-1 class)", "kind": "category"}
                  for v in self.dynamics_variants]
        if self.data.has("token_concepts"):
            found.append({"id": "concept", "label": "top attribution concept", "kind": "category"})
        return found

    def ids(self) -> list[str]:
        """The ids of available()."""
        return [c["id"] for c in self.available()]

    def values(self, split: str, first: int, last: int) -> tuple[dict[str, list], dict]:
        """(column id -> one value per token of first..last, {"concepts": per-token labels, "concept_info"});
        columns with no value in the range are left out (the page says the document has none)."""
        values = {column: [None] * (last - first + 1) for column in self.ids()}

        def put(column: str, token_index: int, value) -> None:
            values[column][token_index - first] = value

        span = [split, first, last]
        if self.data.has("token_scores"):
            for row in self.data.rows("SELECT token_index, ref_loss, ref_entropy FROM token_scores "
                                      "WHERE split = ? AND token_index BETWEEN ? AND ?", span):
                put("ref_loss", row["token_index"], row["ref_loss"])
                put("ref_entropy", row["token_index"], row["ref_entropy"])
        if self.probe_models:
            for row in self.data.rows("SELECT model, token_index, target_loss, excess_loss FROM target_token_losses "
                                      "WHERE split = ? AND token_index BETWEEN ? AND ?", span):
                put(f"target_loss:{row['model']}", row["token_index"], row["target_loss"])
                put(f"excess_loss:{row['model']}", row["token_index"], row["excess_loss"])
        if self.selection_models:
            for row in self.data.rows("SELECT model, token_index, times_selected / times_seen AS rate FROM "
                                      "token_selection WHERE split = ? AND token_index BETWEEN ? AND ? "
                                      "AND times_seen > 0", span):
                put(f"selected:{row['model']}", row["token_index"], row["rate"])
        if self.dynamics_variants:
            for row in self.data.rows("SELECT variant, token_index, category FROM token_dynamics "
                                      "WHERE split = ? AND token_index BETWEEN ? AND ?", span):
                put(f"dynamics:{row['variant']}", row["token_index"], row["category"])
        labels = self._labels(split, first, last, values)
        return {column: v for column, v in values.items() if any(x is not None for x in v)}, labels

    def _labels(self, split: str, first: int, last: int, values: dict) -> dict:
        """Concept labels of the hidden state after each token (label row token_index + 1), and the labels' top
        tokens; fills the `concept` column with the top-1 label."""
        if not self.data.has("token_concepts"):
            return {"concepts": None, "concept_info": {}}
        labels: list = [None] * (last - first + 1)
        for row in self.data.rows("SELECT token_index, concept_ids, attribution FROM token_concepts "
                                  "WHERE split = ? AND token_index BETWEEN ? AND ?", [split, first + 1, last + 1]):
            offset = row["token_index"] - 1 - first
            labels[offset] = list(zip(row["concept_ids"], row["attribution"], strict=True))
            values["concept"][offset] = row["concept_ids"][0] if row["concept_ids"] else None
        used = sorted({c for label in labels if label for c, _ in label})
        info = {}
        if used and self.data.has("concepts"):
            info = {row["concept_id"]: row["top_tokens"][:3] for row in self.data.rows(
                "SELECT concept_id, top_tokens FROM concepts WHERE list_contains(?, concept_id)", [used])}
        return {"concepts": labels, "concept_info": info}
