"""The Prefect UI as a person sees it, in headless Chromium driven by Playwright: `lmpipe server`, the tiny
pipeline, its flow run (completed, with its task runs), the report artifact (its table and a plot), and one stage
triggered from its `lmpipe serve` deployment seen to complete. Skipped without a Chromium executable or the
playwright package (`.ci/run` installs both); screenshots stay in the test's temporary folder."""

import shutil
import subprocess
import sys

import pytest

from tests.processes import REPO, free_port, lmpipe_env, prefect_api, wait_for

pytestmark = [pytest.mark.flow, pytest.mark.browser]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
playwright_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright package")


@pytest.mark.skipif(CHROMIUM is None, reason="needs a Chromium executable (apt-get install chromium)")
@pytest.mark.timeout(900)
def test_the_ui_shows_the_run_the_report_and_a_stage_run_from_its_deployment(tmp_path):
    port, env = free_port(), lmpipe_env(tmp_path / "artifacts")
    lmpipe = [sys.executable, "-m", "flows.cli"]
    ui, api = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}/api"
    children = [subprocess.Popen(lmpipe + ["server", "--port", str(port)], cwd=REPO, env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        wait_for(lambda: prefect_api(api, "/health"), 120, "lmpipe server")
        run = subprocess.run(lmpipe + ["run", "--preset", "tiny"], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        flow_run = prefect_api(api, "/flow_runs/filter", {"sort": "START_TIME_DESC", "limit": 1})[0]
        report = prefect_api(api, "/artifacts/filter",
                             {"artifacts": {"key": {"any_": ["lmpipe-report"]}}, "limit": 1})[0]

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
                deployment = wait_for(lambda: prefect_api(api, "/deployments/filter", {
                    "flows": {"name": {"any_": ["evaluate"]}}, "deployments": {"name": {"any_": ["on-demand"]}}}),
                    120, "the evaluate deployment")[0]
                triggered = prefect_api(api, f"/deployments/{deployment['id']}/create_flow_run", {})
                page.goto(f"{ui}/runs/flow-run/{triggered['id']}")
                wait_for(lambda: prefect_api(api, f"/flow_runs/{triggered['id']}")["state_type"] == "COMPLETED", 300,
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
