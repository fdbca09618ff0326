"""Stage score_reference: the reference model's loss and entropy on every target token of every split.

Output files in `out`:
    part-<split>-<shard:03d>.parquet  schemas.tables.TOKEN_SCORES (split, token_index, doc_id, position, token_id,
                                      ref_loss, ref_entropy), sorted by token_index, zstd, ~128k-row row groups
    part-<split>-<shard:03d>.json     {rows, seconds, device} of the run that scored the shard
Scores are computed on exactly the windows training uses (storage.windows.TokenWindows): window w scores the
targets token_index w*T+1 .. w*T+T with inputs w*T .. w*T+T-1 as context, so ref_loss lines up with the target
model's per-token loss (Rho-1 sec 2.2). Token 0 and the tail after the last full window get no row.
Each shard is written atomically and skipped when present, so an interrupted run redoes only unfinished shards.
With score.num_processes > 1 a shard's windows are shared by that many processes of the node
(stages/training/shard_processes.py; one per GPU on CUDA) and their files merged in window order.
"""

import functools
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from schemas.configs import ScoreConfig
from schemas.manifest import Manifest
from schemas.tables import SPLITS, TOKEN_SCORES
from stages.models.saved import load_model
from stages.models.window_losses import iter_window_losses
from stages.registry import (
    NodeDecl,
    Shards,
    Stage,
    TokenTable,
    parse_shard_id,
    part_file,
    shard_id,
    shard_ranges,
    split_parts,
    window_shard_ids,
)
from stages.runtime import interrupt
from stages.runtime.devices import resolve_device
from stages.seeded_upstream import with_seeded
from stages.training.shard_processes import run_shard
from storage.atomic import write_text_atomic
from storage.catalog import JoinView, TableSpec
from storage.parquet import ROW_GROUP_ROWS, read_table, write_batches
from storage.windows import TokenWindows

log = logging.getLogger(__name__)


def load_reference(reference: Manifest, device: torch.device) -> torch.nn.Module:
    """The reference model of a train_reference artifact, in eval mode on `device`."""
    return load_model(Path(reference.path), device).eval()


def shard_name(split: str, shard: int) -> str:
    """File name of one shard's scores."""
    return part_file(shard_id(split, shard))


def _token_columns(tokens: Manifest, split: str, first: int, last: int) -> tuple[np.ndarray, ...]:
    """doc_id, position and token_id of token_index first..last (inclusive) from tokens.parquet."""
    table = read_table(
        Path(tokens.file("tokens.parquet")), columns=["token_index", "doc_id", "position", "token_id"],
        filters=[("split", "=", split), ("token_index", ">=", first), ("token_index", "<=", last)],
    ).sort_by("token_index")
    index = table["token_index"].to_numpy()
    if len(index) != last - first + 1 or (len(index) and (index[0] != first or index[-1] != last)):
        raise ValueError(f"tokens.parquet of {tokens.path} lacks rows {first}..{last} of split {split!r}; "
                         "rebuild tokenize_corpus (lmpipe run --force tokenize_corpus)")
    return tuple(table[name].to_numpy() for name in ("doc_id", "position", "token_id"))


