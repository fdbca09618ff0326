"""Prefect tasks around stages.node_builder, cached on the artifact key.

The cache key is `<stage>-<key>-<finish time>` when the artifact is finished and None otherwise (None makes
Prefect execute and not reuse), so a deleted artifact is rebuilt and a forced rebuild invalidates the
record. The disk stays the source of truth: tasks only pass small Manifests around, never tensors.
"""

from typing import Any

from prefect import task
from prefect.cache_policies import CachePolicy

from schemas.manifest import Manifest
from stages import node_builder
from stages.dag import Node
from stages.runtime import interrupt


class ArtifactCachePolicy(CachePolicy):
    """Cache on the artifact key; no key (always execute) when the artifact is missing, forced or stale (an
    upstream was rebuilt with other content since)."""

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs) -> str | None:
        node: Node = inputs["node"]
        if inputs.get("force"):
            return None
        stamp = node.finished_stamp()
        if stamp is None or node_builder.is_stale(node, inputs.get("inputs") or {}):
            return None
        return f"{node.stage}-{node.key}-{stamp}".replace(":", "").replace("+", "")


class ShardCachePolicy(CachePolicy):
    """A shard is cached once its file exists (in the build dir or the finished artifact)."""

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs) -> str | None:
        node: Node = inputs["node"]
        if not node_builder.shard_done(node, inputs["shard"]):
            return None
        return f"{node.stage}-{node.key}-{inputs['shard']}"


@task(cache_policy=ArtifactCachePolicy(), persist_result=True)
def build_stage(node: Node, inputs: dict[str, Manifest], force: bool = False, stop_file: str | None = None) -> Manifest:
    """Build (or reuse) one node's artifact and return its manifest; `stop_file`: the run's (see interrupt)."""
    with interrupt.watching(stop_file):
        # a task run that starts after the run was stopped (a signal, or another task run failed) does not begin
        interrupt.check(f"{node.name} was not started; run again to build it")
        return node_builder.build_node(node, inputs, force=force)


@task(cache_policy=ShardCachePolicy(), persist_result=True)
def build_shard(node: Node, inputs: dict[str, Manifest], shard: str, stop_file: str | None = None) -> str:
    """Build one shard of a fanning-out stage (e.g. one split's part of the reference scores)."""
    with interrupt.watching(stop_file):
        return node_builder.build_shard(node, inputs, shard)


def task_for(node: Node):
    """The build task named after the node (so the UI shows `train_target.slm`, not `build_stage`)."""
    return build_stage.with_options(name=node.name, task_run_name=node.name)


def shard_task_for(node: Node, shard: str):
    """The shard task named `<node>.<shard>` (e.g. `score_reference.train-000`)."""
    return build_shard.with_options(name=f"{node.stage}.shard", task_run_name=f"{node.name}.{shard}")
