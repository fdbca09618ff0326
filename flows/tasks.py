"""Prefect tasks around stages.runner, cached on the artifact key.

The cache key is `<stage>-<key>-<finish time>` when the artifact is finished and None otherwise (None makes
Prefect execute and not reuse), so a deleted artifact is rebuilt and a forced rebuild invalidates the
record. The disk stays the source of truth: tasks only pass small Manifests around, never tensors.
"""

from typing import Any

from prefect import task
from prefect.cache_policies import CachePolicy

from schemas.manifest import Manifest
from stages import runner
from stages.dag import Node
from stages.score_reference import shard_name, shard_ranges
from storage.artifacts import SUCCESS, build_dir


def _finished_stamp(node: Node) -> str | None:
    marker = node.path() / SUCCESS
    return marker.read_text().strip() if marker.exists() else None


class ArtifactCachePolicy(CachePolicy):
    """Cache on the artifact key; no key (always execute) when the artifact is missing or forced."""

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs) -> str | None:
        node: Node = inputs["node"]
        if inputs.get("force"):
            return None
        stamp = _finished_stamp(node)
        if stamp is None:
            return None
        return f"{node.stage}-{node.key}-{stamp}".replace(":", "").replace("+", "")


class ShardCachePolicy(CachePolicy):
    """A score shard is cached once its part file exists (in the build dir or the finished artifact)."""

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs) -> str | None:
        node: Node = inputs["node"]
        name = shard_name(inputs["split"], inputs["shard"])
        if not any((d / name).exists() for d in (node.path(), build_dir(node.stage, node.key))):
            return None
        return f"{node.stage}-{node.key}-{inputs['split']}-{inputs['shard']}"


@task(cache_policy=ArtifactCachePolicy(), persist_result=True)
def build_stage(node: Node, inputs: dict[str, Manifest], force: bool = False) -> Manifest:
    """Build (or reuse) one node's artifact and return its manifest."""
    return runner.build_node(node, inputs, force=force)


@task(cache_policy=ShardCachePolicy(), persist_result=True)
def score_shard(node: Node, inputs: dict[str, Manifest], split: str, shard: int) -> str:
    """Score one shard of one split with the reference model (one Parquet part file)."""
    return runner.score_shard(node, inputs, split, shard)


def shard_list(node: Node, tokens: Manifest) -> list[tuple[str, int]]:
    """(split, shard) pairs of a score_reference node, from the token counts of the tokens artifact."""
    pairs = []
    for split, num_windows in tokens.summary["num_windows"].items():
        pairs += [(split, shard) for shard in range(len(shard_ranges(num_windows, node.config.num_shards)))]
    return pairs


def task_for(node: Node):
    """The build task named after the node (so the UI shows `train_target.slm`, not `build_stage`)."""
    return build_stage.with_options(name=node.name, task_run_name=node.name)
