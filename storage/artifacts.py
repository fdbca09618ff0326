"""Content-addressed artifacts: keys, atomic builds, locks, local copies; where they live is the root's Store.

Layout under the root ($LMPIPE_ROOT, default ./artifacts; an fsspec URL such as s3://bucket/prefix keeps the
finished artifacts in object storage and builds in a local mirror: storage/object_store.py). `artifact_store`
chooses the Store (storage/store.py: reading, markers, verify) once; the functions here go through it:
    <stage>/<key>/           a finished artifact: its files, manifest.json, then _SUCCESS (written last)
    _tmp/<stage>-<key>/      the build directory (stable per key, so interrupted training can resume from it)
    _locks/<stage>-<key>.lock  an flock held while building, so two runs never build the same key at once
A directory without _SUCCESS is not an artifact. A failed build leaves no artifact and never touches a
finished one; a forced rebuild replaces the old artifact only after the new one is complete.
"""

import datetime as dt
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel

from schemas.manifest import FileEntry, Manifest, UpstreamRef
from storage.atomic import remove_leftover_temp_files, write_text_atomic
from storage.object_store import ObjectStore, mirror_of
from storage.store import (
    MANIFEST,
    SUCCESS,
    CorruptArtifactError,
    LocalStore,
    MissingArtifactError,
    Store,
    is_url,
    local_path,
    sha256_of,
    verify,
)

log = logging.getLogger(__name__)

KEY_LENGTH = 16


def artifact_root() -> Path:
    """The local artifact root: $LMPIPE_ROOT or ./artifacts as an absolute path; for an object-store root, its
    local mirror ($LMPIPE_CACHE or ~/.cache/lmpipe/<bucket-and-prefix>)."""
    root = os.environ.get("LMPIPE_ROOT", "artifacts")
    return mirror_of(root) if is_url(root) else local_path(root).resolve()


@lru_cache(maxsize=4)
def _object_store(url: str, options: str, mirror: Path) -> ObjectStore:
    return ObjectStore(url, mirror)


def artifact_store(root: Path | None = None) -> Store:
    """The store of an artifact root, chosen here for every caller: the ObjectStore of $LMPIPE_ROOT when that is
    a URL and `root` is its mirror (or None, the configured root); else the LocalStore of `root`."""
    url, configured = os.environ.get("LMPIPE_ROOT", "artifacts"), artifact_root()
    if is_url(url) and (root is None or Path(root).resolve() == configured):
        return _object_store(url, os.environ.get("LMPIPE_STORAGE_OPTIONS", ""), configured)
    return LocalStore(root or configured)


def object_store(root: Path | None = None) -> ObjectStore | None:
    """The store when it is an object store, else None: for what only a bucket has (its URL in `lmpipe doctor`,
    a stop file that workers on other machines can see)."""
    store = artifact_store(root)
    return store if isinstance(store, ObjectStore) else None


def canonical_json(value) -> str:
    """Canonical JSON (sorted keys, compact separators) of plain data, the input of every key: a pydantic model
    anywhere inside it stands as its JSON data (model_dump(mode="json")), never as its repr."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=_json_data)


def _json_data(value) -> dict:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    raise TypeError(f"{type(value).__name__} {value!r} is not JSON data: an artifact key takes plain values and "
                    "pydantic models")


def artifact_key(stage: str, code_version: str, config: BaseModel | dict, upstream: dict[str, str]) -> str:
    """Short content hash of stage name, code version, config and upstream keys (machine independent)."""
    blob = canonical_json({"stage": stage, "code": code_version, "config": config, "upstream": upstream})
    return hashlib.sha256(blob.encode()).hexdigest()[:KEY_LENGTH]


def artifact_dir(stage: str, key: str, root: Path | None = None) -> Path:
    """Where the artifact of this stage and key lives locally (built or not; for an object-store root: its
    mirror copy)."""
    return (root or artifact_root()) / stage / key


def is_built(stage: str, key: str, root: Path | None = None) -> bool:
    """True when the artifact exists and is complete (_SUCCESS present; in the object store for a URL root)."""
    return artifact_store(root).is_finished(stage, key)


def success_stamp(stage: str, key: str, root: Path | None = None) -> str | None:
    """The artifact's finish time (the _SUCCESS content), None when it is not built: it changes on a rebuild."""
    return artifact_store(root).success_stamp(stage, key)


def read_manifest(stage: str, key: str, root: Path | None = None) -> Manifest:
    """The manifest of a finished artifact without fetching its files: for an object-store root its `path` is
    the artifact's URL (use open_artifact to read the files)."""
    return artifact_store(root).read_manifest(stage, key)


