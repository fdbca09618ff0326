"""Artifacts on object storage: an fsspec URL (s3://bucket/prefix, gs://..., memory://...) as the artifact root.

LMPIPE_ROOT=s3://bucket/prefix keeps the finished artifacts in the bucket with the local layout
(`<stage>/<key>/` files, manifest.json, _SUCCESS). Builds happen on local disk in a mirror directory
($LMPIPE_CACHE, default ~/.cache/lmpipe/<bucket-and-prefix>) that also holds `_tmp/`, `_locks/` and the Prefect
server files; stages read their inputs from local mirrors of the artifacts they need (fetched on demand,
verified against the manifest's sha256s). Extra fsspec arguments come from $LMPIPE_STORAGE_OPTIONS (JSON), the
rest from the filesystem's own settings (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ... for S3).

Commit protocol (object stores have no rename, but every single PUT is atomic):
    1. delete `<stage>/<key>/_SUCCESS` (a forced rebuild takes the old artifact offline first),
    2. upload every file, then delete objects the new manifest does not list,
    3. upload manifest.json, then _SUCCESS, last.
An artifact exists only while its _SUCCESS does, so a reader never sees a half-uploaded one. A reader that
mirrors an artifact checks each file's sha256 against the manifest and that _SUCCESS did not change while it
downloaded (so a rebuild racing the download is a clear error, not a mixed artifact).

Writers: one per key. Each build holds its machine's lock and creates a lease object `_leases/<stage>-<key>.json`
(host, pid, start) with an exclusive write (`pipe_file(mode="create")`: on S3 a conditional PUT, If-None-Match: *,
so of two machines racing for a key exactly one gets it); a build on another host that finds a lease refuses
with an error naming the holder. A lease this host left behind (a killed run) is taken over: this host's
builders are already serialised by its lock. Filesystems without an atomic exclusive write fall back to fsspec's
check-then-write, where two machines starting the same key in the same instant could both pass.
"""

import datetime as dt
import hashlib
import json
import os
import re
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import fsspec

from schemas.manifest import Manifest
from storage.atomic import atomic_path

SUCCESS = "_SUCCESS"
MANIFEST = "manifest.json"
LEASES = "_leases"
LOCAL_PROTOCOLS = ("file", "local")


class LeaseHeldError(RuntimeError):
    """Another machine is building the same artifact in the same object store."""


def is_url(root: str) -> bool:
    """True for an fsspec URL naming a remote store (s3://, gs://, memory://; file:// is a local path)."""
    match = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://", root)
    return bool(match) and match.group(1).lower() not in LOCAL_PROTOCOLS


def local_path(root: str) -> Path:
    """A local root given as a path or a file:// URL."""
    return Path(root[len("file://"):] if root.lower().startswith("file://") else root)


def default_mirror(url: str) -> Path:
    """~/.cache/lmpipe/<url without its scheme, / as _>: the local mirror of a remote root."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", url.split("://", 1)[1]).strip("_")
    return Path.home() / ".cache" / "lmpipe" / name


def url_filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and path of a URL, with $LMPIPE_STORAGE_OPTIONS and no listings cache (other
    machines change the bucket: a listing cached in this process, as s3fs keeps them, would hide that)."""
    return fsspec.core.url_to_fs(url, **{"use_listings_cache": False, **storage_options()})


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


def sha256_of(handle, chunk_bytes: int = 1 << 22) -> str:
    """Streaming sha256 of an open binary file."""
    digest = hashlib.sha256()
    while chunk := handle.read(chunk_bytes):
        digest.update(chunk)
    return digest.hexdigest()


