"""Stage train_reference: the reference model of Rho-1, trained on the reference ("high-quality") subset.

Reads the tokenize_corpus artifact (split `ref_train` to train on; `ref_val` and `val` to evaluate).
Files written into the artifact directory:
    model.safetensors, model.json   the reference model (stages/models/saved.load_model reads it back)
    metrics.parquet                 schemas.tables.METRICS (train/*, val/ref_val/*, val/val/*)
It is trained with the same objective code as the targets (variant "reference": one head, all tokens), and
resumes from its checkpoints when an interrupted build is re-run. With a base (PipelineConfig.base, continual
pretraining) it is fine-tuned from the train_base model (upstream role `init`) instead of a random init.
"""

import logging
from pathlib import Path

from schemas.configs import PipelineConfig, ReferenceConfig
from schemas.manifest import Manifest
from stages.registry import NodeDecl, Stage
from stages.seeded_upstream import with_seeded
from stages.training.next_token_run import init_upstream, train_next_token
from storage.catalog import TableSpec

log = logging.getLogger(__name__)

TRAIN_SPLIT = "ref_train"
EVAL_SPLITS = ("ref_val", "val")


def run(cfg: ReferenceConfig, inputs: dict[str, Manifest], out: Path) -> dict:
    """Train the reference model on ref_train into `out` (from the base's weights when the config has a base);
    returns the training summary."""
    return train_next_token(cfg.model, cfg.train, inputs, out, stage="train_reference", name="reference",
                            train_split=TRAIN_SPLIT, eval_splits=EVAL_SPLITS, init_from=cfg.init_from)


def nodes(cfg: PipelineConfig) -> list[NodeDecl]:
    """The reference node: reads the tokens, and starts from the base model when the config has one."""
    return with_seeded([NodeDecl("train_reference", cfg.reference, {"tokens": "tokenize_corpus"}
                                 | init_upstream(cfg))], cfg)


STAGE = Stage(
    name="train_reference", code_version="3", config_type=ReferenceConfig, nodes=nodes, run=run,
    tables={"reference_metrics": TableSpec("train_reference", "metrics.parquet")},
    description="reference model on the reference subset",
)
