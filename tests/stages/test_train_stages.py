"""train_reference / train_target run(): splits, output files, reference-score wiring (fake score stage)."""


import numpy as np
import pyarrow.parquet as pq
import pytest

from schemas.configs import DynamicsConfig, ReferenceConfig, SelectionConfig, TargetConfig, TargetVariant
from stages import train_reference, train_target
from stages.models.saved import load_model
from storage.windows import TokenWindows
from tests.helpers import TINY_MODEL, make_token_artifact, tiny_train_config

SLM = TargetVariant(name="slm", selection=SelectionConfig(kind="top_k", keep_ratio=0.5))


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    return make_token_artifact(tmp_path_factory.mktemp("tokens"))


def _target_cfg(variant: TargetVariant) -> TargetConfig:
    return TargetConfig(model=TINY_MODEL, train=tiny_train_config(max_tokens=4 * 128), variants=[variant],
                        dynamics=DynamicsConfig(probe_windows=2))


def test_reference_trains_on_ref_train_and_evaluates_ref_val_and_val(tokens, tmp_path):
    summary = train_reference.run(ReferenceConfig(model=TINY_MODEL, train=tiny_train_config()), tokens, tmp_path)
    assert set(summary["val_loss"]) == {"ref_val", "val"}
    assert {p.name for p in tmp_path.iterdir()} == {"model.safetensors", "model.json", "metrics.parquet"}
    model = load_model(tmp_path, "cpu")
    assert model.num_future_tokens == 1 and model.vocab_size == 64


def test_target_with_selection_needs_scores(tokens, tmp_path):
    with pytest.raises(ValueError, match="score_reference"):
        train_target.run(_target_cfg(SLM), SLM, tokens, tmp_path)


def test_target_with_selection_reads_dense_scores(tokens, tmp_path, monkeypatch):
    calls = []

    def load_dense_scores(scores, split, num_tokens):
        calls.append((split, num_tokens))
        ref_loss = np.random.default_rng(0).random(num_tokens, dtype=np.float32)
        ref_loss[0] = np.nan
        return ref_loss, ref_loss * 2

    monkeypatch.setattr(train_target, "load_dense_scores", load_dense_scores)
    summary = train_target.run(_target_cfg(SLM), SLM, tokens, tmp_path, scores=tokens.model_copy(update={"key": "s"}))
    assert calls == [("train", TokenWindows.from_manifest(tokens, "train").num_tokens)]
    metrics = pq.read_table(tmp_path / "metrics.parquet").to_pylist()
    fractions = [r["value"] for r in metrics if r["name"] == "train/selected_fraction"]
    assert len(fractions) == summary["steps"] == 4 and all(f == 0.5 for f in fractions)
    probe = pq.read_table(tmp_path / "probe_losses.parquet")
    assert probe.num_rows == 1 * 2 * 16 and set(probe["split"].to_pylist()) == {"val"}  # one eval (end), 2 windows


def test_non_finite_reference_scores_are_rejected(tokens):
    windows = TokenWindows.from_manifest(tokens, "train")
    ref = np.ones(windows.num_tokens, np.float32)
    ref[5] = np.nan
    with pytest.raises(ValueError, match="first token_index 5"):
        train_target.dense_score_lookup(ref, np.ones_like(ref), windows)


def test_multi_token_target_without_scores(tokens, tmp_path):
    mtp = TargetVariant(name="mtp", num_future_tokens=2)
    summary = train_target.run(_target_cfg(mtp), mtp, tokens, tmp_path)
    assert summary["steps"] == 4 and load_model(tmp_path, "cpu").num_future_tokens == 2
    names = set(pq.read_table(tmp_path / "metrics.parquet")["name"].to_pylist())
    assert {"train/head1/loss", "train/head2/loss", "val/val/loss", "val/ref_val/loss"} <= names
