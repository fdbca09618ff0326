"""The pipeline DAG as data: which nodes a PipelineConfig has, their configs, upstream roles and artifact keys.

Derived from the stage registry (stages/registry.py): each stage declares its nodes for a config. Keys are
computed without building anything, so `lmpipe status`, `--only STAGE` and the DuckDB catalog know where every
artifact of the current config lives. Node names: the stage name, or `<stage>.<variant>` (train_target.slm).

    tokenize_corpus -> train_reference -> score_reference ----------------------+
                                       \\-> train_sae -> extract_concepts -------+-> train_target.<variant> -> evaluate
"""

from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel

from schemas.configs import PipelineConfig
from stages.byom import resolve
from stages.registry import Stage, stages
from storage.artifacts import artifact_dir, artifact_key, is_built, success_stamp


@dataclass(frozen=True)
class Node:
    """One artifact to build: stage, config, upstream nodes by role, and its content key."""

    name: str
    stage: str
    config: BaseModel
    upstream: dict[str, str] = field(default_factory=dict)
    """role -> upstream node name (roles: tokens, reference, scores, concepts, target.<variant>, ...)."""
    key: str = ""
    code_version: str = ""

    def path(self, root: Path | None = None) -> Path:
        """Where this node's artifact lives."""
        return artifact_dir(self.stage, self.key, root)

    def is_built(self, root: Path | None = None) -> bool:
        """True when the artifact exists with _SUCCESS."""
        return is_built(self.stage, self.key, root)

    def finished_stamp(self, root: Path | None = None) -> str | None:
        """The artifact's finish time (the _SUCCESS content), None when it is not built: it changes on a rebuild."""
        return success_stamp(self.stage, self.key, root)


def plan(cfg: PipelineConfig, registry: dict[str, Stage] | None = None) -> dict[str, Node]:
    """Every node of the pipeline in topological order, with keys chained through upstream keys.

    Nodes of on-demand stages are kept only when another node depends on them. Roles that start from a
    checkpoint folder get its shape and file digest first (stages/byom.py): the digest is part of their config,
    so their key and every downstream key change when a file of the checkpoint does."""
    cfg = resolve(cfg)
    registry = registry if registry is not None else stages()
    nodes: dict[str, Node] = {}
    for stage in registry.values():
        for decl in stage.nodes(cfg):
            missing = [up for up in decl.upstream.values() if up not in nodes]
            if missing:
                raise ValueError(f"node {decl.name} depends on {missing}, which no earlier stage declares")
            upstream_keys = {role: nodes[up].key for role, up in decl.upstream.items()}
            key = artifact_key(stage.name, stage.code_version, decl.config, upstream_keys)
            nodes[decl.name] = Node(decl.name, stage.name, decl.config, dict(decl.upstream), key, stage.code_version)
    wanted = {name for name, node in nodes.items() if not registry[node.stage].on_demand}
    needed = upstream_closure(nodes, wanted)
    return {name: node for name, node in nodes.items() if name in needed}


def upstream_closure(nodes: dict[str, Node], names: set[str]) -> set[str]:
    """The given nodes plus everything they depend on."""
    todo, seen = list(names), set()
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(nodes[name].upstream.values())
    return seen


def select_nodes(nodes: dict[str, Node], stage_or_node: str) -> list[str]:
    """Node names matching a stage name (all its nodes) or one node name; ValueError listing valid names."""
    matched = [n for n, node in nodes.items() if n == stage_or_node or node.stage == stage_or_node]
    if not matched:
        stage_names = list(dict.fromkeys(node.stage for node in nodes.values()))
        raise ValueError(f"unknown stage {stage_or_node!r}; choose from {stage_names} or a node in {list(nodes)}")
    return matched
