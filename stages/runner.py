"""Build one DAG node: call its stage's run() inside storage.materialize (atomic, locked, content-addressed).

Prefect-free, so the same call serves the Prefect tasks, tests and scripts.
"""

import logging
from pathlib import Path

from schemas.configs import TargetConfig
from schemas.manifest import Manifest
from stages.dag import CODE_VERSIONS, Node
from storage.artifacts import build_dir, materialize

log = logging.getLogger(__name__)


def build_node(node: Node, inputs: dict[str, Manifest], *, force: bool = False, root: Path | None = None) -> Manifest:
    """Return the node's artifact, building it (or rebuilding it when forced) from its upstream manifests."""
    return materialize(node.stage, CODE_VERSIONS[node.stage], node.config, inputs, _builder(node, inputs),
                       root=root, force=force)


def score_shard(node: Node, inputs: dict[str, Manifest], split: str, shard: int, *, root: Path | None = None) -> str:
    """Score one shard of one split into the score_reference build dir (skipped when already there)."""
    from stages import score_reference

    if node.is_built(root):
        return str(node.path(root))
    work = build_dir(node.stage, node.key, root)
    work.mkdir(parents=True, exist_ok=True)
    return str(score_reference.score_shard(node.config, inputs["tokens"], inputs["reference"], split, shard, work))


def _builder(node: Node, inputs: dict[str, Manifest]):
    cfg = node.config
    if node.stage == "tokenize_corpus":
        from stages import tokenize_corpus
        return lambda out: tokenize_corpus.run(cfg, out)
    if node.stage == "train_reference":
        from stages import train_reference
        return lambda out: train_reference.run(cfg, inputs["tokens"], out)
    if node.stage == "score_reference":
        from stages import score_reference
        return lambda out: score_reference.run(cfg, inputs["tokens"], inputs["reference"], out)
    if node.stage == "train_target":
        from stages import train_target
        target = TargetConfig(model=cfg.model, train=cfg.train, dynamics=cfg.dynamics, variants=[cfg.variant])
        return lambda out: train_target.run(target, cfg.variant, inputs["tokens"], out, inputs.get("scores"))
    if node.stage == "evaluate":
        from stages import evaluate
        targets = [m for role, m in inputs.items() if role.startswith("target.")]
        return lambda out: evaluate.run(cfg, inputs["tokens"], inputs["reference"], targets, out)
    raise ValueError(f"no builder for stage {node.stage!r}")
