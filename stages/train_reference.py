"""Stage train_reference: the reference model of Rho-1, trained on the reference ("high-quality") subset.

Reads the tokenize_corpus artifact (split `ref_train` to train on; `ref_val` and `val` to evaluate).
Files written into the artifact directory:
    model.safetensors, model.json   the reference model (stages/models/saved.load_model reads it back)
    metrics.parquet                 schemas.tables.METRICS (train/*, val/ref_val/*, val/val/*)
It is trained with the same objective code as the targets (variant "reference": one head, all tokens), and
resumes from its checkpoints when an interrupted build is re-run.
"""

import logging
from pathlib import Path

from schemas.configs import ReferenceConfig, TargetVariant
from schemas.manifest import Manifest
from stages.objectives.factory import build_objective
from stages.registry import NodeDecl, Stage
from stages.training.loop import train
from storage.catalog import TableSpec
from storage.windows import TokenWindows

log = logging.getLogger(__name__)

TRAIN_SPLIT = "ref_train"
EVAL_SPLITS = ("ref_val", "val")


def run(cfg: ReferenceConfig, inputs: dict[str, Manifest], out: Path) -> dict:
    """Train the reference model on ref_train into `out`; returns the training summary."""
    tokens = inputs["tokens"]
    variant = TargetVariant(name="reference")
    train_windows = TokenWindows.from_manifest(tokens, TRAIN_SPLIT)
    val_windows = {split: TokenWindows.from_manifest(tokens, split) for split in EVAL_SPLITS}
    meta = {"stage": "train_reference", "variant": variant.model_dump(mode="json"), "tokens_key": tokens.key}
    return train(build_objective(cfg.model, variant), train_windows, val_windows, cfg.train, Path(out),
                 vocab_size=int(tokens.summary["vocab_size"]), label="reference", meta=meta)


STAGE = Stage(
    name="train_reference", code_version="2", config_type=ReferenceConfig,
    nodes=lambda cfg: [NodeDecl("train_reference", cfg.reference, {"tokens": "tokenize_corpus"})],
    run=run,
    tables={"reference_metrics": TableSpec("train_reference", "metrics.parquet")},
    description="reference model on the reference subset",
)