def open_artifact(stage: str, key: str, root: Path | None = None) -> Manifest:
    """A finished artifact whose files can be read locally: a local root's own, or for an object-store root its
    local mirror, fetched (and checked against the manifest's sha256s) when missing or older than the store's."""
    store, local = artifact_store(root), artifact_dir(stage, key, root)
    found = store.read_manifest(stage, key)
    if (mirrored := _mirrored(local, found)) is not None:
        return mirrored  # a local root's artifact is its own mirror
    with build_lock(stage, key, local.parent.parent):
        if (mirrored := _mirrored(local, found)) is not None:
            return mirrored  # another thread fetched it while we waited
        fetch = local.parent.parent / "_tmp" / f"fetch-{stage}-{key}-{time.time_ns()}"
        log.info("fetching %s into %s", found.path, local)
        try:
            store.download(found, fetch)
        except BaseException as err:
            shutil.rmtree(fetch, ignore_errors=True)
            if isinstance(err, ValueError):
                raise CorruptArtifactError(str(err)) from None
            raise
        _publish(fetch, local, found.model_copy(update={"path": str(local)}))
    return load_manifest(local)


def _local_copy(local: Path) -> Manifest | None:
    """The manifest of a finished local directory (a mirror), None when it has none or an unreadable one."""
    try:
        return load_manifest(local)
    except (MissingArtifactError, CorruptArtifactError):
        return None


def _mirrored(local: Path, found: Manifest) -> Manifest | None:
    """The local copy's manifest when it holds the same content as the store's artifact, else None."""
    mirrored = _local_copy(local)
    return mirrored if mirrored is not None and content_digest(mirrored) == content_digest(found) else None


def load_manifest(path: Path) -> Manifest:
    """Read the manifest of a finished artifact directory `<root>/<stage>/<key>`; error if it is not finished or
    the manifest is unreadable. Its `path` is where the directory is now (so a copied or moved root keeps
    working)."""
    path = Path(path)
    return LocalStore(path.parent.parent).read_manifest(path.parent.name, path.name)


def list_files(directory: Path) -> list[FileEntry]:
    """Every regular file under a directory (except the manifest and marker), with size and sha256."""
    entries = []
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        if rel in (MANIFEST, SUCCESS):
            continue
        with open(path, "rb") as handle:
            entries.append(FileEntry(path=rel, size_bytes=path.stat().st_size, sha256=sha256_of(handle)))
    return entries


def content_digest(manifest: Manifest) -> str:
    """sha256 over an artifact's (file, sha256) list: equal for byte-identical rebuilds, whatever their time."""
    text = "".join(f"{entry.path}\t{entry.sha256}\n" for entry in sorted(manifest.files, key=lambda e: e.path))
    return hashlib.sha256(text.encode()).hexdigest()


def upstream_refs(upstream: dict[str, Manifest]) -> dict[str, UpstreamRef]:
    """What a build records of the upstream artifacts it consumes."""
    return {role: UpstreamRef(stage=m.stage, key=m.key, digest=content_digest(m)) for role, m in upstream.items()}


def stale_roles(manifest: Manifest, upstream: dict[str, Manifest]) -> list[str]:
    """Roles whose upstream artifact's content differs from what this artifact was built from (rebuilt since,
    e.g. by --force, with other bytes). Artifacts built before digests were recorded are never stale."""
    return [role for role, ref in manifest.upstream_refs.items()
            if role in upstream and content_digest(upstream[role]) != ref.digest]


def chain_problems(manifest: Manifest, root: Path | None = None) -> list[str]:
    """The integrity chain of one artifact: each upstream it recorded still exists with the content it was
    built from; one line per problem."""
    problems = []
    for role, ref in manifest.upstream_refs.items():
        if not is_built(ref.stage, ref.key, root):
            problems.append(f"upstream {role} ({ref.stage}/{ref.key}) is missing")
            continue
        try:
            changed = content_digest(read_manifest(ref.stage, ref.key, root)) != ref.digest
        except CorruptArtifactError as err:
            problems.append(f"upstream {role}: {err}")
            continue
        if changed:
            problems.append(f"stale: upstream {role} ({ref.stage}/{ref.key}) was rebuilt with other content since; "
                            f"`lmpipe run` rebuilds it for the current config (or --force {manifest.stage})")
    return problems


def check_inputs(upstream: dict[str, Manifest]) -> None:
    """Re-hash every upstream artifact's files before a build uses them; CorruptArtifactError naming the first
    problem and the rebuild command (a corrupt input is never used silently)."""
    for role, manifest in upstream.items():
        problems = verify(manifest)
        if problems:
            raise CorruptArtifactError(
                f"upstream {role} ({manifest.stage}/{manifest.key}) is corrupt: {problems[0]}"
                f"{f' (+{len(problems) - 1} more)' if len(problems) > 1 else ''}; rebuild it with "
                f"`lmpipe run --force {manifest.stage}` (finished downstream artifacts are left as they are)")


