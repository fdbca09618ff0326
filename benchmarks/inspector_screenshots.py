"""Screenshots of `lmpipe inspect`'s three views from a real run, into docs/images/inspector-*.png.

    lmpipe run --preset tiny && python benchmarks/inspector_screenshots.py [--preset tiny]

Starts `lmpipe inspect` on a free port (the artifacts of $LMPIPE_ROOT), opens each view in headless Chromium
(Playwright with the system's chromium) and saves a PNG of each, kept small. Look at them after a UI change.
"""

import argparse
from pathlib import Path

from inspector_render import browser_page, inspector_server

OUT = Path(__file__).resolve().parent.parent / "docs" / "images"


def shoot(base: str, out: Path) -> list[Path]:
    """Save one PNG per view; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    shots = []
    with browser_page(width=1280, height=760) as page:
        page.goto(f"{base}/#/doc?split=val&order=excess_desc&model=train_target.slm")
        page.locator("#doc-text .tok").first.wait_for()
        token = page.locator("#doc-text .tok[style*='background']").nth(12)  # a probe token: every column set
        token.scroll_into_view_if_needed()
        token.hover()
        page.locator("#tip").wait_for()
        shots.append(out / "inspector-document.png")
        page.screenshot(path=str(shots[-1]))
        page.goto(f"{base}/#/latents?q=the")
        page.locator(".context").first.wait_for()
        shots.append(out / "inspector-concept.png")
        page.screenshot(path=str(shots[-1]))
        page.goto(f"{base}/#/run")
        page.locator("figure img").first.wait_for()
        page.wait_for_function("[...document.images].every(i => i.complete)")
        shots.append(out / "inspector-run.png")
        page.screenshot(path=str(shots[-1]))
    return shots


def main() -> None:
    """Take the screenshots (the config as `lmpipe inspect` takes it: the last run's by default)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", help="the config's preset (default: the last run's)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    with inspector_server(["--preset", args.preset] if args.preset else []) as (base, _):
        for path in shoot(base, args.out):
            print(f"{path} ({path.stat().st_size / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
