"""Scoring and concept extraction with one shard shared by 2 processes (gloo): the files one process writes, in
the same row order, to float tolerance (stages/training/shard_processes.py)."""

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from schemas.configs import ScoreConfig
from stages import extract_concepts, score_reference
from stages.training.shard_processes import window_ranges
from tests.stages.test_concept_stages import built  # noqa: F401  (the fixture: tokens, reference, SAE, labels)

TOLERANCE = dict(rtol=1e-4, atol=1e-5)


def test_window_ranges_cut_a_shard_in_order_without_gaps():
    assert window_ranges(10, 17, 2) == [(10, 13), (13, 17)]
    assert window_ranges(0, 2, 3) == [(0, 0), (0, 1), (1, 2)]
    for start, stop, n in [(5, 105, 4), (0, 7, 7), (3, 3, 2)]:
        ranges = window_ranges(start, stop, n)
        assert ranges[0][0] == start and ranges[-1][1] == stop and len(ranges) == n
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))


@pytest.mark.multiprocess
def test_two_processes_score_a_shard_as_one_does(built, tmp_path):  # noqa: F811
    tokens, reference = built[0], built[1]
    one, two = tmp_path / "one", tmp_path / "two"
    for out, processes in ((one, 1), (two, 2)):
        out.mkdir()
        cfg = ScoreConfig(batch_size=3, num_shards=2, device="cpu", num_processes=processes)
        score_reference.score_shard(cfg, tokens, reference, "train", 1, out)
    a, b = (pq.read_table(out / score_reference.shard_name("train", 1)) for out in (one, two))
    assert a.num_rows > 0 and a.schema == b.schema
    for column in ("split", "token_index", "doc_id", "position", "token_id"):
        assert a[column].equals(b[column]), column
    for column in ("ref_loss", "ref_entropy"):
        np.testing.assert_allclose(b[column].to_numpy(), a[column].to_numpy(), **TOLERANCE)
    assert not list(two.glob("_ranks-*")), "the ranks' files are removed after the merge"


@pytest.mark.multiprocess
def test_two_processes_label_a_shard_as_one_does(built, tmp_path):  # noqa: F811
    tokens, reference, sae, _, cfg, one, _ = built
    inputs = {"tokens": tokens, "reference": reference, "sae": sae}
    two = tmp_path / "two"
    two.mkdir()
    extract_concepts.extract_shard(cfg.model_copy(update={"num_processes": 2}), inputs, "train-000", two)
    a, b = (pq.read_table(Path(out) / "part-train-000.parquet") for out in (one, two))
    assert a.num_rows > 0
    assert a["token_index"].equals(b["token_index"]) and a["concept_ids"].equals(b["concept_ids"])
    np.testing.assert_allclose(np.stack(b["attribution"].to_numpy(zero_copy_only=False)),
                               np.stack(a["attribution"].to_numpy(zero_copy_only=False)), **TOLERANCE)
    for sidecar in ("active-train-000.parquet", "peaks-train-000.parquet"):
        sa, sb = pq.read_table(Path(one) / sidecar), pq.read_table(two / sidecar)
        assert sa.drop_columns(["activation"] if "activation" in sa.column_names else []).equals(
            sb.drop_columns(["activation"] if "activation" in sb.column_names else [])), sidecar
    assert not list(two.glob("_ranks-*"))
