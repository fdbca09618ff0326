"""The pipeline DAG as data: which nodes a PipelineConfig has, their configs, upstream roles and artifact keys.

Keys are computed without building anything, so `lmpipe status`, `--only STAGE` and the DuckDB catalog know
where every artifact of the current config lives. Node names: the stage name, or `train_target.<variant>`.

    tokenize_corpus -> train_reference -> score_reference ----------+
                    \\-----------------------------------------------+-> train_target.<variant> -> evaluate
"""

from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel

from schemas.configs import PipelineConfig, TargetRun
from storage.artifacts import artifact_dir, artifact_key, is_built

STAGES = ("tokenize_corpus", "train_reference", "score_reference", "train_target", "evaluate")

CODE_VERSIONS = {
    "tokenize_corpus": "1",
    "train_reference": "1",
    "score_reference": "1",
    "train_target": "1",
    "evaluate": "1",
}
"""The one place stage code versions live: bump a stage's version when its code changes what it writes;
its key and every downstream key change with it."""


@dataclass(frozen=True)
class Node:
    """One artifact to build: stage, config, upstream nodes by role, and its content key."""

    name: str
    stage: str
    config: BaseModel
    upstream: dict[str, str] = field(default_factory=dict)
    """role -> upstream node name (roles: tokens, reference, scores, target.<variant>)."""
    key: str = ""

    def path(self, root: Path | None = None) -> Path:
        """Where this node's artifact lives."""
        return artifact_dir(self.stage, self.key, root)

    def is_built(self, root: Path | None = None) -> bool:
        """True when the artifact exists with _SUCCESS."""
        return is_built(self.stage, self.key, root)


def plan(cfg: PipelineConfig) -> dict[str, Node]:
    """Every node of the pipeline in topological order, with keys chained through upstream keys."""
    nodes: dict[str, Node] = {}

    def add(name: str, stage: str, config: BaseModel, upstream: dict[str, str]) -> None:
        upstream_keys = {role: nodes[up].key for role, up in upstream.items()}
        key = artifact_key(stage, CODE_VERSIONS[stage], config, upstream_keys)
        nodes[name] = Node(name=name, stage=stage, config=config, upstream=upstream, key=key)

    add("tokenize_corpus", "tokenize_corpus", cfg.tokenize, {})
    add("train_reference", "train_reference", cfg.reference, {"tokens": "tokenize_corpus"})
    add("score_reference", "score_reference", cfg.score, {"tokens": "tokenize_corpus", "reference": "train_reference"})
    for variant in cfg.target.variants:
        upstream = {"tokens": "tokenize_corpus"}
        if variant.needs_reference_scores:
            upstream["scores"] = "score_reference"
        add(f"train_target.{variant.name}", "train_target", TargetRun.of(cfg.target, variant), upstream)
    evaluate_upstream = {"tokens": "tokenize_corpus", "reference": "train_reference"}
    evaluate_upstream |= {f"target.{v.name}": f"train_target.{v.name}" for v in cfg.target.variants}
    add("evaluate", "evaluate", cfg.evaluate, evaluate_upstream)
    return nodes


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
        raise ValueError(f"unknown stage {stage_or_node!r}; choose from {list(STAGES)} or a node in {list(nodes)}")
    return matched
