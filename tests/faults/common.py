"""Helpers of the fault tests: run `lmpipe` on a root, and what a root holds."""

import json
import subprocess
import sys
from pathlib import Path

from tests.processes import REPO, lmpipe_env


def lmpipe(root: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """`python -m flows.cli ARGS` on the artifact root `root`, to completion; stdout and stderr as text."""
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=lmpipe_env(root),
                          capture_output=True, text=True, timeout=timeout)


def finished_manifests(root: Path) -> dict[str, str]:
    """stage/key -> manifest.json text of every finished artifact (one with _SUCCESS) under a local root."""
    return {f"{p.parent.parent.name}/{p.parent.name}": (p.parent / "manifest.json").read_text()
            for p in sorted(Path(root).glob("*/*/_SUCCESS"))}


def file_digest(root: Path, stage: str, key: str, name: str) -> str:
    """The sha256 a finished artifact's manifest lists for one of its files."""
    manifest = json.loads((Path(root) / stage / key / "manifest.json").read_text())
    return next(f["sha256"] for f in manifest["files"] if f["path"] == name)
