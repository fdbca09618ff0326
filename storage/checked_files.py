"""Cheap integrity checks of the artifact files a reader is about to serve (the DuckDB catalog of `lmpipe sql`).

Every time: each file the reader will read is listed in its artifact's manifest with the size it has now. Once
per file version: its sha256 against the manifest (storage/store.py's `verify`), remembered in
`<root>/_cache/verified.json` by (path, size, mtime_ns) so the next query does not re-hash an unchanged file.
An object-store root gets the size checks only: hashing would download every object on every new version, and
nothing here is downloaded to query (`lmpipe verify` re-hashes in place). The cache is a shortcut, not a proof:
a file edited with its size and mtime put back is only caught by `lmpipe verify`.
"""

import json
import logging
import os
from pathlib import Path

from schemas.manifest import Manifest
from storage.atomic import write_text_atomic
from storage.store import CorruptArtifactError, LocalStore, MissingArtifactError, Store, verify

log = logging.getLogger(__name__)

CACHE = Path("_cache") / "verified.json"
"""The verification cache, relative to the (local) root: {path: [size, mtime_ns, sha256 it matched]}."""


class CheckedFiles:
    """The checks of one reader session over the store of a root, with the root's verification cache."""

    def __init__(self, store: Store):
        self.store = store
        self.cache_path = store.root / CACHE
        self.cached = _load(self.cache_path)
        self.confirmed: dict[str, list] = {}
        self.hashed = 0
        """Files re-hashed in this session (the rest: a cache hit or size-only)."""
        self._problems: dict[tuple[str, str], str | None] = {}
        self._manifests: dict[str, Manifest | None] = {}

    def problem(self, owner: Store, stage: str, key: str, files: list[str]) -> str | None:
        """The first problem of the artifact (stage, key) of `owner` as far as these files of it go, as one line
        naming the artifact and the file; None when they match its manifest."""
        location = owner.location(stage, key)
        for name in files:
            if (location, name) not in self._problems:
                self._problems[(location, name)] = self._check(owner, stage, key, name)
            if (found := self._problems[(location, name)]) is not None:
                return f"artifact {stage}/{key}: {found}"
        return None

    def _check(self, owner: Store, stage: str, key: str, name: str) -> str | None:
        manifest = self._manifest(owner, stage, key)
        if manifest is None:
            return f"{owner.location(stage, key)}/manifest.json is missing or unreadable"
        rel = name[len(manifest.path) + 1:]
        entry = next((e for e in manifest.files if e.path == rel), None)
        if entry is None:
            return f"{name} is not listed in its manifest (added after the build)"
        local = isinstance(owner, LocalStore)
        try:
            stat = os.stat(name) if local else None
            size = stat.st_size if local else owner.fs.size(name)
        except FileNotFoundError:
            return f"{name} is missing"
        if size != entry.size_bytes:
            return f"{name} has {size} bytes, its manifest says {entry.size_bytes} (truncated or edited)"
        if not local:
            return None
        stamp = [size, stat.st_mtime_ns, entry.sha256]  # taken before hashing: a later edit changes it
        if self.cached.get(name) != stamp:
            self.hashed += 1
            problems = verify(manifest.model_copy(update={"files": [entry]}))
            if problems:
                return problems[0]
        self.confirmed[name] = stamp
        return None

    def _manifest(self, owner: Store, stage: str, key: str) -> Manifest | None:
        location = owner.location(stage, key)
        if location not in self._manifests:
            try:
                self._manifests[location] = owner.read_manifest(stage, key)
            except (CorruptArtifactError, MissingArtifactError):
                self._manifests[location] = None
        return self._manifests[location]

    def save(self) -> None:
        """Write the cache (atomically) when this session hashed something; a root that cannot be written to
        (another user's, read-only) just goes without."""
        if not any(self.cached.get(name) != stamp for name, stamp in self.confirmed.items()):
            return
        bad = {name for (_, name), found in self._problems.items() if found is not None}
        kept = {name: stamp for name, stamp in self.cached.items() if name not in bad and os.path.exists(name)}
        try:
            self.cache_path.parent.mkdir(exist_ok=True)  # not the root itself: no cache for a missing root
            write_text_atomic(self.cache_path, json.dumps(kept | self.confirmed))
        except OSError as err:
            log.debug("not writing the verification cache %s: %s", self.cache_path, err)


def _load(path: Path) -> dict[str, list]:
    """The cache's entries; none when it is missing or unreadable (then files are hashed again)."""
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}

