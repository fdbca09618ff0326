"""Selection and excess loss by side of the reference subset: does Rho-1 selection favour reference-like text?

For a selecting target (it wrote token_selection.parquet) over the `train` split it trained on, grouped by
documents.is_reference (the reference subset's documents in `train` were never seen by the reference model,
tokenize.reference_share): the share of token visits that were selected, and on windows spread over the split
the reference's loss (token_scores), the final target's loss and their difference, the excess loss.
Rows follow schemas.tables.SELECTION_BY_DOMAIN.
"""

from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import torch
from torch import nn

from schemas.manifest import Manifest
from stages.models.window_losses import token_losses
from stages.registry import stage
from storage.catalog import sql_list
from storage.windows import TokenWindows, spread_window_ids

TRAIN_SPLIT = "train"


def selection_by_domain(model_name: str, model: nn.Module, target: Manifest, tokens: Manifest, scores: Manifest,
                        num_windows: int, batch_size: int, device: torch.device) -> list[dict]:
    """SELECTION_BY_DOMAIN rows of one selecting target (empty when it wrote no token_selection.parquet)."""
    selection_path = Path(target.file("token_selection.parquet"))
    if not selection_path.is_file():
        return []
    windows = TokenWindows.from_manifest(tokens, TRAIN_SPLIT)
    ids = spread_window_ids(len(windows), num_windows)
    target_loss = pa.table({"token_index": pa.array(windows.target_index(ids).ravel()),
                            "target_loss": pa.array(token_losses(model, windows, ids, batch_size, device).ravel())})
    score_files = stage("score_reference").token_table.files(scores, TRAIN_SPLIT)
    con = duckdb.connect()
    try:
        con.register("target_loss", target_loss)
        token_docs = f"""(SELECT token_index, doc_id FROM read_parquet({sql_list([tokens.file('tokens.parquet')])})
                          WHERE split = '{TRAIN_SPLIT}') t"""
        documents = f"read_parquet({sql_list([tokens.file('documents.parquet')])}) d"
        visits = con.execute(f"""
            SELECT d.is_reference, count(DISTINCT d.doc_id), count(*),
                   sum(s.times_selected)::DOUBLE / nullif(sum(s.times_seen), 0)
            FROM read_parquet({sql_list([selection_path])}) s JOIN {token_docs} USING (token_index)
                 JOIN {documents} USING (doc_id)
            WHERE s.split = '{TRAIN_SPLIT}' GROUP BY 1""").fetchall()
        losses = dict((row[0], row[1:]) for row in con.execute(f"""
            SELECT d.is_reference, avg(r.ref_loss), avg(l.target_loss), avg(l.target_loss - r.ref_loss)
            FROM target_loss l JOIN read_parquet({sql_list(score_files)}) r USING (token_index)
                 JOIN {documents} ON d.doc_id = r.doc_id
            WHERE r.split = '{TRAIN_SPLIT}' GROUP BY 1""").fetchall()) if score_files else {}
    finally:
        con.close()
    rows = []
    for is_reference, documents_count, tokens_count, rate in sorted(visits):
        ref_loss, target_loss_mean, excess = losses.get(is_reference, (None, None, None))
        rows.append({"model": model_name, "in_reference_subset": bool(is_reference), "documents": documents_count,
                     "tokens": tokens_count, "selection_rate": rate, "mean_ref_loss": _float(ref_loss),
                     "mean_target_loss": _float(target_loss_mean), "mean_excess_loss": _float(excess)})
    return rows


def _float(value) -> float | None:
    return None if value is None or not np.isfinite(value) else float(value)
