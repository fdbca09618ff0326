"""Where finished artifacts live: one `Store` seam over a local root or an object store.

Both stores hold the same layout (`<stage>/<key>/` with its files, manifest.json, then _SUCCESS, written last)
and are read through an fsspec filesystem, so existence, manifests and `verify` are written once, here.
`LocalStore` is a directory on this machine; `ObjectStore` (storage/object_store.py) is a bucket behind an fsspec
URL, with a local mirror for builds and readable copies. What only a bucket needs (upload with its commit
protocol, build leases, shards staged for other machines, a filesystem DuckDB must be told about) are hooks
that do nothing on a local root. storage/artifacts.py picks the store once, from $LMPIPE_ROOT (`artifact_store`).
"""

import hashlib
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import fsspec

from schemas.manifest import Manifest

SUCCESS = "_SUCCESS"
"""The marker of a finished artifact (its content: the finish time); written last."""
MANIFEST = "manifest.json"
LOCAL_PROTOCOLS = ("file", "local")


class MissingArtifactError(FileNotFoundError):
    """An upstream artifact a stage needs has not been built."""


class CorruptArtifactError(RuntimeError):
    """An artifact's files do not match the sizes or hashes in its manifest."""


def is_url(root: str) -> bool:
    """True for an fsspec URL naming a remote store (s3://, gs://, memory://; file:// is a local path)."""
    match = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://", str(root))
    return bool(match) and match.group(1).lower() not in LOCAL_PROTOCOLS


def local_path(root: str) -> Path:
    """A local root given as a path or a file:// URL."""
    return Path(root[len("file://"):] if root.lower().startswith("file://") else root)


def storage_options() -> dict:
    """fsspec arguments from $LMPIPE_STORAGE_OPTIONS (a JSON object), e.g. {"endpoint_url": "http://..."}."""
    text = os.environ.get("LMPIPE_STORAGE_OPTIONS", "").strip()
    if not text:
        return {}
    try:
        options = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"LMPIPE_STORAGE_OPTIONS is not JSON ({err.msg}); give an object such as "
                         "'{\"endpoint_url\": \"http://localhost:9000\"}'") from None
    if not isinstance(options, dict):
        raise ValueError("LMPIPE_STORAGE_OPTIONS must be a JSON object of fsspec arguments")
    return options


def url_filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and path of a URL, with $LMPIPE_STORAGE_OPTIONS and no listings cache (other
    machines change the bucket: a listing cached in this process, as s3fs keeps them, would hide that)."""
    return fsspec.core.url_to_fs(url, **{"use_listings_cache": False, **storage_options()})


def filesystem(location: str | Path) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and path of a location: a URL, or a local path."""
    location = str(location)
    return url_filesystem(location) if is_url(location) else (fsspec.filesystem("file"), location)


def sha256_of(handle, chunk_bytes: int = 1 << 22) -> str:
    """Streaming sha256 of an open binary file: the one file hash of manifests, fetches and verify."""
    digest = hashlib.sha256()
    while chunk := handle.read(chunk_bytes):
        digest.update(chunk)
    return digest.hexdigest()


def verify(manifest: Manifest) -> list[str]:
    """Re-hash an artifact's files where its manifest says it is (a local directory or a URL in an object store);
    one line per problem (empty when intact)."""
    fs, base = filesystem(manifest.path)
    problems = []
    for entry in manifest.files:
        name = f"{manifest.path}/{entry.path}"
        try:
            info = fs.info(f"{base}/{entry.path}")
        except FileNotFoundError:
            info = None
        if info is None or info["type"] != "file":
            problems.append(f"{name}: missing")
        elif info["size"] != entry.size_bytes:
            problems.append(f"{name}: size {info['size']} != {entry.size_bytes} in manifest")
        else:
            with fs.open(f"{base}/{entry.path}", "rb") as handle:
                if sha256_of(handle) != entry.sha256:
                    problems.append(f"{name}: sha256 differs from manifest (corrupt or edited)")
    return problems


