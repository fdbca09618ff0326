"""Two real `lmpipe run` processes on one artifact root at the same time: no race on score or concept shards
(shard writers share the key's lock, publishing takes it exclusively; temporary files are per process)."""

import subprocess
import sys

import pytest

from tests.processes import REPO, lmpipe_env

pytestmark = pytest.mark.flow



@pytest.mark.parametrize("trial", [1, 2])
def test_two_runs_at_once_both_succeed_and_verify(tmp_path, trial):
    env = lmpipe_env(tmp_path / "artifacts")
    command = [sys.executable, "-m", "flows.cli", "run", "--preset", "tiny"]
    runs = [subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for _ in range(2)]
    outputs = [run.communicate(timeout=600)[0] for run in runs]
    for run, out in zip(runs, outputs, strict=True):
        assert run.returncode == 0, out[-3000:]
        assert "FileNotFoundError" not in out
    verify = subprocess.run([sys.executable, "-m", "flows.cli", "verify"], cwd=REPO, env=env, capture_output=True,
                            text=True)
    assert verify.returncode == 0 and "CORRUPT" not in verify.stdout, verify.stdout[-2000:]
