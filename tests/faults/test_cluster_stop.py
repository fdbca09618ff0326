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


def test_sigterm_stops_targets_training_on_dask_workers(tmp_path):
    pytest.importorskip("prefect_dask")
    root = tmp_path / "artifacts"
    run = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "--preset", "tiny", "--task-runner", "dask",
                            *LONG_TARGETS], cwd=REPO, env=lmpipe_env(root), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: list(root.glob("_tmp/train_target-*/checkpoints/step-*")), 240, "a target's checkpoint")
        sent = time.monotonic()
        run.send_signal(signal.SIGTERM)
        out, _ = run.communicate(timeout=90)
        assert time.monotonic() - sent < 90 and run.returncode != 0
        assert "saved a checkpoint at step" in out, out[-3000:]
        assert not list(root.glob("_stop/run-*"))  # the run's stop file is removed at the end
    finally:
        run.kill()