class ObjectStore:
    """Finished artifacts under an fsspec URL: existence, manifests, upload with the commit protocol, download
    into a local directory, re-hashing, listing and build leases."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        try:
            self.fs, self.base = url_filesystem(self.url)
        except (ImportError, ValueError) as err:
            raise ValueError(f"LMPIPE_ROOT={url}: {err}; install the filesystem's package "
                             "(pip install 'lmpipe[cloud]' for s3fs)") from None
        self.base = self.base.rstrip("/")
        self.host = socket.gethostname()  # the holder named in this store's build leases

    def __repr__(self) -> str:
        return f"ObjectStore({self.url!r})"

    def path(self, *parts: str) -> str:
        """The fsspec path (no scheme) of a location under the root."""
        return "/".join([self.base, *parts])

    def full_url(self, path: str) -> str:
        """The URL (with scheme) of an fsspec path, as DuckDB and error messages see it."""
        return self.fs.unstrip_protocol(path)

    def is_finished(self, stage: str, key: str) -> bool:
        return self.fs.exists(self.path(stage, key, SUCCESS))

    def success_stamp(self, stage: str, key: str) -> str | None:
        """The _SUCCESS content (the finish time), None when the artifact is not finished."""
        try:
            return self.fs.cat_file(self.path(stage, key, SUCCESS)).decode().strip()
        except FileNotFoundError:
            return None

    def read_manifest(self, stage: str, key: str) -> Manifest:
        """The manifest of a finished artifact, its `path` the artifact's URL."""
        text = self.fs.cat_file(self.path(stage, key, MANIFEST)).decode()
        return Manifest.model_validate_json(text).model_copy(update={"path": self.full_url(self.path(stage, key))})

    def finished(self, stage: str | None = None) -> list[tuple[str, str]]:
        """(stage, key) of every finished artifact (of one stage), sorted."""
        pattern = self.path(stage or "*", "*", SUCCESS)
        found = [p[len(self.base) + 1:].split("/")[:2] for p in self.fs.glob(pattern)]
        return sorted((s, k) for s, k in found if not s.startswith("_"))

    def upload(self, local_dir: Path, manifest: Manifest) -> None:
        """Publish a finished local artifact directory with the commit protocol of the module docstring."""
        prefix = self.path(manifest.stage, manifest.key)
        if self.fs.exists(f"{prefix}/{SUCCESS}"):
            self.fs.rm_file(f"{prefix}/{SUCCESS}")
        listed = {entry.path for entry in manifest.files}
        for entry in manifest.files:
            self.fs.put_file(str(local_dir / entry.path), f"{prefix}/{entry.path}")
        existing = self.fs.find(prefix) if self.fs.exists(prefix) else []
        stale = [p for p in existing if p[len(prefix) + 1:] not in listed | {MANIFEST, SUCCESS}]
        if stale:
            self.fs.rm(stale)
        self.fs.pipe_file(f"{prefix}/{MANIFEST}", manifest.model_dump_json(indent=2).encode())
        self.fs.pipe_file(f"{prefix}/{SUCCESS}", (manifest.created_at + "\n").encode())

    def download(self, manifest: Manifest, dest: Path) -> None:
        """Copy a finished artifact's files into `dest`, each checked against the manifest's size and sha256;
        ValueError when a file differs or the artifact was rebuilt while downloading."""
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
                              f"edited in the bucket); rebuild it with `lmpipe run --force {stage}`")
        if self.success_stamp(stage, key) != stamp:
            raise ValueError(f"{self.full_url(self.path(stage, key))} was rebuilt while it was being downloaded; "
                          "run again to fetch the new artifact")

    def verify(self, manifest: Manifest) -> list[str]:
        """Re-hash a finished artifact's objects in the store; one line per problem (empty when intact)."""
        problems = []
        for entry in manifest.files:
            path = self.path(manifest.stage, manifest.key, entry.path)
            url = self.full_url(path)
            try:
                size = self.fs.size(path)
            except FileNotFoundError:
                problems.append(f"{url}: missing")
                continue
            if size != entry.size_bytes:
                problems.append(f"{url}: size {size} != {entry.size_bytes} in manifest")
                continue
            with self.fs.open(path, "rb") as handle:
                if sha256_of(handle) != entry.sha256:
                    problems.append(f"{url}: sha256 differs from manifest (corrupt or edited)")
        return problems

    def stage_shard(self, stage: str, key: str, files: list[Path], done: Path) -> None:
        """Upload a finished shard's files into the store's build area `_tmp/<stage>-<key>/` (`done`, the file
        whose presence marks the shard finished, last), so a build on another machine can use them."""
        for path in [*(f for f in files if f != done), done]:
            self.fs.put_file(str(path), self.path("_tmp", f"{stage}-{key}", path.name))

    def has_staged(self, stage: str, key: str, name: str) -> bool:
        return self.fs.exists(self.path("_tmp", f"{stage}-{key}", name))

    def fetch_staged(self, stage: str, key: str, dest: Path, done_files: dict[str, str]) -> list[str]:
        """Download the staged files (`*-<shard>.*`) of every shard whose done file (shard id -> name) is staged
        but missing in `dest`, each written atomically, the done file last; returns the shard ids fetched."""
        prefix = self.path("_tmp", f"{stage}-{key}")
        staged = {p.rsplit("/", 1)[1] for p in self.fs.find(prefix)} if self.fs.exists(prefix) else set()
        fetched = []
        for shard, done in done_files.items():
            if done not in staged or (dest / done).exists():
                continue
            dest.mkdir(parents=True, exist_ok=True)
            for name in sorted(n for n in staged if f"-{shard}." in n and n != done) + [done]:
                with atomic_path(dest / name) as tmp:
                    self.fs.get_file(f"{prefix}/{name}", str(tmp))
            fetched.append(shard)
        return fetched

    def drop_staged(self, stage: str, key: str) -> None:
        """Delete the build area of a published artifact."""
        prefix = self.path("_tmp", f"{stage}-{key}")
        if self.fs.exists(prefix):
            self.fs.rm(prefix, recursive=True)

    @contextmanager
    def lease(self, stage: str, key: str) -> Iterator[None]:
        """Hold the build lease of (stage, key) in the store; LeaseHeldError when another host holds it."""
        path = self.path(LEASES, f"{stage}-{key}.json")
        token = uuid.uuid4().hex
        record = json.dumps({"host": self.host, "pid": os.getpid(), "token": token,
                             "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}).encode()
        self._take_lease(path, record, f"{stage}/{key}")
        try:
            yield
        finally:
            holder = self._read_lease(path)
            if holder and holder.get("token") == token:
                with suppress(FileNotFoundError):
                    self.fs.rm_file(path)

    def _take_lease(self, path: str, record: bytes, name: str, attempts: int = 3) -> None:
        """Create the lease object only where none exists; take over one of this host's; refuse another's."""
        for _ in range(attempts):
            try:
                self.fs.pipe_file(path, record, mode="create")
                return
            except FileExistsError:
                holder = self._read_lease(path)
            if holder is None:
                continue  # released between our write and our read: try again
            if holder.get("host") != self.host:
                raise LeaseHeldError(
                    f"{name} is being built on host {holder.get('host')} (pid {holder.get('pid')}, since "
                    f"{holder.get('started')}); an object-store root has one writer per artifact: wait for that "
                    f"run, or if it died, delete {self.full_url(path)} and run again")
            self.fs.pipe_file(path, record)  # a dead build of this host (its lock is ours now)
            return
        raise LeaseHeldError(f"{name}: the lease {self.full_url(path)} keeps changing hands; run again")

    def _read_lease(self, path: str) -> dict | None:
        try:
            return json.loads(self.fs.cat_file(path))
        except FileNotFoundError:
            return None
