"""The README and docs/ hold together: relative links reach files and headings, the README stays a front door.

Fast and Prefect-free: it only reads Markdown files.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
SETUP_COMMANDS = ('pip install torch==2.13.0 -e . && lmpipe run',
                  'pip install torch==2.13.0 -e ".[test]" && pytest -m "not fault" && pytest -m fault')
"""The README's first commands: a fresh machine's main job and test suite (.ci/run runs the second as written)."""
MAX_README_LINES = 250

FENCE = re.compile(r"^(```|~~~)")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
INLINE_CODE = re.compile(r"`[^`]*`")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (code may hold '#' comments and bracketed text that are no Markdown)."""
    lines, in_code = [], False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            in_code = not in_code
        elif not in_code:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped (hyphens and underscores kept), spaces to
    hyphens; inline-code backticks and link syntax contribute only their text."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading anchor of a page, numbered as GitHub numbers repeated headings (-1, -2, ...)."""
    found: set[str] = set()
    counts: dict[str, int] = {}
    for line in prose_lines(page.read_text(encoding="utf-8")):
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(1))
            found.add(base if base not in counts else f"{base}-{counts[base]}")
            counts[base] = counts.get(base, 0) + 1
    return found


def relative_links(page: Path) -> list[str]:
    """The link targets of a page that are not URLs (inline code and fenced code are not links)."""
    targets = []
    for line in prose_lines(page.read_text(encoding="utf-8")):
        for target in LINK.findall(INLINE_CODE.sub("", line)):
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
                targets.append(target)
    return targets


def test_slug_follows_github():
    assert slug("Continual pretraining (the `continual` preset)") == "continual-pretraining-the-continual-preset"
    assert slug("Measured on 2026-11-23 to 2026-12-03") == "measured-on-2026-11-23-to-2026-12-03"
    assert slug("train_throughput.py (2026-12-02)") == "train_throughputpy-2026-12-02"
    assert slug("Guarantees: resume, integrity, stop signals") == "guarantees-resume-integrity-stop-signals"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_reach_files_and_headings_inside_the_repository(page: Path):
    broken = []
    for target in relative_links(page):
        path_part, _, anchor = target.partition("#")
        path = (page.parent / path_part).resolve() if path_part else page
        if not path.is_relative_to(ROOT):
            broken.append(f"{target}: outside the repository")
        elif not path.exists():
            broken.append(f"{target}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{target}: no heading #{anchor} in {path.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_readme_is_a_front_door():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; move reference material to docs/"
    fence = next(i for i, line in enumerate(lines) if line.startswith("```"))
    assert fence < 10, "the set-up commands come first"
    first_commands = [line.split("#")[0].strip() for line in lines[fence + 1: fence + 3]]
    assert first_commands == list(SETUP_COMMANDS)


@pytest.mark.parametrize("index", [README, DOCS / "README.md"], ids=["README.md", "docs/README.md"])
def test_indexes_link_every_docs_page(index: Path):
    linked = {(index.parent / target.partition("#")[0]).resolve() for target in relative_links(index)}
    missing = [p.name for p in DOCS.glob("*.md") if p.name != "README.md" and p.resolve() not in linked]
    assert not missing, f"{index.relative_to(ROOT)} does not link {missing}"
