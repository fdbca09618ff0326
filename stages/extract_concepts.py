"""Stage extract_concepts: attribution-selected concept labels for every target token (CoCoMix Sec. 3.1).

Reads the tokenize_corpus artifact, the train_reference model and the train_sae SAE. For each window (the same
windows training uses) the reference runs forward, L = the window's mean next-token loss (CoCoMix takes the
batch mean, which only rescales the scores by the batch size), and g = dL/dh at the SAE site (the residual
after block `layer`, via GPT.run_blocks). The SAE encodes LN(h); each
active latent i gets the attribution score a_i * (g . W_dec[i]) and the top `concepts.top` latents by SIGNED
score are the token's labels (stages/models/sae.py: window_concepts, attribution_scores, top_concepts).
Position convention: the hidden state at input position p of window w predicts target token_index
w*T + 1 + p, and its labels are stored under that token_index (like token_scores: row = the prediction made
for that target). The target's concept head at input position p is trained on the row of target p + 1.
Files written into `out` (one shard = a contiguous window range of a split, its own cached task run):
    part-<split>-<shard:03d>.parquet     schemas.tables.TOKEN_CONCEPTS (split, token_index, concept_ids
                                         list<int32>[K], attribution list<float32>[K], descending)
    active-<split>-<shard:03d>.parquet   per (latent, token_id): times active in the SAE's top-k (sidecar)
    peaks-<split>-<shard:03d>.parquet    per latent: its highest activations (token_index, activation)
    concepts.parquet                     schemas.tables.CONCEPTS: per latent, firing frequency on `train`, times
                                         chosen as a label, most frequent tokens, top-activating contexts
With concepts.num_processes > 1 a shard's windows are shared by that many processes of the node
(stages/training/shard_processes.py; one per GPU on CUDA) and their labels concatenated in window order.
"""

import functools
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from schemas.configs import ExtractConfig, PipelineConfig
from schemas.manifest import Manifest
from schemas.tables import CONCEPT_ACTIVE, CONCEPT_PEAKS, CONCEPTS, TOKEN_CONCEPTS
from stages.models.sae import window_concepts
from stages.models.saved import load_model, load_sae
from stages.registry import (
    NodeDecl,
    Shards,
    Stage,
    TokenTable,
    parse_shard_id,
    part_file,
    shard_ranges,
    split_parts,
    window_shard_ids,
)
from stages.runtime import interrupt
from stages.runtime.devices import resolve_device
from stages.seeded_upstream import with_seeded
from stages.training.shard_processes import run_shard
from storage.catalog import JoinView, TableSpec
from storage.parquet import read_table, write_table
from storage.windows import TokenWindows

log = logging.getLogger(__name__)

PEAKS_PER_LATENT = 8
TOP_TOKENS = 5