@contextmanager
def build_lock(stage: str, key: str, root: Path, *, shared: bool = False) -> Iterator[None]:
    """Hold an flock for (stage, key): exclusive for a build (a second builder waits until the first is done),
    shared for shard writers (many at once, but never while the artifact is being published)."""
    lock_dir = root / "_locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    with open(lock_dir / f"{stage}-{key}.lock", "a") as handle:
        try:
            fcntl.flock(handle, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("%s/%s is being built by another process; waiting for it", stage, key)
            fcntl.flock(handle, mode)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_dir(stage: str, key: str, root: Path | None = None) -> Path:
    """The stable build directory of (stage, key); kept after a failure so training can resume."""
    return (root or artifact_root()) / "_tmp" / f"{stage}-{key}"


def materialize(
    stage: str,
    code_version: str,
    config: BaseModel,
    upstream: dict[str, Manifest],
    build: Callable[[Path], dict | None],
    *,
    root: Path | None = None,
    force: bool = False,
) -> Manifest:
    """Return the artifact for these inputs, building it first if needed.

    `build(work_dir)` writes the artifact's files into work_dir and returns summary numbers. Only after it
    returns is the directory renamed into place, the manifest written and _SUCCESS written last.
    """
    root = root or artifact_root()
    store = artifact_store(root)
    upstream_keys = {role: m.key for role, m in upstream.items()}
    key = artifact_key(stage, code_version, config, upstream_keys)
    final = artifact_dir(stage, key, root)
    if (finished := _reusable(stage, key, root, upstream, force)) is not None:
        return finished
    with build_lock(stage, key, root), store.lease(stage, key):
        if (finished := _reusable(stage, key, root, upstream, force)) is not None:
            return finished  # another process finished it while we waited
        if not force and (uploaded := _finish_upload(store, final, upstream)) is not None:
            return uploaded
        check_inputs(upstream)
        work = build_dir(stage, key, root)
        work.mkdir(parents=True, exist_ok=True)
        log.info("building %s/%s in %s", stage, key, work)
        started = time.perf_counter()
        try:
            summary = build(work) or {}
        except BaseException:
            if work.is_dir() and not any(work.iterdir()):
                work.rmdir()  # nothing to resume from: leave no empty build dir behind
            raise
        for leftover in remove_leftover_temp_files(work):  # of a killed earlier attempt that this one resumed
            log.info("removed %s, left by a killed build", leftover.relative_to(work))
        manifest = Manifest(
            stage=stage,
            key=key,
            path=str(final),
            code_version=code_version,
            config=config.model_dump(mode="json"),
            upstream=upstream_keys,
            upstream_refs=upstream_refs(upstream),
            files=list_files(work),
            summary=summary,
            created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            build_seconds=round(time.perf_counter() - started, 3),
        )
        _publish(work, final, manifest)
        store.publish(final, manifest)
        log.info("built %s/%s in %.1fs", stage, key, manifest.build_seconds)
        return manifest


def _reusable(stage: str, key: str, root: Path, upstream: dict[str, Manifest], force: bool) -> Manifest | None:
    """The finished artifact, unless it is missing, forced, or stale (then the warning says which upstream)."""
    if force or not is_built(stage, key, root):
        return None
    manifest = read_manifest(stage, key, root)
    roles = stale_roles(manifest, upstream)
    if roles:
        log.warning("rebuilding %s/%s: its upstream %s changed since it was built", stage, key,
                    ", ".join(f"{role} ({manifest.upstream_refs[role].stage})" for role in roles))
        return None
    return manifest


def _finish_upload(store: Store, final: Path, upstream: dict[str, Manifest]) -> Manifest | None:
    """Publish an artifact this machine finished but did not get into the store (an upload cut short), when its
    files are intact and its upstream unchanged; None when there is none (then it is built). A local root has
    none: its local copy is the artifact, which _reusable has already looked at."""
    manifest = _local_copy(final)
    if manifest is None or stale_roles(manifest, upstream) or verify(manifest):
        return None
    log.info("publishing %s/%s, finished here before an interrupted upload", manifest.stage, manifest.key)
    store.publish(final, manifest)
    return manifest


def _publish(work: Path, final: Path, manifest: Manifest) -> None:
    """Move a finished build into place; an old artifact at the same key is removed only after the swap."""
    (work / SUCCESS).unlink(missing_ok=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    retired = None
    if final.exists():
        retired = final.parent.parent / "_tmp" / f"retired-{final.parent.name}-{final.name}-{time.time_ns()}"
        os.replace(final, retired)
    os.replace(work, final)
    write_text_atomic(final / MANIFEST, manifest.model_dump_json(indent=2))
    (final / SUCCESS).write_text(manifest.created_at + "\n")
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)


def require(stage: str, key: str, *, built_by: str, root: Path | None = None) -> Manifest:
    """The manifest of an upstream artifact (read_manifest), or fail with the command that builds it."""
    store = artifact_store(root)
    if not store.is_finished(stage, key):
        where = store.location(stage, key)
        raise MissingArtifactError(
            f"upstream artifact {stage}/{key} is missing ({where} has no {SUCCESS}); build it with: {built_by}"
        )
    return store.read_manifest(stage, key)


def iter_manifests(root: Path | None = None, stage: str | None = None) -> Iterator[Manifest | CorruptArtifactError]:
    """Every finished artifact under the root (optionally of one stage); an unreadable manifest is yielded as
    the error, so callers report it and go on with the rest."""
    store = artifact_store(root)
    store.check_root()
    for found_stage, key in store.finished(stage):
        try:
            yield store.read_manifest(found_stage, key)
        except CorruptArtifactError as err:
            yield err
