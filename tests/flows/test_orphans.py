"""No orphans: the Prefect server a `lmpipe run` or `lmpipe server` started ends with it, even after kill -9
(real processes and real signals)."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.watchdog import alive, descendants

pytestmark = pytest.mark.flow

REPO = Path(__file__).resolve().parents[2]


def _env(root: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return env | {"LMPIPE_ROOT": str(root), "DO_NOT_TRACK": "1", "PYTHONPATH": str(REPO)}


def _wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def _server_pids(pid: int) -> set[int]:
    """Descendants of pid that are a Prefect server (uvicorn or `prefect server start`)."""
    found = set()
    for child in descendants(pid):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "uvicorn" in cmdline or "server start" in cmdline:
            found.add(child)
    return found


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs /proc (Linux)")
def test_kill_9_of_lmpipe_run_ends_its_temporary_prefect_server(tmp_path):
    run = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "--preset", "tiny"], cwd=REPO,
                           env=_env(tmp_path / "artifacts"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        servers = _wait_for(lambda: _server_pids(run.pid), 120, "the temporary Prefect server")
        time.sleep(1.0)  # the watchdog polls every 0.5 s
        run.kill()
        run.wait()
        _wait_for(lambda: not any(alive(pid) for pid in servers), 15, f"server {servers} to end")
    finally:
        run.kill()


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs /proc (Linux)")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_lmpipe_server_child_ends_with_it(tmp_path, sig):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "flows.cli", "server", "--port", str(port)], cwd=REPO,
                              env=_env(tmp_path / "artifacts"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        children = _wait_for(lambda: _server_pids(server.pid), 60, "the Prefect server child")
        started = time.monotonic()
        os.kill(server.pid, sig)
        server.wait(timeout=30)
        _wait_for(lambda: not any(alive(pid) for pid in children), 30, f"server {children} to end")
        assert time.monotonic() - started < 30
    finally:
        server.kill()