def extract_shard(cfg: ExtractConfig, inputs: dict[str, Manifest], shard: str, work_dir: Path) -> Path:
    """Label one `<split>-<shard>` range of windows (skipped when its part file exists)."""
    split, index = parse_shard_id(shard)
    path = Path(work_dir) / part_file(shard)
    if path.exists():
        return path
    windows = TokenWindows.from_manifest(inputs["tokens"], split)
    start, stop = shard_ranges(len(windows), cfg.num_shards)[index]
    started = time.perf_counter()
    if cfg.num_processes > 1:  # the ranks' labels, concatenated in window order
        part_dir = Path(work_dir) / f"_ranks-{shard}"
        try:
            rank_dirs = run_shard(functools.partial(_label_range, cfg, inputs, split), start, stop, cfg,
                                  f"extract_concepts-{shard}", part_dir)
            parts = [dict(np.load(d / "labels.npz")) for d in rank_dirs]
        finally:
            shutil.rmtree(part_dir, ignore_errors=True)
        labels = {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
    else:
        labels = label_windows(cfg, inputs, split, start, stop, resolve_device(cfg.device))
    _write_sidecars(Path(work_dir), shard, labels["active_pairs"], labels["peak_vals"], labels["peak_index"], split)
    token_index, ids_NT, scores_NT = labels["token_index"], labels["ids_NT"], labels["scores_NT"]
    K = ids_NT.shape[1]
    write_table(path, pa.table({
        "split": pa.array([split] * len(token_index), pa.string()),
        "token_index": pa.array(token_index),
        "concept_ids": pa.FixedSizeListArray.from_arrays(pa.array(ids_NT.reshape(-1)), K).cast(pa.list_(pa.int32())),
        "attribution": pa.FixedSizeListArray.from_arrays(pa.array(scores_NT.reshape(-1)), K).cast(
            pa.list_(pa.float32())),
    }), TOKEN_CONCEPTS)
    seconds = time.perf_counter() - started
    log.info("extract_concepts %s: %d tokens in %.1fs (%.0f tokens/s)", shard, len(token_index), seconds,
             len(token_index) / max(seconds, 1e-9))
    return path


def label_windows(cfg: ExtractConfig, inputs: dict[str, Manifest], split: str, start: int, stop: int,
                  device: torch.device) -> dict[str, np.ndarray]:
    """Labels of windows start..stop-1 of a split (rows in token_index order) and what the sidecars count."""
    model = load_model(Path(inputs["reference"].path), device).requires_grad_(False)
    sae, meta = load_sae(Path(inputs["sae"].path), device)
    layer = int(meta["layer"])
    windows = TokenWindows.from_manifest(inputs["tokens"], split)
    found = {name: [] for name in ("ids_NT", "scores_NT", "token_index", "active_pairs", "peak_vals", "peak_index")}
    for batch_start in range(start, stop, cfg.batch_size):
        interrupt.check(f"extract_concepts stopped in a shard of {split} (nothing of it is kept); finished shards "
                        "are kept, run again to go on")  # a shard can take minutes: stop within a batch
        window_ids = np.arange(batch_start, min(batch_start + cfg.batch_size, stop))
        inputs_BT, targets_BT = windows.batch(window_ids, device)
        ids_NT, scores_NT, vals_NK, idx_NK = window_concepts(model, sae, inputs_BT, targets_BT, layer, cfg.top,
                                                             cfg.attribution)
        token_index_N = windows.target_index(window_ids).reshape(-1)
        input_ids_N = inputs_BT.reshape(-1).cpu().numpy()
        found["ids_NT"].append(ids_NT.cpu().numpy().astype(np.int32))
        found["scores_NT"].append(scores_NT.float().cpu().numpy())
        found["token_index"].append(token_index_N)
        fired = (vals_NK > 0).cpu().numpy()
        idx = idx_NK.cpu().numpy()
        input_ids_NK = np.broadcast_to(input_ids_N[:, None], idx.shape)
        found["active_pairs"].append(idx[fired].astype(np.int64) * (1 << 32) + input_ids_NK[fired])
        found["peak_vals"].append(vals_NK.cpu().numpy()[fired])
        found["peak_index"].append(
            np.stack([idx[fired], np.broadcast_to(token_index_N[:, None] - 1, idx.shape)[fired]], 1))
    empty = {"ids_NT": np.zeros((0, cfg.top), np.int32), "scores_NT": np.zeros((0, cfg.top), np.float32),
             "token_index": np.zeros(0, np.int64), "active_pairs": np.zeros(0, np.int64),
             "peak_vals": np.zeros(0, np.float32), "peak_index": np.zeros((0, 2), np.int64)}
    return {name: np.concatenate(parts) if parts else empty[name] for name, parts in found.items()}


def _label_range(cfg: ExtractConfig, inputs: dict[str, Manifest], split: str, lo: int, hi: int,
                 device: torch.device, rank_dir: Path) -> None:
    """One process's share of a shard (shard_processes): its labels into rank_dir/labels.npz."""
    np.savez(rank_dir / "labels.npz", **label_windows(cfg, inputs, split, lo, hi, device))


def _write_sidecars(work_dir: Path, shard: str, pairs: np.ndarray, vals: np.ndarray, peaks: np.ndarray,
                    split: str) -> None:
    """Per (latent, input token) firing counts and each latent's top activations (positions are token_index of
    the INPUT token, i.e. the token whose hidden state fired)."""
    keys, counts = np.unique(pairs, return_counts=True)
    write_table(work_dir / f"active-{shard}.parquet", {
        "split": [split] * len(keys), "concept_id": (keys >> 32).astype(np.int32),
        "token_id": (keys & 0xFFFFFFFF).astype(np.int32), "count": counts.astype(np.int64)}, CONCEPT_ACTIVE)
    order = np.lexsort((-vals, peaks[:, 0]))
    latents, positions = peaks[order, 0], peaks[order, 1]
    first = np.searchsorted(latents, latents, side="left")
    keep = (np.arange(len(latents)) - first) < PEAKS_PER_LATENT
    write_table(work_dir / f"peaks-{shard}.parquet", {
        "split": [split] * int(keep.sum()), "concept_id": latents[keep].astype(np.int32),
        "token_index": positions[keep].astype(np.int64), "activation": vals[order][keep].astype(np.float32)},
        CONCEPT_PEAKS)


def _rows(con, sql: str) -> list[dict]:
    """A query's rows as dicts."""
    result = con.execute(sql)
    names = [d[0] for d in result.description]
    return [dict(zip(names, row, strict=True)) for row in result.fetchall()]


def concept_table(out: Path, tokens: Manifest, num_latents: int, cfg: ExtractConfig) -> pa.Table:
    """The `concepts` table from the train split's sidecars and labels."""
    import duckdb

    vocab = read_table(Path(tokens.file("vocab.parquet")), columns=["token_id", "token"])
    stream = np.load(Path(tokens.path) / "stream-train.npy", mmap_mode="r")
    con = duckdb.connect()
    con.register("vocab", vocab)
    glob = lambda kind: str(out / f"{kind}-train-*.parquet")  # noqa: E731
    num_tokens = con.execute(f"SELECT count(*) FROM read_parquet('{glob('part')}')").fetchone()[0]
    stats = _rows(con, f"""
        WITH active AS (SELECT concept_id, token_id, sum(count) AS n
                        FROM read_parquet('{glob('active')}') GROUP BY 1, 2),
             ranked AS (SELECT *, row_number() OVER (PARTITION BY concept_id ORDER BY n DESC, token_id) AS r
                        FROM active),
             labels AS (SELECT unnest(concept_ids) AS concept_id, count(*) AS n
                        FROM read_parquet('{glob('part')}') GROUP BY 1)
        SELECT c.concept_id, c.num_active, coalesce(l.n, 0) AS num_labelled, t.top_tokens FROM
            (SELECT concept_id, sum(n) AS num_active FROM active GROUP BY 1) c
            LEFT JOIN labels l USING (concept_id)
            LEFT JOIN (SELECT concept_id, list(v.token || ' (' || n || ')' ORDER BY r) AS top_tokens FROM ranked
                       JOIN vocab v USING (token_id) WHERE r <= {TOP_TOKENS} GROUP BY 1) t USING (concept_id)
        """)
    peaks = _rows(con, f"""SELECT concept_id, token_index, activation FROM (
        SELECT *, row_number() OVER (PARTITION BY concept_id ORDER BY activation DESC, token_index) AS r
        FROM read_parquet('{glob('peaks')}')) WHERE r <= {cfg.contexts_per_concept}
        ORDER BY concept_id, activation DESC, token_index""")  # token_index breaks ties: the same table every run
    tokens_text = dict(zip(vocab["token_id"].to_pylist(), vocab["token"].to_pylist(), strict=True))
    contexts: dict[int, list[str]] = {}
    width = cfg.context_tokens
    for latent, position in ((row["concept_id"], row["token_index"]) for row in peaks):
        lo, hi = max(0, position - width), min(len(stream), position + width + 1)
        pieces = [tokens_text.get(int(t), "?") for t in stream[lo:hi]]
        pieces[position - lo] = "[[" + pieces[position - lo] + "]]"
        contexts.setdefault(latent, []).append("".join(pieces))
    by_latent = {row["concept_id"]: row for row in stats}
    rows = []
    for latent in range(num_latents):
        row = by_latent.get(latent, {})
        num_active = int(row.get("num_active") or 0)
        rows.append({"concept_id": latent, "num_active": num_active,
                     "frequency": num_active / max(num_tokens, 1), "num_labelled": int(row.get("num_labelled") or 0),
                     "top_tokens": row.get("top_tokens") or [], "top_contexts": contexts.get(latent, [])})
    return pa.Table.from_pylist(rows, CONCEPTS)


def run(cfg: ExtractConfig, inputs: dict[str, Manifest], out: Path) -> dict:
    """Make sure every shard is labelled, then write the concepts table; returns label statistics."""
    out = Path(out)
    shards = shard_ids(cfg, inputs)
    for shard in shards:
        extract_shard(cfg, inputs, shard, out)
    _, meta = load_sae(Path(inputs["sae"].path))
    table = concept_table(out, inputs["tokens"], int(meta["num_latents"]), cfg)
    write_table(out / "concepts.parquet", table, CONCEPTS)
    labelled = pc.sum(pc.greater(table["num_labelled"], 0)).as_py()
    rows = sum(pq.ParquetFile(out / part_file(s)).metadata.num_rows for s in shards)
    return {"num_latents": int(meta["num_latents"]), "k": int(meta["k"]), "top": cfg.top, "layer": int(meta["layer"]),
            "rows": rows, "concepts_used_as_labels": labelled,
            "concepts_active": pc.sum(pc.greater(table["num_active"], 0)).as_py()}


def shard_ids(cfg: ExtractConfig, inputs: dict[str, Manifest]) -> list[str]:
    """`<split>-<shard>` ids of every configured split."""
    return window_shard_ids(inputs["tokens"].summary["num_windows"], cfg.splits, cfg.num_shards)


def nodes(cfg: PipelineConfig) -> list[NodeDecl]:
    """The labels (node `extract_concepts`, rule concepts.attribution), and one node `extract_concepts.<rule>`
    per other rule a variant reads (ConceptsConfig.attribution)."""
    upstream = {"tokens": "tokenize_corpus", "reference": "train_teacher", "sae": "train_sae"}
    rules = dict.fromkeys(v.concepts.attribution for v in cfg.target.variants
                          if v.concepts is not None and v.concepts.attribution is not None)
    return with_seeded([NodeDecl("extract_concepts", cfg.concepts, upstream)] + [
        NodeDecl(f"extract_concepts.{rule}", cfg.concepts.model_copy(update={"attribution": rule}), upstream)
        for rule in rules], cfg)


STAGE = Stage(
    name="extract_concepts", code_version="3", config_type=ExtractConfig,
    nodes=nodes,
    run=run,
    tables={"token_concepts": TableSpec("extract_concepts", "part-*.parquet"),
            "concepts": TableSpec("extract_concepts", "concepts.parquet")},
    views={"concept_labels": JoinView(
        frozenset({"token_concepts", "tokens", "vocab"}),
        """SELECT l.split, l.token_index, t.doc_id, t.position, v.token, l.rank, l.concept_id, l.attribution
           FROM (SELECT split, token_index, unnest(concept_ids) AS concept_id, unnest(attribution) AS attribution,
                        unnest(range(1, len(concept_ids) + 1)) AS rank FROM token_concepts) l
           JOIN tokens t ON t.split = l.split AND t.token_index = l.token_index - 1
           JOIN vocab v USING (token_id)""")},
    shards=Shards(list=shard_ids, file=part_file, build=extract_shard),
    token_table=TokenTable(files=split_parts),
    on_demand=True,
    description="attribution-selected concept labels per token, concept descriptions",
)
