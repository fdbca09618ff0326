"""`lmpipe inspect` as a person sees it, in headless Chromium (Playwright with the system's chromium), on the
tiny pipeline's artifacts: the colours of the document view, its hover values against `lmpipe sql`, switching
the column, a latent's top context, the latent search, and bad input shown as a message. Set
LMPIPE_INSPECT_ROOT to an artifact root that already holds a tiny run to skip building one."""

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request

import pytest

from tests.processes import REPO, free_port, lmpipe_env, wait_for

pytestmark = [pytest.mark.flow, pytest.mark.browser]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
playwright_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright package")
LMPIPE = [sys.executable, "-m", "flows.cli"]


@pytest.fixture(scope="module")
def inspector(tmp_path_factory):
    """(base URL, sql(query) -> rows) of `lmpipe inspect` over a tiny run."""
    root = os.environ.get("LMPIPE_INSPECT_ROOT") or tmp_path_factory.mktemp("inspect") / "artifacts"
    env = lmpipe_env(root)
    run = subprocess.run(LMPIPE + ["run", "--preset", "tiny"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]

    def sql(query: str) -> list[dict]:
        done = subprocess.run(LMPIPE + ["sql", "--preset", "tiny", "--json", query], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    port = free_port()
    server = subprocess.Popen(LMPIPE + ["inspect", "--preset", "tiny", "--port", str(port)], cwd=REPO, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: urllib.request.urlopen(f"{base}/api/overview", timeout=5).read(), 120, "lmpipe inspect")
        yield base, sql
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def page(inspector):
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu",
                                                                             "--disable-dev-shm-usage"])
        yield browser.new_page(viewport={"width": 1400, "height": 1000})
        browser.close()


def four_digits(value: float) -> float:
    return float(f"{value:.4g}")


@pytest.mark.skipif(CHROMIUM is None, reason="needs a Chromium executable (apt-get install chromium)")
def test_document_colours_hover_values_and_column_switch(inspector, page):
    base, sql = inspector
    top = sql("SELECT doc_id, token_index, excess_loss, target_loss, ref_loss FROM target_token_losses "
              "WHERE model = 'train_target.slm' AND split = 'val' ORDER BY excess_loss DESC LIMIT 1")[0]
    first = sql(f"SELECT min(token_index) AS i FROM tokens WHERE split = 'val' AND doc_id = {top['doc_id']}")[0]["i"]
    page.goto(f"{base}/#/doc?split=val&doc={top['doc_id']}&column=excess_loss:train_target.slm")
    token = page.locator(f"#doc-text .tok[data-i='{top['token_index'] - first}']")
    token.wait_for()
    strongest = page.locator("#legend").get_attribute("data-strongest")
    colour = token.evaluate("span => span.style.backgroundColor")
    assert colour == strongest == "rgb(33, 102, 172)"  # the blue end of the diverging scale
    others = page.evaluate("[...document.querySelectorAll('#doc-text .tok')].filter(s => s.style.backgroundColor"
                           f" === '{strongest}').length")
    assert others >= 1

    token.hover()
    tip = page.locator("#tip")
    tip.wait_for()
    shown = {row.locator("th").inner_text(): row.locator("td").inner_text() for row in tip.locator("tr").all()}
    assert int(shown["token_index"]) == top["token_index"]
    for column, value in (("excess_loss:train_target.slm", top["excess_loss"]),
                          ("target_loss:train_target.slm", top["target_loss"]), ("ref_loss", top["ref_loss"])):
        assert float(shown[column]) == pytest.approx(four_digits(value), rel=1e-6), column

    page.select_option("#column", "ref_loss")
    assert token.evaluate("span => span.style.backgroundColor") != colour
    assert "column=ref_loss" in page.url


@pytest.mark.skipif(CHROMIUM is None, reason="needs a Chromium executable (apt-get install chromium)")
def test_latent_top_context_holds_its_strongest_token_and_search_finds_it(inspector, page):
    base, sql = inspector
    latent = sql("SELECT c.concept_id, v.token, c.text FROM latent_contexts c JOIN vocab v ON v.token_id = "
                 "c.token_ids[c.token_index - c.start_index + 1] WHERE c.rank = 1 ORDER BY c.activation DESC, "
                 "c.concept_id LIMIT 1")[0]
    page.goto(f"{base}/#/latent/{latent['concept_id']}")
    peak = page.locator("#contexts .context").first.locator(".peak")
    peak.wait_for()
    assert peak.inner_text() == latent["token"].strip() or peak.text_content() == latent["token"]
    activations = page.locator("#contexts .context").first.locator(".tok").evaluate_all(
        "spans => spans.map(s => parseFloat(s.title.replace('activation ', '')))")
    assert max(activations) == float(peak.get_attribute("title").replace("activation ", ""))

    word = max(re.findall(r"[A-Za-z]{4,}", latent["text"]), key=len)
    page.goto(f"{base}/#/latents?q={word}")
    page.locator("#latent-list li a").first.wait_for()
    listed = page.locator("#latent-list li a").all_inner_texts()
    assert any(text.startswith(f"#{latent['concept_id']} ") for text in listed), (word, listed[:5])


@pytest.mark.skipif(CHROMIUM is None, reason="needs a Chromium executable (apt-get install chromium)")
def test_bad_input_is_a_message_in_the_page(inspector, page):
    base, _ = inspector
    page.goto(f"{base}/#/doc?split=val&doc=987654")
    message = page.locator("#message")
    message.wait_for()
    assert "no document 987654 in split 'val'" in message.inner_text()
    page.goto(f"{base}/#/doc?split=val&doc=0&column=no_such_column")
    page.wait_for_function("document.querySelector('#message').textContent.includes('no column')")
    page.goto(f"{base}/#/run")
    page.locator("figure img").first.wait_for()
    assert page.locator("table.grid a").count() >= 2  # each row links into the document view
