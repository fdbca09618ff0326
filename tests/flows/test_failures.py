"""A failure outside a stage's own code reaches the user as its real cause, not as Prefect's
"Run is in PENDING state" of the task that was waiting for it."""

import errno
from pathlib import Path

import pytest

import flows.pipeline  # noqa: F401 - its stage flows are made at import: before the toy stage is registered
from schemas.configs import ScoreConfig
from schemas.presets import tiny
from stages.registry import NodeDecl, Shards, Stage, register, unregister

pytestmark = pytest.mark.flow


def _failing_shard(cfg, inputs, shard: str, work: Path) -> Path:
    if shard == "b":
        raise OSError(errno.ENOSPC, "No space left on device", str(work / "part-b.parquet"))
    (work / f"part-{shard}.txt").write_text(shard)
    return work / f"part-{shard}.txt"


FAILING = Stage(
    name="disk_full", code_version="1", config_type=ScoreConfig,
    nodes=lambda cfg: [NodeDecl("disk_full", ScoreConfig(), {})],
    run=lambda cfg, inputs, out: {"parts": sorted(p.name for p in Path(out).iterdir())},
    shards=Shards(list=lambda cfg, inputs: ["a", "b"], file=lambda shard: f"part-{shard}.txt", build=_failing_shard))


@pytest.fixture
def failing_stage():
    register(FAILING)
    yield FAILING
    unregister(FAILING.name)


def test_a_failed_shard_is_reported_as_its_own_error(prefect_harness, failing_stage, tmp_path, monkeypatch):
    from flows.pipeline import pipeline

    monkeypatch.setenv("LMPIPE_ROOT", str(tmp_path))
    with pytest.raises(OSError, match="No space left on device"):
        pipeline(config=tiny(), only=["disk_full"])
    assert not (tmp_path / "disk_full").exists()
