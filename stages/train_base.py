"""Stage train_base: the base model of continual pretraining (Rho-1 Sec. 3.1), built only when the config has a
`base` (PipelineConfig.base).

A plain next-token model (one head, all tokens) pretrained on the general `train` split; the reference is
fine-tuned from it on `ref_train` and every target variant continues from it (their upstream role `init`, so
their keys chain through this artifact's). Both start from the same weights, so what the base memorised of
`train` cancels in the excess loss L_target - L_ref.
Reads the tokenize_corpus artifact (split `train` to train on; `val` and `ref_val` to evaluate).
Files written into the artifact directory:
    model.safetensors, model.json   the base model (stages/models/saved.load_model reads it back)
    metrics.parquet                 schemas.tables.METRICS (train/*, val/val/*, val/ref_val/*)
It resumes from its checkpoints when an interrupted build is re-run.
"""

from pathlib import Path

from schemas.configs import BaseConfig, PipelineConfig
from schemas.manifest import Manifest
from stages.registry import NodeDecl, Stage
from stages.training.next_token_run import train_next_token
from storage.catalog import TableSpec

EVAL_SPLITS = ("val", "ref_val")


def run(cfg: BaseConfig, inputs: dict[str, Manifest], out: Path) -> dict:
    """Train the base model on cfg.split (`train`) into `out`; returns the training summary."""
    return train_next_token(cfg.model, cfg.train, inputs, out, stage="train_base", name="base",
                            train_split=cfg.split, eval_splits=EVAL_SPLITS, init_from=cfg.init_from)


def nodes(cfg: PipelineConfig) -> list[NodeDecl]:
    """The base node when the config has a base, else none (and nothing chains through it)."""
    return [NodeDecl("train_base", cfg.base, {"tokens": "tokenize_corpus"})] if cfg.base is not None else []


STAGE = Stage(
    name="train_base", code_version="2", config_type=BaseConfig, nodes=nodes, run=run,
    tables={"base_metrics": TableSpec("train_base", "metrics.parquet")},
    description="base model on the general split (continual pretraining; only with a base)",
)
