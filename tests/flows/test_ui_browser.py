"""The Prefect UI as a person sees it, in headless Chromium driven by Playwright: `lmpipe server`, the tiny
pipeline, its flow run (completed, with its task runs), the report artifact (its table and a plot), and one stage
triggered from its `lmpipe serve` deployment seen to complete. Skipped without a Chromium executable or the
playwright package (`.ci/run` installs both); screenshots stay in the test's temporary folder."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.flow

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
playwright_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright package")


def _api(base: str, path: str, body: dict | None = None):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"{base}{path}", data=data, method="POST" if data is not None else "GET",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read() or b"null")


def _wait(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except OSError:
            value = None
        if value:
            return value
        time.sleep(1.0)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


@pytest.mark.skipif(CHROMIUM is None, reason="needs a Chromium executable (apt-get install chromium)")
@pytest.mark.timeout(900)
def test_the_ui_shows_the_run_the_report_and_a_stage_run_from_its_deployment(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"LMPIPE_ROOT": str(tmp_path / "artifacts"), "DO_NOT_TRACK": "1", "PYTHONPATH": str(REPO)}
    lmpipe = [sys.executable, "-m", "flows.cli"]
    ui, api = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}/api"
    children = [subprocess.Popen(lmpipe + ["server", "--port", str(port)], cwd=REPO, env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        _wait(lambda: _api(api, "/health"), 120, "lmpipe server")
        run = subprocess.run(lmpipe + ["run", "--preset", "tiny"], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        flow_run = _api(api, "/flow_runs/filter", {"sort": "START_TIME_DESC", "limit": 1})[0]
        report = _api(api, "/artifacts/filter", {"artifacts": {"key": {"any_": ["lmpipe-report"]}}, "limit": 1})[0]

        with playwright_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM,
                                                 args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            try:
                page.goto(f"{ui}/runs/flow-run/{flow_run['id']}")
                page.get_by_text("Completed").first.wait_for(timeout=60_000)
                page.get_by_text("Task Runs", exact=True).first.click()  # the tab listing its task runs
                page.get_by_text("train_target.ntp").first.wait_for(timeout=60_000)

                page.goto(f"{ui}/artifacts/artifact/{report['id']}")
                page.get_by_text("lmpipe evaluation").first.wait_for(timeout=60_000)
                assert page.locator("table").count() >= 3
                assert page.locator("td", has_text="slm").count() >= 1
                plot = page.locator("img[alt='val_loss']")
                plot.wait_for(timeout=30_000)
                assert plot.evaluate("img => img.complete && img.naturalWidth > 100")

                serve = subprocess.Popen(lmpipe + ["serve", "--preset", "tiny", "--cron", "0 3 * * *"], cwd=REPO,
                                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                children.append(serve)
                deployment = _wait(lambda: _api(api, "/deployments/filter", {
                    "flows": {"name": {"any_": ["evaluate"]}}, "deployments": {"name": {"any_": ["on-demand"]}}}),
                    120, "the evaluate deployment")[0]
                triggered = _api(api, f"/deployments/{deployment['id']}/create_flow_run", {})
                page.goto(f"{ui}/runs/flow-run/{triggered['id']}")
                _wait(lambda: _api(api, f"/flow_runs/{triggered['id']}")["state_type"] == "COMPLETED", 300,
                      "the triggered stage run to complete")
                page.reload()
                page.get_by_text("Completed").first.wait_for(timeout=60_000)
            except Exception:
                page.screenshot(path=str(tmp_path / "failure.png"), full_page=True)
                raise
            finally:
                browser.close()
    finally:
        for child in reversed(children):
            child.terminate()
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
