"""The manifest every artifact directory carries (`manifest.json`) and every stage task returns."""

from pydantic import BaseModel, ConfigDict


class UpstreamRef(BaseModel):
    """An upstream artifact as a build consumed it: where it is and the content digest it had then."""

    model_config = ConfigDict(frozen=True)

    stage: str
    key: str
    digest: str
    """storage.artifacts.content_digest of the upstream at build time (its files' hashes, not its timestamps)."""


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
    upstream_refs: dict[str, UpstreamRef] = {}
    """Upstream role -> the upstream artifact and its content digest when this one was built: a rebuilt upstream
    with different content makes this artifact stale (storage.artifacts.stale_roles)."""
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
