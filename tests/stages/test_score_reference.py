"""Tests of score_reference on fake tokens and reference artifacts (tiny GPT, seq_len 16, CPU)."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from schemas.configs import ScoreConfig
from schemas.tables import SPLITS, TOKEN_SCORES
from stages import score_reference
from stages.models.gpt import GPT
from stages.models.losses import token_loss_and_entropy
from stages.registry import shard_ranges
from stages.score_reference import STAGE, score_shard, shard_name
from storage.token_columns import dense_token_columns
from storage.windows import TokenWindows
from tests.helpers import SEQ_LEN, STREAM_TOKENS, TINY, VOCAB, make_model, make_tokens, manifest


def run(cfg, tokens, reference, out):
    return score_reference.run(cfg, {"tokens": tokens, "reference": reference}, out)


def load_dense_scores(scores, split, num_tokens):
    columns, _ = dense_token_columns(STAGE.token_table.files(scores, split), ("ref_loss", "ref_entropy"), num_tokens)
    return columns["ref_loss"], columns["ref_entropy"]

@pytest.fixture
def artifacts(tmp_path: Path):
    """(tokens manifest, reference manifest, output dir)."""
    return make_tokens(tmp_path), make_model(tmp_path, "reference"), tmp_path / "scores"


def read_split(out: Path, split: str) -> pa.Table:
    """All scored rows of one split in token_index order."""
    paths = sorted(out.glob(f"part-{split}-*.parquet"))
    return pa.concat_tables(pq.read_table(p) for p in paths).sort_by("token_index")


def test_shard_ranges_cover_all_windows():
    assert shard_ranges(10, 3) == [(0, 3), (3, 6), (6, 10)]
    assert shard_ranges(2, 4) == [(0, 0), (0, 1), (1, 1), (1, 2)]
    for n, k in [(0, 2), (1, 1), (97, 8)]:
        ranges = shard_ranges(n, k)
        assert len(ranges) == k and ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(ranges[:-1], ranges[1:], strict=True))
    with pytest.raises(ValueError, match="num_shards"):
        shard_ranges(5, 0)


def test_scores_match_direct_forward_on_random_windows(artifacts):
    tokens, reference, out = artifacts
    summary = run(ScoreConfig(batch_size=4, num_shards=3, device="cpu"), tokens, reference, out)
    model = GPT(TINY, VOCAB, SEQ_LEN)
    model.load_state_dict(score_reference.load_reference(reference, torch.device("cpu")).state_dict())
    model.eval()
    rng = np.random.default_rng(1)
    for split in SPLITS:
        rows = read_split(out, split)
        assert rows.schema == TOKEN_SCORES
        windows = TokenWindows.from_manifest(tokens, split)
        ids = rng.choice(len(windows), size=min(3, len(windows)), replace=False)
        inputs_BT, targets_BT = windows.batch(ids)
        with torch.no_grad():
            logits_BTV = model(inputs_BT)
        loss_BT, entropy_BT = token_loss_and_entropy(logits_BTV, targets_BT)
        picked = rows.take(pa.array(windows.target_index(ids).reshape(-1) - 1))  # row r holds token_index r+1
        np.testing.assert_array_equal(picked["token_index"].to_numpy(), windows.target_index(ids).reshape(-1))
        np.testing.assert_allclose(picked["ref_loss"].to_numpy(), loss_BT.reshape(-1).numpy(), atol=1e-5)
        np.testing.assert_allclose(picked["ref_entropy"].to_numpy(), entropy_BT.reshape(-1).numpy(), atol=1e-5)
        np.testing.assert_array_equal(picked["token_id"].to_numpy(), targets_BT.reshape(-1).numpy())
        index = picked["token_index"].to_numpy()
        np.testing.assert_array_equal(picked["doc_id"].to_numpy(), 1000 * SPLITS.index(split) + index // 37)
        np.testing.assert_array_equal(picked["position"].to_numpy(), index % 37)
        assert summary["num_rows"][split] == len(windows) * SEQ_LEN
        assert summary["mean_ref_loss"][split] == pytest.approx(float(np.mean(rows["ref_loss"].to_numpy())), rel=1e-6)
    assert summary["tokens_per_s"] > 0


def test_shards_cover_every_target_token_exactly_once(artifacts):
    tokens, reference, out = artifacts
    run(ScoreConfig(batch_size=5, num_shards=4, device="cpu"), tokens, reference, out)
    for split in SPLITS:
        num_windows = (STREAM_TOKENS[split] - 1) // SEQ_LEN
        index = np.concatenate([pq.read_table(out / shard_name(split, s))["token_index"].to_numpy() for s in range(4)])
        assert len(index) == num_windows * SEQ_LEN
        np.testing.assert_array_equal(np.sort(index), np.arange(1, num_windows * SEQ_LEN + 1))
        for s in range(4):  # each shard sorted by token_index
            shard_index = pq.read_table(out / shard_name(split, s))["token_index"].to_numpy()
            assert (np.diff(shard_index) > 0).all()


def test_rerun_skips_existing_shards_and_redoes_a_deleted_one(artifacts):
    tokens, reference, out = artifacts
    cfg = ScoreConfig(batch_size=8, num_shards=2, device="cpu")
    for shard in range(2):  # what the parallel flow tasks do, then run() finishes
        score_shard(cfg, tokens, reference, "val", shard, out)
    run(cfg, tokens, reference, out)
    paths = sorted(out.glob("part-*.parquet"))
    assert len(paths) == len(SPLITS) * 2
    mtimes = {p: p.stat().st_mtime_ns for p in paths}
    deleted = out / shard_name("ref_train", 1)
    before = pq.read_table(deleted)
    deleted.unlink()
    run(cfg, tokens, reference, out)
    for path in paths:
        if path != deleted:
            assert path.stat().st_mtime_ns == mtimes[path], path.name
    assert pq.read_table(deleted).equals(before)


def test_dense_score_columns_align_with_token_index(artifacts):
    tokens, reference, out = artifacts
    run(ScoreConfig(batch_size=8, num_shards=2, device="cpu"), tokens, reference, out)
    scores = manifest("score_reference", out)
    for split in ("train", "ref_val"):
        num_tokens = STREAM_TOKENS[split]
        ref_loss_N, ref_entropy_N = load_dense_scores(scores, split, num_tokens)
        assert ref_loss_N.dtype == np.float32 and ref_loss_N.shape == (num_tokens,)
        last = (num_tokens - 1) // SEQ_LEN * SEQ_LEN  # last scored token_index
        assert np.isnan(ref_loss_N[0]) and np.isnan(ref_loss_N[last + 1:]).all()
        assert not np.isnan(ref_loss_N[1:last + 1]).any() and not np.isnan(ref_entropy_N[1:last + 1]).any()
        rows = read_split(out, split)
        np.testing.assert_array_equal(ref_loss_N[rows["token_index"].to_numpy()], rows["ref_loss"].to_numpy())
        np.testing.assert_array_equal(ref_entropy_N[rows["token_index"].to_numpy()], rows["ref_entropy"].to_numpy())
    with pytest.raises(ValueError, match="token_index"):
        load_dense_scores(scores, "train", 10)


def test_batching_with_a_batch_size_not_dividing_the_shard(artifacts, monkeypatch):
    tokens, reference, out = artifacts
    one_batch = tokens, reference, out.parent / "one_batch"
    score_shard(ScoreConfig(batch_size=64, num_shards=1, device="cpu"), *one_batch[:2], "train", 0, one_batch[2])
    monkeypatch.setattr(score_reference, "ROW_GROUP_ROWS", 5 * SEQ_LEN)  # 5 windows per written row group
    model = score_reference.load_reference(reference, torch.device("cpu"))
    batch_windows = []
    model.embed.register_forward_pre_hook(lambda module, args: batch_windows.append(args[0].shape[0]))  # once a batch
    path = score_shard(ScoreConfig(batch_size=3, num_shards=1, device="cpu"), tokens, reference, "train", 0, out,
                       model=model)
    num_windows = (STREAM_TOKENS["train"] - 1) // SEQ_LEN  # 23: groups of 5, batches 3+2
    assert max(batch_windows) == 3 and sum(batch_windows) == num_windows
    assert pq.ParquetFile(path).metadata.num_row_groups == -(-num_windows // 5)
    streamed, single = pq.read_table(path), pq.read_table(one_batch[2] / shard_name("train", 0))
    assert streamed.select(["token_index", "token_id", "doc_id"]).equals(single.select(["token_index", "token_id",
                                                                                          "doc_id"]))
    np.testing.assert_allclose(streamed["ref_loss"].to_numpy(), single["ref_loss"].to_numpy(), atol=1e-5)


def test_bad_shard_and_device_are_clear_errors(artifacts):
    tokens, reference, out = artifacts
    with pytest.raises(ValueError, match="outside"):
        score_shard(ScoreConfig(num_shards=2, device="cpu"), tokens, reference, "val", 2, out)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            score_shard(ScoreConfig(device="cuda"), tokens, reference, "val", 0, out)
