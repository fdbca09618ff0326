"""A stop signal to `lmpipe run` reaches task runs on a Dask cluster's worker processes: they checkpoint at the
next step and stop (through the run's stop file), instead of training on to the end."""

import signal
import subprocess
import sys
import time

import pytest

from tests.processes import REPO, lmpipe_env, wait_for

pytestmark = [pytest.mark.fault, pytest.mark.flow]

LONG_TARGETS = ["--set", "target.train.max_tokens=50000000", "--set", "target.train.checkpoint_every_steps=2",
                "--set", "target.variants=[{\"name\": \"ntp\"}]"]
"""Tiny's single ntp target trained for ~100k steps (hours): it can only end early by stopping."""


@pytest.mark.parametrize("root_kind", ["local", "s3"])
def test_sigterm_stops_targets_training_on_dask_workers(root_kind, tmp_path, request):
    """With an S3 root the stop file is an object in the bucket, which the workers can only see through S3."""
    pytest.importorskip("prefect_dask")
    if root_kind == "s3":
        root, builds = request.getfixturevalue("s3_root"), tmp_path / "mirror"  # the fixture sets LMPIPE_CACHE
    else:
        root = builds = tmp_path / "artifacts"
    run = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "--preset", "tiny", "--task-runner", "dask",
                            *LONG_TARGETS], cwd=REPO, env=lmpipe_env(root), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: list(builds.glob("_tmp/train_target-*/checkpoints/step-*")), 240, "a target's checkpoint")
        sent = time.monotonic()
        run.send_signal(signal.SIGTERM)
        out, _ = run.communicate(timeout=90)
        assert time.monotonic() - sent < 90 and run.returncode != 0
        assert "saved a checkpoint at step" in out, out[-3000:]
        assert not _stop_files(root)  # the run's stop file is removed at the end
        assert root_kind == "local" or not (builds / "_stop").exists()  # it was in the bucket, not the mirror
    finally:
        run.kill()


def _stop_files(root) -> list:
    if isinstance(root, str):
        import fsspec

        return fsspec.filesystem("s3", skip_instance_cache=True).glob(f"{root.removeprefix('s3://')}/_stop/run-*")
    return list(root.glob("_stop/run-*"))