def _shard_batches(model, windows: TokenWindows, tokens: Manifest, split: str, start: int, stop: int,
                   batch_size: int, device: torch.device):
    """Record batches of ~ROW_GROUP_ROWS scored rows of windows [start, stop), in token_index order."""
    T = windows.seq_len
    windows_per_group = max(1, ROW_GROUP_ROWS // T)
    for group_start in range(start, stop, windows_per_group):
        group_ids = np.arange(group_start, min(group_start + windows_per_group, stop))
        index_N = windows.target_index(group_ids).reshape(-1)
        doc_id, position, token_id = _token_columns(tokens, split, int(index_N[0]), int(index_N[-1]))
        loss_N = np.empty(len(index_N), np.float32)
        entropy_N = np.empty(len(index_N), np.float32)
        for ids, targets_BT, loss_BT, entropy_BT in iter_window_losses(model, windows, group_ids, batch_size, device,
                                                                       entropy=True):
            interrupt.check(f"score_reference stopped in a shard of {split} (its partial file is removed); "
                            "finished shards are kept, run again to go on")  # a shard can take minutes
            rows = slice((ids[0] - group_start) * T, (ids[-1] + 1 - group_start) * T)
            loss_N[rows], entropy_N[rows] = loss_BT.reshape(-1), entropy_BT.reshape(-1)
            if not np.array_equal(targets_BT.reshape(-1), token_id[rows]):
                raise ValueError(f"stream-{split}.npy and tokens.parquet disagree in {tokens.path}; rebuild "
                                 "tokenize_corpus (lmpipe run --force tokenize_corpus)")
        yield pa.RecordBatch.from_arrays([
            pa.repeat(pa.scalar(split, pa.string()), len(index_N)), pa.array(index_N), pa.array(doc_id),
            pa.array(position), pa.array(token_id), pa.array(loss_N), pa.array(entropy_N),
        ], schema=TOKEN_SCORES)


def score_shard(cfg: ScoreConfig, tokens: Manifest, reference: Manifest, split: str, shard: int, work_dir: Path,
                model: torch.nn.Module | None = None) -> Path:
    """Score one shard of one split into work_dir/part-<split>-<shard>.parquet (skipped when it exists)."""
    path = Path(work_dir) / shard_name(split, shard)
    if path.exists():
        log.info("%s exists; skipping", path.name)
        return path
    if not 0 <= shard < cfg.num_shards:
        raise ValueError(f"shard {shard} is outside 0..{cfg.num_shards - 1} (score.num_shards={cfg.num_shards})")
    path.parent.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    windows = TokenWindows.from_manifest(tokens, split)
    start, stop = shard_ranges(len(windows), cfg.num_shards)[shard]
    started = time.perf_counter()
    if cfg.num_processes > 1:
        num_rows = _score_on_processes(cfg, tokens, reference, split, start, stop, path)
    else:
        model = model if model is not None else load_reference(reference, device)
        batches = _shard_batches(model, windows, tokens, split, start, stop, cfg.batch_size, device)
        num_rows = write_batches(path, batches, TOKEN_SCORES)
    seconds = time.perf_counter() - started
    write_text_atomic(path.with_suffix(".json"),
                      json.dumps({"rows": num_rows, "seconds": round(seconds, 4), "device": device.type}))
    log.info("scored %s shard %d/%d: %d tokens in %.1fs (%.0f tokens/s)", split, shard + 1, cfg.num_shards,
             num_rows, seconds, num_rows / max(seconds, 1e-9))
    return path


def _score_range(cfg: ScoreConfig, tokens: Manifest, reference: Manifest, split: str, lo: int, hi: int,
                 device: torch.device, rank_dir: Path) -> None:
    """One process's share of a shard (shard_processes): windows lo..hi-1 into rank_dir/scores.parquet."""
    model = load_reference(reference, device)
    windows = TokenWindows.from_manifest(tokens, split)
    write_batches(rank_dir / "scores.parquet",
                  _shard_batches(model, windows, tokens, split, lo, hi, cfg.batch_size, device), TOKEN_SCORES)


def _score_on_processes(cfg: ScoreConfig, tokens: Manifest, reference: Manifest, split: str, start: int,
                        stop: int, path: Path) -> int:
    """Score windows start..stop-1 on cfg.num_processes processes and merge their files into `path` in window
    order; returns the row count."""
    part_dir = path.with_name(f"_ranks-{path.stem}")
    compute = functools.partial(_score_range, cfg, tokens, reference, split)
    try:
        rank_dirs = run_shard(compute, start, stop, cfg, f"score_reference-{path.stem}", part_dir)
        files = [pq.ParquetFile(d / "scores.parquet") for d in rank_dirs]
        return write_batches(path, (b for f in files for b in f.iter_batches(ROW_GROUP_ROWS)), TOKEN_SCORES)
    finally:
        shutil.rmtree(part_dir, ignore_errors=True)


def run(cfg: ScoreConfig, inputs: dict[str, Manifest], out: Path) -> dict:
    """Make sure every shard of every split is scored in `out`; returns rows, mean ref_loss and tokens/s."""
    tokens, reference = inputs["tokens"], inputs["reference"]
    out = Path(out)
    device = resolve_device(cfg.device)
    model = None
    summary = {"num_rows": {}, "mean_ref_loss": {}, "num_shards": cfg.num_shards, "device": device.type}
    total_rows, total_seconds = 0, 0.0
    for split in SPLITS:
        num_rows, loss_sum = 0, 0.0
        for shard in range(cfg.num_shards):
            path = out / shard_name(split, shard)
            if not path.exists():
                model = model if model is not None else load_reference(reference, device)
                score_shard(cfg, tokens, reference, split, shard, out, model=model)
            losses = pq.read_table(path, columns=["ref_loss"])["ref_loss"].to_numpy()
            num_rows += len(losses)
            loss_sum += float(losses.sum(dtype=np.float64))
            stats_path = path.with_suffix(".json")
            if stats_path.exists():  # timing of the run that scored it (maybe a parallel task)
                total_seconds += json.loads(stats_path.read_text())["seconds"]
                total_rows += len(losses)
        summary["num_rows"][split] = num_rows
        summary["mean_ref_loss"][split] = loss_sum / num_rows if num_rows else None
    summary["tokens_per_s"] = round(total_rows / total_seconds, 1) if total_seconds > 0 else None
    log.info("score_reference: %s", summary)
    return summary


def build_shard(cfg: ScoreConfig, inputs: dict[str, Manifest], shard: str, work_dir: Path) -> Path:
    """Score one `<split>-<shard>` shard into the build dir (the registry's shard hook)."""
    split, index = parse_shard_id(shard)
    return score_shard(cfg, inputs["tokens"], inputs["reference"], split, index, work_dir)


STAGE = Stage(
    name="score_reference", code_version="2", config_type=ScoreConfig,
    nodes=lambda cfg: with_seeded([NodeDecl("score_reference", cfg.score,
                                            {"tokens": "tokenize_corpus", "reference": "train_reference"})], cfg),
    run=run,
    tables={"token_scores": TableSpec("score_reference", "part-*.parquet")},
    views={"scored_tokens": JoinView(
        frozenset({"token_scores", "vocab", "documents"}),
        """SELECT s.*, v.token, d.* EXCLUDE (doc_id, split, text)
           FROM token_scores s JOIN vocab v USING (token_id) JOIN documents d USING (doc_id)""")},
    shards=Shards(
        list=lambda cfg, inputs: window_shard_ids(inputs["tokens"].summary["num_windows"], SPLITS, cfg.num_shards),
        file=part_file,
        build=build_shard),
    token_table=TokenTable(files=split_parts),
    description="per-token reference loss and entropy (Parquet, sharded)",
)
