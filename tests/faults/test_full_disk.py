"""A full disk during a build: the build dirs (`<root>/_tmp`) on a 2 MiB tmpfs, too small for score_reference's
shards. The run fails with one line naming the disk problem and where, nothing is published, every finished
artifact stays intact, and with the space back the same command builds the stage. Needs `mount` (root);
skipped where mounting is not permitted."""

import subprocess
from pathlib import Path

import pytest

from tests.faults.common import finished_manifests, lmpipe

pytestmark = pytest.mark.fault


def _mount_tiny_tmpfs(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(directory)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip() or mounted.returncode}")


@pytest.mark.timeout(900)
def test_a_full_disk_fails_the_build_in_one_line_and_publishes_nothing(tmp_path):
    root = tmp_path / "artifacts"
    for stage in ("tokenize_corpus", "train_reference"):
        built = lmpipe(root, "run", "--preset", "tiny", "--only", stage)
        assert built.returncode == 0, built.stderr[-3000:]
    before = finished_manifests(root)
    _mount_tiny_tmpfs(root / "_tmp")
    try:
        full = lmpipe(root, "run", "--preset", "tiny", "--only", "score_reference")  # ~3 MB of shards
    finally:
        subprocess.run(["umount", str(root / "_tmp")], check=True)
    assert full.returncode != 0
    errors = [line for line in full.stderr.splitlines() if line.startswith("lmpipe: error:")]
    assert len(errors) == 1 and "no space left on the disk of" in errors[0], full.stderr[-3000:]
    assert str(root / "_tmp" / "score_reference-") in errors[0]
    assert not list(root.glob("score_reference/*"))  # nothing published, not even a directory without _SUCCESS
    assert finished_manifests(root) == before
    assert lmpipe(root, "verify").returncode == 0
    again = lmpipe(root, "run", "--preset", "tiny", "--only", "score_reference")
    assert again.returncode == 0, again.stderr[-3000:]
    new = set(finished_manifests(root)) - set(before)
    assert len(new) == 1 and next(iter(new)).startswith("score_reference/")
