"""Build one DAG node: call its stage's run() inside storage.materialize (atomic, locked, content-addressed).

Prefect-free, so the same call serves the Prefect tasks, tests and scripts.
"""

import errno
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from schemas.manifest import Manifest
from stages.dag import Node
from stages.registry import stage
from stages.runtime import interrupt
from stages.training.node_sync import multi_node_build
from storage.artifacts import (
    artifact_root,
    artifact_store,
    build_dir,
    build_lock,
    check_inputs,
    is_built,
    materialize,
    open_artifact,
    read_manifest,
    stale_roles,
)

log = logging.getLogger(__name__)


def current(inputs: dict[str, Manifest], root: Path | None = None) -> dict[str, Manifest]:
    """The upstream manifests re-read from the store with their files readable locally (a cached task result may
    carry the path of a moved root; an object-store artifact is fetched into the local mirror); a manifest of an
    artifact outside the store (tests, scripts) is used as given."""
    return {role: open_artifact(m.stage, m.key, root) if is_built(m.stage, m.key, root) else m
            for role, m in inputs.items()}


def build_node(node: Node, inputs: dict[str, Manifest], *, force: bool = False, root: Path | None = None) -> Manifest:
    """Return the node's artifact, building it (or rebuilding it when forced) from its upstream manifests.

    A stop requested before the build starts, or while it ran (a stage without safe points of its own, or one
    that finished first) ends the task with Interrupted (in the second case after the artifact is published), so
    a stopped run always ends as stopped."""
    run, inputs = stage(node.stage).run, current(inputs, root)
    fetch_staged_shards(node, inputs, root)

    def build(out: Path) -> dict:
        _build_missing_shards(node, inputs, out)
        with multi_node_build(node.name, node.key, node.config):  # a multi-node run's other nodes join here
            return run(node.config, inputs, out)

    interrupt.check(f"{node.name} was not started; run the same command again to go on")
    with _naming_a_full_disk(node, root):
        manifest = materialize(node.stage, node.code_version, node.config, inputs, build, root=root, force=force)
    interrupt.check(f"{node.name} finished before it could stop and is kept; run the same command again to go on")
    return manifest


def _build_missing_shards(node: Node, inputs: dict[str, Manifest], work: Path) -> None:
    """Build the shards missing from the build dir one by one, with a stop check before each. Usually the shard
    tasks (build_shard) built them all; in a forced rebuild they found the old artifact finished and did nothing,
    so every shard is built here. The stage's run() then finds them done."""
    shards = stage(node.stage).shards
    if shards is None:
        return
    for shard in shards.list(node.config, inputs):
        if not (work / shards.file(shard)).exists():
            _stop_before(node, shard)
            shards.build(node.config, inputs, shard, work)


@contextmanager
def _naming_a_full_disk(node: Node, root: Path | None) -> Iterator[None]:
    """A write that failed for lack of space (ENOSPC, however the writing library wrapped it) becomes an OSError
    that says so, where, and what to do (the libraries' own messages name no file)."""
    try:
        yield
    except Exception as err:
        if getattr(err, "errno", None) != errno.ENOSPC and "No space left on device" not in str(err):
            raise
        work = build_dir(node.stage, node.key, root)
        raise OSError(errno.ENOSPC, f"no space left on the disk of {work} while building {node.name}: free some "
                      "space there (or point LMPIPE_ROOT at a larger disk) and run again; nothing partial was "
                      "published, finished artifacts are intact") from err


def _stop_before(node: Node, shard: str) -> None:
    interrupt.check(f"{node.name} stopped before shard {shard}; finished shards are kept, run again to go on")


def is_stale(node: Node, inputs: dict[str, Manifest], root: Path | None = None) -> bool:
    """True when the node's finished artifact was built from upstream content that has changed since."""
    if not node.is_built(root):
        return False
    manifests = {role: read_manifest(m.stage, m.key, root) if is_built(m.stage, m.key, root) else m
                 for role, m in inputs.items() if isinstance(m, Manifest)}
    return bool(stale_roles(read_manifest(node.stage, node.key, root), manifests))


def shard_ids(node: Node, inputs: dict[str, Manifest]) -> list[str]:
    """The shard ids of a node whose stage fans out (empty when it does not)."""
    shards = stage(node.stage).shards
    return shards.list(node.config, inputs) if shards is not None else []


def shard_done(node: Node, shard: str, root: Path | None = None) -> bool:
    """True when the shard's file exists in the finished artifact or in the build dir (for an object-store root
    also: staged in the store's build area by any machine)."""
    name = stage(node.stage).shards.file(shard)
    if any((d / name).exists() for d in (node.path(root), build_dir(node.stage, node.key, root))):
        return True
    return artifact_store(root).has_staged(node.stage, node.key, name)


def shard_files(work: Path, shard: str) -> list[Path]:
    """The files one shard wrote into a build dir: every `*-<shard id>.*` (part, stats and sidecar files)."""
    return sorted(p for p in work.iterdir() if f"-{shard}." in p.name and not p.name.startswith("."))


def fetch_staged_shards(node: Node, inputs: dict[str, Manifest], root: Path | None = None) -> None:
    """For an object-store root: copy the shards other machines staged in the store into this build dir, so the
    stage's run reuses them instead of redoing them."""
    shards = stage(node.stage).shards
    if shards is None or node.is_built(root):
        return
    done = {shard: shards.file(shard) for shard in shards.list(node.config, inputs)}
    if fetched := artifact_store(root).fetch_staged(node.stage, node.key, build_dir(node.stage, node.key, root), done):
        log.info("%s: fetched %d shard(s) staged by other machines", node.name, len(fetched))


def build_shard(node: Node, inputs: dict[str, Manifest], shard: str, *, root: Path | None = None) -> str:
    """Build one shard into the node's build dir (skipped when the artifact is already finished)."""
    root = root or artifact_root()
    # shared lock: shards of one key are written side by side (also by two runs at once), but never while a run
    # publishes the artifact (exclusive lock in materialize), which moves the build dir away
    with build_lock(node.stage, node.key, root, shared=True):
        if node.is_built(root):
            return str(node.path(root))
        _stop_before(node, shard)
        inputs = current(inputs, root)
        check_inputs(inputs)
        work = build_dir(node.stage, node.key, root)
        work.mkdir(parents=True, exist_ok=True)
        shards, store = stage(node.stage).shards, artifact_store(root)
        if store.fetch_staged(node.stage, node.key, work, {shard: shards.file(shard)}):
            return str(work / shards.file(shard))  # finished by another machine
        with _naming_a_full_disk(node, root):
            written = shards.build(node.config, inputs, shard, work)
        store.stage_shard(node.stage, node.key, shard_files(work, shard), work / shards.file(shard))
        return str(written)
