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
import json
import logging
import os
import re
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from schemas.manifest import Manifest
from storage.atomic import atomic_path
from storage.store import MANIFEST, SUCCESS, MissingArtifactError, Store, url_filesystem

log = logging.getLogger(__name__)

LEASES = "_leases"


class LeaseHeldError(RuntimeError):
    """Another machine is building the same artifact in the same object store."""


def default_mirror(url: str) -> Path:
    """~/.cache/lmpipe/<url without its scheme, / as _>: the local mirror of a remote root."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", url.split("://", 1)[1]).strip("_")
    return Path.home() / ".cache" / "lmpipe" / name


def mirror_of(url: str) -> Path:
    """The local mirror of a remote root: $LMPIPE_CACHE, else default_mirror(url), as an absolute path."""
    return Path(os.environ.get("LMPIPE_CACHE") or default_mirror(url)).resolve()


class ObjectStore(Store):
    """Finished artifacts under an fsspec URL: upload with the commit protocol, listing, a filesystem for DuckDB,
    shards staged for other machines and build leases (reading, download and verify: storage/store.py)."""

    def __init__(self, url: str, root: Path | None = None):
        self.url = url.rstrip("/")
        try:
            fs, base = url_filesystem(self.url)
        except (ImportError, ValueError) as err:
            raise ValueError(f"LMPIPE_ROOT={url}: {err}; install the filesystem's package "
                             "(pip install 'lmpipe[cloud]' for s3fs)") from None
        super().__init__(fs, base, root if root is not None else mirror_of(url))
        self.host = socket.gethostname()  # the holder named in this store's build leases

    def __repr__(self) -> str:
        return f"ObjectStore({self.url!r})"

    def full_url(self, path: str) -> str:
        """The URL (with scheme) of an fsspec path, as DuckDB and error messages see it."""
        return self.fs.unstrip_protocol(path)

    def finished(self, stage: str | None = None) -> list[tuple[str, str]]:
        """(stage, key) of every finished artifact (of one stage), sorted: one listing of the bucket."""
        pattern = self.path(stage or "*", "*", SUCCESS)
        found = [p[len(self.base) + 1:].split("/")[:2] for p in self.fs.glob(pattern)]
        return sorted((s, k) for s, k in found if not s.startswith("_"))

    def check_root(self) -> None:
        """MissingArtifactError naming the bucket when it does not exist, ConnectionError when the store does not
        answer (a prefix that nothing was written under yet is fine: it is an empty root)."""
        bucket = self.base.strip("/").split("/", 1)[0]
        try:
            found = self.fs.exists(bucket)
        except Exception as err:  # noqa: BLE001 - whatever the filesystem raises, the user needs the URL
            raise ConnectionError(f"LMPIPE_ROOT={self.url}: cannot reach bucket {bucket!r} ({type(err).__name__}: "
                                  f"{str(err)[:200]}); check the credentials and the endpoint (AWS_ENDPOINT_URL, "
                                  "LMPIPE_STORAGE_OPTIONS)") from None
        if not found:
            raise MissingArtifactError(f"LMPIPE_ROOT={self.url}: bucket {bucket!r} does not exist (or is not "
                                       "visible with these credentials); create it or fix LMPIPE_ROOT")

    def files(self, directory: str, pattern: str) -> list[str]:
        """The objects matching a glob pattern under an artifact's path, as URLs."""
        return [self.full_url(p) for p in sorted(self.fs.glob(f"{directory}/{pattern}"))]

    def attach(self, con) -> None:
        """Register the bucket's filesystem with a DuckDB connection, which then reads the Parquet files by URL."""
        con.register_filesystem(self.fs)

    def publish(self, local_dir: Path, manifest: Manifest) -> None:
        """Upload a finished local artifact directory, then drop the shards staged for its build."""
        log.info("uploading %s/%s to %s", manifest.stage, manifest.key, self.url)
        self.upload(local_dir, manifest)
        self.drop_staged(manifest.stage, manifest.key)

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

    def stage_shard(self, stage: str, key: str, files: list[Path], done: Path) -> None:
        """Upload a finished shard's files into the store's build area `_tmp/<stage>-<key>/` (`done`, the file
        whose presence marks the shard finished, last), so a build on another machine can use them."""
        for path in [*(f for f in files if f != done), done]:
            self.fs.put_file(str(path), self.path("_tmp", f"{stage}-{key}", path.name))

    def has_staged(self, stage: str, key: str, name: str) -> bool:
        """True when the shard file `name` of (stage, key) is staged in the store's build area."""
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
