"""Benchmark of `lmpipe inspect`: time to draw a 10,000-token document in headless Chromium, server memory.

    lmpipe run --preset tiny && python benchmarks/inspector_render.py [--preset tiny] [--tokens 10000]

Starts `lmpipe inspect` on a free port over the artifacts of $LMPIPE_ROOT, opens the document view of the
longest document and times, in the page, (1) building the token spans and colouring them by the default column
and (2) recolouring by another column (best of a few runs each; the fetch of the document's JSON is timed apart).
The server's memory is its resident set (VmHWM, the peak) after these requests. Goal: drawing under 1 s.
"""

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking"]


@contextlib.contextmanager
def inspector_server(config_args: list[str], max_tokens: int = 20_000):
    """`lmpipe inspect` on a free port: yields (base URL, process); stopped at exit."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = os.environ | {"PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-m", "flows.cli", "inspect", *config_args, "--port", str(port),
                                "--max-tokens", str(max_tokens)], cwd=REPO, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/overview", timeout=5).read()
                break
            except OSError:
                if process.poll() is not None or time.time() > deadline:
                    raise RuntimeError("lmpipe inspect did not start") from None
                time.sleep(0.3)
        yield base, process
    finally:
        process.terminate()
        process.wait(timeout=30)


@contextlib.contextmanager
def browser_page(width: int = 1400, height: int = 900):
    """A Playwright page in the system's headless Chromium."""
    from playwright.sync_api import sync_playwright

    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        raise SystemExit("needs a Chromium executable (apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield browser.new_page(viewport={"width": width, "height": height})
        finally:
            browser.close()


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident set in MiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


TIME_RENDER = """async ([split, doc, column, other]) => {
  const t0 = performance.now();
  const data = await api("document", {split, doc_id: doc});
  const fetched = performance.now() - t0;
  const draws = [], recolours = [];
  for (let r = 0; r < 3; r++) {
    const t1 = performance.now();
    renderDocument(data, column, {});
    document.body.offsetHeight;  // force layout: drawn, not just built
    draws.push(performance.now() - t1);
    const t2 = performance.now();
    colour(other);
    document.body.offsetHeight;
    recolours.push(performance.now() - t2);
  }
  return {fetched, draw: Math.min(...draws), recolour: Math.min(...recolours), tokens: data.text.length};
}"""


def main() -> None:
    """Run the benchmark and print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", help="the config's preset (default: the last run's)")
    parser.add_argument("--tokens", type=int, default=10_000, help="tokens of the document drawn")
    args = parser.parse_args()
    with inspector_server(["--preset", args.preset] if args.preset else [], args.tokens) as (base, server):
        overview = json.loads(urllib.request.urlopen(f"{base}/api/overview").read())
        split = max(overview["splits"], key=lambda s: s["tokens"] / s["documents"])["split"]
        docs = json.loads(urllib.request.urlopen(f"{base}/api/documents?split={split}&limit=200").read())
        doc = max(docs, key=lambda d: d["num_tokens"])["doc_id"]
        columns = [c["id"] for c in overview["columns"]]
        with browser_page() as page:
            page.goto(f"{base}/#/run")
            page.locator("figure img").first.wait_for()
            result = page.evaluate(TIME_RENDER, [split, doc, columns[0], columns[-1]])
        result |= {"split": split, "doc_id": doc, "server_peak_rss_mib": round(peak_rss_mib(server.pid), 1),
                   "draw_ms": round(result.pop("draw"), 1), "recolour_ms": round(result.pop("recolour"), 1),
                   "fetch_ms": round(result.pop("fetched"), 1)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
