"""SIGTERM to `lmpipe run --only STAGE` a moment into every stage, forced rebuilds included: the run exits 143
within seconds and no finished artifact is lost or corrupted. Then `kill -9` during train_sae: the re-run
resumes from the SAE's checkpoint and builds the same SAE as an uninterrupted run.

All on one root with the tiny preset built once. The cases go downstream first, because a forced build that
finishes before it sees the stop publishes an artifact (with other timing files), which makes its downstream
artifacts stale (not corrupt)."""

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.watchdog import alive, descendants
from tests.faults.common import file_digest, finished_manifests, lmpipe
from tests.processes import REPO, lmpipe_env, wait_for

pytestmark = pytest.mark.fault

STOP_BOUND_S = 30
"""How long a stopped run may take from SIGTERM to its exit (Prefect's temporary server included)."""
CHECKPOINTED = r"saved a checkpoint at step \d+/\d+"
BETWEEN_SHARDS = r"stopped (before shard|in (a )?shard)"
FINISHED_FIRST = r"finished before it could stop"

CASES = [  # (node, extra args, what the stop message must say)
    ("evaluate", ["--force", "evaluate"], r"evaluate stopped before model"),
    ("train_target.ntp", ["--force", "train_target.ntp"], f"{CHECKPOINTED}|{FINISHED_FIRST}"),
    ("train_target.ntp", ["--set", "target.train.max_tokens=50000000"], CHECKPOINTED),
    ("extract_concepts", ["--force", "extract_concepts"], BETWEEN_SHARDS),
    ("extract_concepts", ["--set", "concepts.batch_size=1"], BETWEEN_SHARDS),
    ("train_sae", ["--force", "train_sae"], f"{CHECKPOINTED}|{FINISHED_FIRST}"),
    ("train_sae", ["--set", "sae.max_tokens=1500000"], CHECKPOINTED),
    ("score_reference", ["--force", "score_reference"], BETWEEN_SHARDS),
    ("score_reference", ["--set", "score.batch_size=1"], BETWEEN_SHARDS),
    ("train_teacher", ["--force", "train_teacher"], f"{CHECKPOINTED}|{FINISHED_FIRST}"),
    ("train_teacher", ["--set", "teacher.train.max_tokens=50000000"], CHECKPOINTED),
    ("train_reference", ["--force", "train_reference"], f"{CHECKPOINTED}|{FINISHED_FIRST}"),
    ("train_reference", ["--set", "reference.train.max_tokens=50000000"], CHECKPOINTED),
    ("tokenize_corpus", ["--force", "tokenize_corpus"], FINISHED_FIRST),  # no safe point inside: finishes, stops
]
"""A forced case rebuilds the tiny artifact; the other one builds a longer variant (a new key) from scratch, so
the stop surely lands inside the stage (and, for score_reference and extract_concepts, inside a shard task)."""


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stop") / "artifacts"
    built = lmpipe(root, "run", "--preset", "tiny")
    assert built.returncode == 0, built.stderr[-3000:]
    return root


def _started(log: Path, root: Path, stage: str, build_dirs_before: set[Path]) -> bool:
    """The stage has begun: its build logged, or (shard tasks, which log nothing at first) a new build dir."""
    return f"building {stage}/" in log.read_text() or bool(set(root.glob(f"_tmp/{stage}-*")) - build_dirs_before)


@pytest.mark.parametrize("node, args, said", CASES, ids=[f"{n}{'-forced' if '--force' in a else ''}"
                                                        for n, a, _ in CASES])
@pytest.mark.timeout(300)
def test_sigterm_stops_the_stage_with_143_and_keeps_finished_artifacts(root, tmp_path, node, args, said):
    stage = node.split(".")[0]
    before = finished_manifests(root)
    build_dirs = set(root.glob(f"_tmp/{stage}-*"))
    log = tmp_path / "run.log"
    with log.open("w") as out:
        run = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "--preset", "tiny", "--only", node, *args],
                               cwd=REPO, env=lmpipe_env(root), stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: run.poll() is not None or _started(log, root, stage, build_dirs), 240, f"{stage} to start")
        assert run.poll() is None, log.read_text()[-3000:]
        time.sleep(0.3)  # a moment into the stage
        sent = time.monotonic()
        run.send_signal(signal.SIGTERM)
        run.wait(timeout=120)
        seconds = time.monotonic() - sent
    finally:
        run.kill()
    text = log.read_text()
    assert run.returncode == 143, text[-3000:]
    assert seconds < STOP_BOUND_S, f"{seconds:.1f}s from SIGTERM to exit"
    stopped = [line for line in text.splitlines() if line.startswith("lmpipe: stopped by a signal")]
    assert stopped and re.search(said, stopped[-1]), text[-3000:]
    after = finished_manifests(root)
    kept = {name for name in before if name.split("/")[0] != stage or "--force" not in args}
    assert all(after.get(name) == before[name] for name in kept)  # untouched, but the forced one (maybe rebuilt)
    assert set(before) <= set(after)
    verify = lmpipe(root, "verify")
    assert "CORRUPT" not in verify.stdout, verify.stdout[-3000:]


@pytest.mark.timeout(600)
def test_kill_9_during_train_sae_resumes_from_its_checkpoint_to_the_same_sae(root):
    args = ["run", "--preset", "tiny", "--only", "train_sae", "--set", "sae.max_tokens=150000"]
    whole = lmpipe(root, *args)
    assert whole.returncode == 0, whole.stderr[-3000:]
    key = next(p.parent.name for p in root.glob("train_sae/*/manifest.json")
               if '"max_tokens": 150000' in p.read_text())
    uninterrupted = file_digest(root, "train_sae", key, "sae.safetensors")
    run = subprocess.Popen([sys.executable, "-m", "flows.cli", *args, "--force", "train_sae"], cwd=REPO,
                           env=lmpipe_env(root), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: run.poll() is not None or list(root.glob(f"_tmp/train_sae-{key}/checkpoints/step-*")),
                 240, "the SAE's first checkpoint")
        assert run.poll() is None, "train_sae finished before it could be killed"
        children = descendants(run.pid)
        run.kill()
        run.wait()
    finally:
        run.kill()
    wait_for(lambda: not any(alive(pid) for pid in children), 15, "the killed run's children to end")
    resumed = lmpipe(root, *args, "--force", "train_sae")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert re.search(r"train_sae: resuming from .*step-\d+ \(step [1-9]\d*/\d+\)", resumed.stdout + resumed.stderr)
    assert file_digest(root, "train_sae", key, "sae.safetensors") == uninterrupted  # same process type and threads