class Store:
    """Finished artifacts under one root, read through an fsspec filesystem (`fs`, root path `base`).

    `root` is the local directory that builds (`_tmp/`), locks (`_locks/`) and locally readable artifacts live
    in: the root itself for a LocalStore, the mirror of an ObjectStore. The hooks below the manifests are what
    only an object store does; here they do nothing."""

    def __init__(self, fs: fsspec.AbstractFileSystem, base: str, root: Path):
        self.fs, self.base, self.root = fs, base.rstrip("/"), Path(root)

    def path(self, *parts: str) -> str:
        """The filesystem path (no scheme) of a location under the root."""
        return "/".join([self.base, *parts])

    def full_url(self, path: str) -> str:
        """A filesystem path as DuckDB, manifests and error messages name it."""
        return path

    def location(self, stage: str, key: str) -> str:
        """Where the artifact of (stage, key) lives, as a manifest's `path` names it."""
        return self.full_url(self.path(stage, key))

    def is_finished(self, stage: str, key: str) -> bool:
        """True when the artifact exists and is complete (_SUCCESS present)."""
        return self.fs.exists(self.path(stage, key, SUCCESS))

    def success_stamp(self, stage: str, key: str) -> str | None:
        """The _SUCCESS content (the finish time), None when the artifact is not finished."""
        try:
            return self.fs.cat_file(self.path(stage, key, SUCCESS)).decode().strip()
        except FileNotFoundError:
            return None

    def read_manifest(self, stage: str, key: str) -> Manifest:
        """The manifest of a finished artifact, its `path` where the artifact is now (a moved or copied root keeps
        working); MissingArtifactError when unfinished, CorruptArtifactError when the manifest is unreadable."""
        location = self.location(stage, key)
        if not self.is_finished(stage, key):
            raise MissingArtifactError(f"{location} is not a finished artifact (no {SUCCESS})")
        try:
            manifest = Manifest.model_validate_json(self.fs.cat_file(self.path(stage, key, MANIFEST)).decode())
        except (OSError, ValueError) as err:
            raise CorruptArtifactError(f"the manifest of {location} is missing or unreadable ({type(err).__name__});"
                                       f" rebuild the artifact with `lmpipe run --force {stage}`") from None
        return manifest.model_copy(update={"path": location})

    def download(self, manifest: Manifest, dest: Path) -> None:
        """Copy a finished artifact's files into `dest`, each checked against the manifest's size and sha256;
        ValueError when a file differs or the artifact was rebuilt while copying."""
        stage, key = manifest.stage, manifest.key
        stamp = self.success_stamp(stage, key)
        for entry in manifest.files:
            source, target = self.path(stage, key, entry.path), dest / entry.path
            target.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(source, str(target))
            with open(target, "rb") as handle:
                digest = sha256_of(handle)
            if target.stat().st_size != entry.size_bytes or digest != entry.sha256:
                raise ValueError(f"{self.full_url(source)}: size or sha256 differs from its manifest (corrupt or "
                                 f"edited in the store); rebuild it with `lmpipe run --force {stage}`")
        if self.success_stamp(stage, key) != stamp:
            raise ValueError(f"{self.location(stage, key)} was rebuilt while it was being downloaded; "
                             "run again to fetch the new artifact")

    def finished(self, stage: str | None = None) -> list[tuple[str, str]]:
        """(stage, key) of every finished artifact (of one stage), sorted."""
        raise NotImplementedError

    def files(self, directory: str, pattern: str) -> list[str]:
        """The files matching a glob pattern in an artifact directory (a `path`), as DuckDB names them."""
        raise NotImplementedError

    def check_root(self) -> None:
        """Raise MissingArtifactError when the root itself is missing (where that can be told)."""

    def attach(self, con) -> None:
        """Let a DuckDB connection read this store's files (it reads local files by itself)."""

    @contextmanager
    def lease(self, stage: str, key: str) -> Iterator[None]:
        """Hold the store-wide build lease of (stage, key) (a local root: the build lock is enough)."""
        yield

    def publish(self, local_dir: Path, manifest: Manifest) -> None:
        """Make a finished local artifact directory the store's (a local root: it already is)."""

    def stage_shard(self, stage: str, key: str, files: list[Path], done: Path) -> None:
        """Share a finished shard's files with builds on other machines (a local root: they see the build dir)."""

    def has_staged(self, stage: str, key: str, name: str) -> bool:
        """True when another machine staged the shard file `name` of (stage, key)."""
        return False

    def fetch_staged(self, stage: str, key: str, dest: Path, done_files: dict[str, str]) -> list[str]:
        """Copy the shards other machines staged into `dest`; returns the shard ids fetched."""
        return []


class LocalStore(Store):
    """Artifacts in a directory on this machine (or a shared file system): the root is its own mirror."""

    def __init__(self, root: Path):
        super().__init__(fsspec.filesystem("file"), str(Path(root).resolve()), Path(root))

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def finished(self, stage: str | None = None) -> list[tuple[str, str]]:
        """(stage, key) of every finished artifact (of one stage), sorted; stage folders `_*` are not stages."""
        base = Path(self.base)
        if stage:
            stage_dirs = [base / stage]
        else:
            stage_dirs = sorted(p for p in base.iterdir() if not p.name.startswith("_")) if base.is_dir() else []
        return [(stage_dir.name, path.name) for stage_dir in stage_dirs if stage_dir.is_dir()
                for path in sorted(stage_dir.iterdir()) if (path / SUCCESS).exists()]

    def files(self, directory: str, pattern: str) -> list[str]:
        """The files matching a glob pattern in an artifact directory (the directory name is not a pattern)."""
        return [str(p) for p in sorted(Path(directory).glob(pattern))]

    def check_root(self) -> None:
        """Raise MissingArtifactError when the root directory does not exist."""
        if not Path(self.base).is_dir():
            raise MissingArtifactError(f"artifact root {self.root} does not exist (set LMPIPE_ROOT or run "
                                       "`lmpipe run`)")
