"""Issue 24's fair-test controls: the teacher's data, the general split, matched controls, the evaluation cadence,
the continual setting and the teacher-vs-student report section."""

import math

import pytest

from schemas.configs import ModelConfig, TokenizeConfig
from schemas.presets import preset
from stages.dag import plan
from stages.evaluation.upstream_models import teacher_markdown, teacher_warning
from stages.models.gpt import GPT

EVALUATION_SPLITS = {"val", "ref_val", "ref_train"}
"""What the teacher and the continual base must never train on (ref_train: the reference's own data)."""


def _params(model: ModelConfig, inserts: dict | None = None) -> int:
    return sum(p.numel() for p in GPT(model, 4096, 128, inserts=inserts).parameters())


@pytest.mark.parametrize("name", ["tiny", "default", "compare", "full", "continual"])
def test_teacher_trains_on_no_split_a_target_is_evaluated_on(name):
    cfg = preset(name)
    assert not set(cfg.teacher.splits) & EVALUATION_SPLITS
    nodes = plan(cfg)
    # the concept source and the distillation teacher are the teacher, never the Rho-1 reference
    assert nodes["train_sae"].upstream["reference"] == "train_teacher"
    assert nodes["extract_concepts"].upstream["reference"] == "train_teacher"
    if "train_target.kd" in nodes:  # kd runs in compare and full (and tiny), not in default
        assert nodes["train_target.kd"].upstream["teacher"] == "train_teacher"
    assert nodes["evaluate"].upstream["teacher"] == "train_teacher"


def test_default_teacher_has_several_times_a_targets_training_flops():
    cfg = preset("default")
    ratio = cfg.teacher.train.max_tokens * _params(cfg.teacher.model) / (
        cfg.target.train.max_tokens * _params(cfg.target.model))
    assert ratio >= 2  # 1.2M tokens against 600k: the default's ~18 minutes (docs/results.md) keep every control


def test_matched_controls_equal_their_methods_parameter_counts_within_2_percent():
    cfg = preset("default")
    variants = {v.name: v for v in cfg.target.variants}
    latents = cfg.sae.expansion * cfg.teacher.model.d_model
    cocomix = _params(cfg.target.model, {cfg.target.model.num_layers // 2 - 1: {
        "kind": "concepts", "num_latents": latents, "num_active": 16, "mixing": "interleave"}})
    assert abs(_params(variants["ntp_wide"].model) / cocomix - 1) < 0.02
    # mtp2's next-token path: trunk (num_layers - 2) + its head-1 block = ntp_l3's blocks
    assert variants["ntp_l3"].model.num_layers == cfg.target.model.num_layers - 2 + 1


def test_default_evaluates_at_least_20_points_per_curve():
    train = preset("default").target.train
    steps = math.ceil(train.max_tokens / train.batch_size_tokens)
    points = 1 + steps // train.eval_every_steps + (steps % train.eval_every_steps > 0)  # step 0 .. the last step
    assert points >= 20
    assert train.eval_every_steps * train.batch_size_tokens / train.max_tokens <= 0.05


def test_continual_base_trains_on_the_general_split_at_a_continual_lr():
    cfg = preset("continual")
    assert cfg.base.split == "general" and cfg.tokenize.general_where
    assert cfg.target.train.lr == pytest.approx(preset("default").target.train.lr * 8e-5 / 3e-4)
    nodes = plan(cfg)
    assert nodes["train_reference"].upstream["init"] == "train_base"
    assert all(n.upstream.get("init") == "train_base" for k, n in nodes.items() if k.startswith("train_target."))


def test_general_where_at_its_default_keeps_the_tokenize_key():
    assert "general_where" not in TokenizeConfig().model_dump()
    assert TokenizeConfig(general_where="year < 1913").model_dump()["general_where"] == "year < 1913"


def test_general_split_is_disjoint_from_every_other_split(tmp_path):
    import numpy as np
    import pyarrow.parquet as pq

    from stages import tokenize_corpus

    cfg = preset("tiny").tokenize
    plain = tokenize_corpus.run(cfg.model_copy(update={"general_where": None}), {}, tmp_path / "plain")
    summary = tokenize_corpus.run(cfg, {}, tmp_path / "general")
    assert summary["num_tokens"]["general"] > 0
    docs = pq.read_table(tmp_path / "general" / "documents.parquet", columns=["split", "year"]).to_pylist()
    general_years = {d["year"] for d in docs if d["split"] == "general"}
    assert general_years and max(general_years) < 2014 <= min(d["year"] for d in docs if d["split"] != "general")
    for split in ("train", "val", "ref_train", "ref_val"):  # the other splits tokenize exactly as without it
        assert plain["num_tokens"][split] == summary["num_tokens"][split]
        assert (np.load(tmp_path / "plain" / f"stream-{split}.npy")
                == np.load(tmp_path / "general" / f"stream-{split}.npy")).all()


def _rows(teacher_val: float) -> list[dict]:
    return [{"model": "teacher", "role": "teacher", "num_params": 10, "tokens_seen": 5, "val_loss": teacher_val,
             "ref_val_loss": 5.0, "val_minus_baseline": teacher_val - 5.5},
            {"model": "ntp (mean of 1)", "role": "baseline", "num_params": 10, "tokens_seen": 5, "val_loss": 5.5,
             "ref_val_loss": 5.4, "val_minus_baseline": 0.0}]


def test_report_warns_when_the_teacher_is_not_better_than_the_baseline():
    assert teacher_warning(_rows(5.2), "ntp") is None
    assert "not better than ntp" in teacher_warning(_rows(5.6), "ntp")
    text = teacher_markdown(_rows(5.6), "ntp")
    assert "| teacher |" in text and "**Warning**" in text
