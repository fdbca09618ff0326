"""Seeded upstream models (PipelineConfig.seed_upstream): seed run r > 0 of every target variant reads its own
reference, teacher and what comes from them, trained with seed + r, so the spread over seeds includes the luck
of the models the methods learn from (a second reference init moved slm by 0.06 nats), not only the target's.

Node names: `<node>.seed<r>` beside `<node>` (train_reference.seed1, score_reference.seed1, train_teacher.seed1,
train_sae.seed1, extract_concepts.seed1, extract_concepts.token.seed1, ...), as the target's seed runs are named
(schemas.configs.replica_name). Run 0 reads the unseeded nodes, so its keys are the one-seed run's.
"""

from pydantic import BaseModel

from schemas.configs import PipelineConfig, replica_name
from stages.registry import NodeDecl

SEEDED_STAGES = ("train_reference", "score_reference", "train_teacher", "train_sae", "extract_concepts")
"""The upstream stages that get a node per seed run."""


def seeded_node(node: str, replica: int, cfg: PipelineConfig) -> str:
    """The node seed run `replica` reads in place of `node`: `<node>.seed<r>` for a seeded upstream stage when the
    config seeds its upstream, else `node` itself."""
    if replica == 0 or not cfg.seed_upstream or node.split(".", 1)[0] not in SEEDED_STAGES:
        return node
    return replica_name(node, replica)


def reseeded(config: BaseModel, replica: int) -> BaseModel:
    """A stage config with its seed moved by `replica`: a training run's (`train.seed`), or its own `seed`; a
    config without one (scoring, labelling) is the same, its key changing through its upstream."""
    if hasattr(config, "train"):
        return config.model_copy(update={"train": config.train.model_copy(update={"seed": config.train.seed
                                                                                   + replica})})
    if "seed" in type(config).model_fields:
        return config.model_copy(update={"seed": config.seed + replica})
    return config


def with_seeded(decls: list[NodeDecl], cfg: PipelineConfig) -> list[NodeDecl]:
    """`decls` and, when the config seeds its upstream, a copy of each per seed run r > 0: named, reseeded and
    reading its upstream as seed run r."""
    replicas = range(1, cfg.target.seeds) if cfg.seed_upstream else range(0)
    return decls + [NodeDecl(seeded_node(decl.name, r, cfg), reseeded(decl.config, r),
                             {role: seeded_node(up, r, cfg) for role, up in decl.upstream.items()})
                    for r in replicas for decl in decls]
