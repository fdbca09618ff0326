"""A failure ends the run promptly with its own error: a failed shard or target is reported as itself (not as
Prefect's "Run is in PENDING state" of the task that waited for it), and its dependants do not keep the run
waiting for ever (Prefect leaves them Pending("NotReady")); the run's other task runs stop at a safe point."""

import errno
import shutil
import time
from pathlib import Path

import pytest

import flows.pipeline  # noqa: F401 - its stage flows are made at import: before the toy stage is registered
from schemas.configs import ScoreConfig
from schemas.presets import tiny
from stages import node_builder
from stages.dag import plan
from stages.registry import NodeDecl, Shards, Stage, register, unregister
from stages.runtime import interrupt
from storage.artifacts import CorruptArtifactError

pytestmark = pytest.mark.flow

FAST_S = 60
"""A failed run must end well within this (the hang it replaces ended only after a second signal, 683 s in)."""
RUNNERS = ["thread", pytest.param("dask", marks=pytest.mark.cluster)]


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
DOWNSTREAM = Stage(
    name="after_disk_full", code_version="1", config_type=ScoreConfig,
    nodes=lambda cfg: [NodeDecl("after_disk_full", ScoreConfig(), {"parts": "disk_full"})],
    run=lambda cfg, inputs, out: {})


@pytest.fixture
def failing_stage():
    register(FAILING)
    register(DOWNSTREAM)
    yield FAILING
    unregister(DOWNSTREAM.name)
    unregister(FAILING.name)


def test_a_failed_shard_is_reported_as_its_own_error(prefect_harness, failing_stage, tmp_path, monkeypatch):
    from flows.pipeline import pipeline

    monkeypatch.setenv("LMPIPE_ROOT", str(tmp_path))
    with pytest.raises(OSError, match="(?i)no space left"):  # node_builder names the disk
        pipeline(config=tiny(), only=["disk_full"])
    assert not (tmp_path / "disk_full").exists()


def test_a_failed_shard_fails_its_dependants_at_once(prefect_harness, failing_stage, tmp_path, monkeypatch):
    from flows.pipeline import pipeline

    monkeypatch.setenv("LMPIPE_ROOT", str(tmp_path))
    started = time.monotonic()
    with pytest.raises(OSError, match="(?i)no space left"):  # node_builder names the disk
        pipeline(config=tiny(), only=["disk_full", "after_disk_full"])
    assert time.monotonic() - started < FAST_S
    assert not (tmp_path / "after_disk_full").exists()


# The real stages, failing for a real reason: an upstream artifact corrupted after it was built, which every build
# (and every shard) refuses when it re-hashes its inputs. Deterministic, and seen by Dask worker processes too.

BUILT = ("tokenize_corpus", "train_reference", "score_reference", "train_teacher", "train_sae")


def _config(variants=("ntp", "slm", "cocomix")):
    """The tiny preset with fewer target variants (by default: plain, selecting and concepts)."""
    cfg = tiny()
    variants = [v for v in cfg.target.variants if v.name in variants]
    return cfg.model_copy(update={"target": cfg.target.model_copy(update={"variants": variants})})


@pytest.fixture(scope="module")
def built_upstream(tmp_path_factory, monkeypatch_module):
    """A root with BUILT built once (Prefect-free, ~15 s), copied by each test."""
    root = tmp_path_factory.mktemp("upstream")
    monkeypatch_module.setenv("LMPIPE_ROOT", str(root))
    nodes, built = plan(_config()), {}
    for name in BUILT:
        node = nodes[name]
        inputs = {role: built[up] for role, up in node.upstream.items()}
        for shard in node_builder.shard_ids(node, inputs):
            node_builder.build_shard(node, inputs, shard)
        built[name] = node_builder.build_node(node, inputs)
    return root


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture
def root(built_upstream, tmp_path, monkeypatch):
    """A copy of the built upstream as this test's LMPIPE_ROOT."""
    copy = tmp_path / "artifacts"
    shutil.copytree(built_upstream, copy, ignore=shutil.ignore_patterns("_locks", "_stop", "_tmp"))
    monkeypatch.setenv("LMPIPE_ROOT", str(copy))
    return copy


def _corrupt(node_name: str, pattern: str) -> Path:
    """Flip one byte in the middle of the first file of a built node that matches pattern."""
    path = sorted(plan(_config())[node_name].path().glob(pattern))[0]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    return path


FAILURES = {  # what fails: (the upstream node whose file is corrupted, that file, the nodes the run builds)
    "score_shard": ("train_reference", "model.safetensors", ["score_reference", "train_target.slm"]),
    "extraction_shard": ("train_sae", "sae.safetensors", ["extract_concepts", "train_target.cocomix"]),
    "target": ("score_reference", "part-train-*.parquet", ["train_target.ntp", "train_target.slm", "evaluate"]),
}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("kind", RUNNERS)
@pytest.mark.parametrize("failing", sorted(FAILURES))
def test_a_failure_ends_the_run_at_once_with_its_own_error(prefect_harness, root, kind, failing):
    """The failing shard or target fails the run within seconds; its dependants never build, and the other
    target (ntp, training when slm fails) is stopped through the run's stop file, not this process's flag."""
    from flows.pipeline import pipeline
    from flows.task_runners import task_runner

    upstream, pattern, only = FAILURES[failing]
    cfg = _config(("ntp", "slm")) if failing == "target" else _config()
    if failing == "score_shard":
        shutil.rmtree(plan(cfg)["score_reference"].path())  # the upstream fixture built it: score it again
    corrupt = _corrupt(upstream, pattern)
    flow = pipeline.with_options(task_runner=task_runner(kind, 2)) if kind != "thread" else pipeline
    started = time.monotonic()
    with pytest.raises(CorruptArtifactError, match=corrupt.name):
        flow(config=cfg, only=only)
    assert time.monotonic() - started < FAST_S
    assert not any(plan(cfg)[name].is_built() for name in only if name != "train_target.ntp")
    assert not interrupt.STOP.is_set()


@pytest.mark.timeout(300)
def test_lmpipe_run_shows_the_error_as_one_line_and_keeps_the_traceback_in_its_log(root):
    """Prefect logs each failed task run's traceback; the terminal gets them as one line each, the run's log file
    gets them whole (a real `lmpipe run`, with its own temporary Prefect server)."""
    import subprocess
    import sys

    from tests.processes import REPO, lmpipe_env

    corrupt = _corrupt("train_sae", "sae.safetensors")
    run = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--preset", "tiny", "--only", "extract_concepts",
                          "--only", "train_target.cocomix"], cwd=REPO, env=lmpipe_env(root), capture_output=True,
                         text=True, timeout=240)
    assert run.returncode == 2, run.stderr[-3000:]
    assert "Traceback" not in run.stdout + run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("lmpipe: error:")]
    assert len(errors) == 1 and corrupt.name in errors[0]
    (log,) = (root / "_logs").glob("run-*.log")
    assert f"(traceback: {log}; finished artifacts are intact)" in run.stderr
    assert "Traceback" in log.read_text() and "CorruptArtifactError" in log.read_text()
