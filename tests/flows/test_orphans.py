"""No orphans: the Prefect server a `lmpipe run` or `lmpipe server` started ends with it, even after kill -9
(real processes and real signals)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.watchdog import alive, descendants
from tests.processes import REPO, free_port, lmpipe_env, wait_for

pytestmark = pytest.mark.flow



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
                           env=lmpipe_env(tmp_path / "artifacts"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        servers = wait_for(lambda: _server_pids(run.pid), 120, "the temporary Prefect server")
        time.sleep(1.0)  # the watchdog polls every 0.5 s
        run.kill()
        run.wait()
        wait_for(lambda: not any(alive(pid) for pid in servers), 15, f"server {servers} to end")
    finally:
        run.kill()


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs /proc (Linux)")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_lmpipe_server_child_ends_with_it(tmp_path, sig):
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "flows.cli", "server", "--port", str(port)], cwd=REPO,
                              env=lmpipe_env(tmp_path / "artifacts"), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        children = wait_for(lambda: _server_pids(server.pid), 60, "the Prefect server child")
        started = time.monotonic()
        os.kill(server.pid, sig)
        server.wait(timeout=30)
        wait_for(lambda: not any(alive(pid) for pid in children), 30, f"server {children} to end")
        assert time.monotonic() - started < 30
    finally:
        server.kill()
