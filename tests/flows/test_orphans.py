"""No orphans: the Prefect server a `lmpipe run` or `lmpipe server` started ends with it, even after kill -9, and
Ctrl-C ends `lmpipe serve` with the flow run it was running (real processes and real signals)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.watchdog import alive, descendants
from tests.processes import REPO, free_port, lmpipe_env, prefect_api, wait_for

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


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs /proc (Linux)")
@pytest.mark.timeout(600)
def test_ctrl_c_ends_lmpipe_serve_and_the_flow_run_it_was_running(tmp_path, monkeypatch):
    """Ctrl-C (SIGINT to the terminal's process group) while a deployment's flow run trains: `lmpipe serve` ends
    within seconds and leaves no process behind. (The run's state in the API may still say RUNNING: whether its
    process reports the end before the runner shuts down is Prefect's race.)"""
    from schemas.presets import tiny
    from stages import node_builder
    from stages.dag import plan

    root, port = tmp_path / "artifacts", free_port()
    monkeypatch.setenv("LMPIPE_ROOT", str(root))
    node_builder.build_node(plan(tiny())["tokenize_corpus"], {})  # so the reference's deployment can train at once
    api, env, lmpipe = f"http://127.0.0.1:{port}/api", lmpipe_env(root), [sys.executable, "-m", "flows.cli"]
    server = subprocess.Popen(lmpipe + ["server", "--port", str(port)], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    serve = None
    try:
        wait_for(lambda: prefect_api(api, "/health"), 120, "lmpipe server")
        serve = subprocess.Popen(lmpipe + ["serve", "--preset", "tiny", "--set", "reference.train.max_tokens=400000",
                                           "--cron", "0 3 * * *"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, start_new_session=True)
        deployment = wait_for(lambda: prefect_api(api, "/deployments/filter", {
            "flows": {"name": {"any_": ["train_reference"]}}, "deployments": {"name": {"any_": ["on-demand"]}}}),
            120, "the train_reference deployment")[0]
        run = wait_for(lambda: prefect_api(api, f"/deployments/{deployment['id']}/create_flow_run", {}), 60,
                       "a flow run of it")  # the API answers 503 for a moment after the deployment appears
        wait_for(lambda: prefect_api(api, f"/flow_runs/{run['id']}")["state_type"] == "RUNNING", 180,
                 "the flow run to run")
        children = descendants(serve.pid)
        assert children, "the flow run executes in a child process of `lmpipe serve`"
        started = time.monotonic()
        os.killpg(serve.pid, signal.SIGINT)
        assert serve.wait(timeout=60) in (0, 130)
        assert time.monotonic() - started < 30
        wait_for(lambda: not any(alive(pid) for pid in children), 15, f"the flow-run processes {children} to end")
    finally:
        for process in (serve, server):
            if process is not None and process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
