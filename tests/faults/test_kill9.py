"""Fault injection (marked `fault`, run by CI after the default suite): `kill -9` of `lmpipe run --preset tiny`
at random moments, again and again, until a run finishes; the artifacts then equal those of an uninterrupted run
byte for byte (timing files aside), `lmpipe verify` passes and no Prefect server is left behind. Then every kind
of artifact file is corrupted in turn: `verify` names it and a build that reads it refuses to start."""

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.watchdog import alive, descendants
from tests.faults.common import lmpipe
from tests.processes import REPO, lmpipe_env

pytestmark = pytest.mark.fault

TIMING_FILES = {"manifest.json", "_SUCCESS", "metrics.parquet", "speculative.parquet", "report.md"}
"""Files that record wall-clock times (training tokens/s, decoding seconds, build times): not compared."""


def _digests(root: Path) -> dict[str, str]:
    """stage/key/file -> sha256 of every artifact file, from the manifests (timing files left out)."""
    out = {}
    for manifest_path in sorted(root.glob("*/*/manifest.json")):
        manifest = json.loads(manifest_path.read_text())
        for entry in manifest["files"]:
            name = Path(entry["path"]).name
            if name not in TIMING_FILES and not (name.startswith("part-") and name.endswith(".json")):
                out[f"{manifest['stage']}/{manifest['key']}/{entry['path']}"] = entry["sha256"]
    return out


@pytest.mark.timeout(1500)
def test_kill_9_at_random_moments_then_identical_artifacts(tmp_path):
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    assert lmpipe(clean, "run", "--preset", "tiny").returncode == 0
    rng = random.Random(int(os.environ.get("LMPIPE_FAULT_SEED", "0")))
    kills = 0
    for _ in range(12):
        run = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "--preset", "tiny"], cwd=REPO,
                               env=lmpipe_env(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(3.0, 25.0))
        children = descendants(run.pid)
        if run.poll() is not None:
            assert run.returncode == 0
            break
        run.kill()
        run.wait()
        kills += 1
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(alive(pid) for pid in children):
            time.sleep(0.2)
        assert not any(alive(pid) for pid in children), "a child of the killed run is still alive"
    final = lmpipe(killed, "run", "--preset", "tiny")
    assert final.returncode == 0, final.stderr[-3000:]
    assert kills >= 2
    assert _digests(killed) == _digests(clean)
    verify = lmpipe(killed, "verify")
    assert verify.returncode == 0, verify.stdout[-2000:]


@pytest.mark.parametrize("stage, file", [
    ("tokenize_corpus", "stream-train.npy"), ("train_reference", "model.safetensors"),
    ("score_reference", "part-train-000.parquet"), ("train_sae", "sae.safetensors"),
    ("extract_concepts", "concepts.parquet"), ("train_target", "model.safetensors"),
])
@pytest.mark.timeout(900)
def test_each_kind_of_corrupt_file_is_named_and_refused(tmp_path_factory, stage, file):
    root = tmp_path_factory.getbasetemp() / "corrupt-root"
    if not (root / "evaluate").exists():
        assert lmpipe(root, "run", "--preset", "tiny").returncode == 0
    target = sorted(root.glob(f"{stage}/*/{file}"))[0]
    original = target.read_bytes()
    try:
        target.write_bytes(original[:-8] + bytes(8 - i for i in range(8)))  # same size, other bytes
        verify = lmpipe(root, "verify")
        assert verify.returncode == 1 and f"CORRUPT {stage}/" in verify.stdout and file in verify.stdout
        rebuild = lmpipe(root, "run", "--preset", "tiny", "--force", "evaluate")  # evaluate reads every kind
        assert rebuild.returncode == 2 and "is corrupt" in rebuild.stderr and stage in rebuild.stderr, \
            rebuild.stderr[-2000:]
    finally:
        target.write_bytes(original)
    assert lmpipe(root, "verify").returncode == 0
