"""Stage train_teacher: the general model CoCoMix's concepts and distillation's teacher come from (PipelineConfig
.teacher), built only when a target variant uses concepts or distillation.

The paper takes both from a pretrained general model (GPT-2 124M) that is stronger than its students; the Rho-1
reference (train_reference) is a model of the target *domain* and keeps that job. The teacher is a plain
next-token model (one head, all tokens) trained on `teacher.splits`: the `general` split (tokenize.general_where:
documents in no other split) and/or the targets' `train` split, never on `val`, `ref_val` or `ref_train`, so no
number the targets are evaluated on comes from text the teacher saw. Its budget (wider and/or longer than a
target) is the preset's: the report states its loss beside the students' and warns when it is not better than
the baseline on `val`.
Reads the tokenize_corpus artifact (the streams of teacher.splits, joined; `val` and `ref_val` to evaluate).
Files written into the artifact directory:
    model.safetensors, model.json   the teacher (stages/models/saved.load_model reads it back)
    metrics.parquet                 schemas.tables.METRICS (train/*, val/val/*, val/ref_val/*)
It resumes from its checkpoints when an interrupted build is re-run.
"""

from pathlib import Path

from schemas.configs import PipelineConfig, TeacherConfig
from schemas.manifest import Manifest
from stages.registry import NodeDecl, Stage
from stages.seeded_upstream import with_seeded
from stages.training.next_token_run import TEACHER_NODE, train_next_token
from storage.catalog import TableSpec

EVAL_SPLITS = ("val", "ref_val")


def run(cfg: TeacherConfig, inputs: dict[str, Manifest], out: Path) -> dict:
    """Train the teacher on cfg.splits (joined) into `out`; returns the training summary."""
    return train_next_token(cfg.model, cfg.train, inputs, out, stage="train_teacher", name="teacher",
                            train_split=tuple(cfg.splits), eval_splits=EVAL_SPLITS, init_from=cfg.init_from)


def nodes(cfg: PipelineConfig) -> list[NodeDecl]:
    """The teacher node (planned only when something depends on it)."""
    return with_seeded([NodeDecl(TEACHER_NODE, cfg.teacher, {"tokens": "tokenize_corpus"})], cfg)


STAGE = Stage(
    name="train_teacher", code_version="1", config_type=TeacherConfig, nodes=nodes, run=run,
    tables={"teacher_metrics": TableSpec("train_teacher", "metrics.parquet")},
    on_demand=True,
    description="general teacher model: concept source (SAE, labels) and distillation teacher",
)
