"""The manifest every artifact directory carries (`manifest.json`) and every stage task returns."""

from pydantic import BaseModel, ConfigDict


class FileEntry(BaseModel):
    """One file of an artifact: path relative to the artifact dir, size and content hash."""

    model_config = ConfigDict(frozen=True)

    path: str
    size_bytes: int
    sha256: str


class Manifest(BaseModel):
    """What a finished artifact is: where it lives, what built it, and its headline numbers."""

    model_config = ConfigDict(frozen=True)

    stage: str
    """Stage name (= module in stages/, Prefect task, artifact folder)."""
    key: str
    """Content key: hash of stage, code version, config and upstream keys."""
    path: str
    """Absolute path of the artifact directory."""
    code_version: str
    """The stage's code version at build time."""
    config: dict
    """The stage config, as JSON."""
    upstream: dict[str, str]
    """Upstream role -> artifact key."""
    files: list[FileEntry] = []
    """Every file of the artifact with size and sha256."""
    summary: dict = {}
    """Headline numbers (counts, final losses) for `lmpipe status` and reports."""
    created_at: str = ""
    """UTC ISO timestamp when the artifact was finished."""
    build_seconds: float = 0.0
    """Wall time of the build."""

    def file(self, name: str) -> str:
        """Absolute path of one file of this artifact."""
        return f"{self.path}/{name}"
