"""train_reference / train_target run(): splits, output files, reference-score wiring (fake score stage)."""


import numpy as np
import pyarrow.parquet as pq
import pytest

from schemas.configs import DynamicsConfig, ReferenceConfig, SelectionConfig, TargetConfig, TargetRun, TargetVariant
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


def _fake_scores(tokens, root, values=None):
    """A score_reference-like artifact: part files with ref_loss/ref_entropy for every train target."""
    import pyarrow as pa

    from schemas.tables import TOKEN_SCORES
    from storage.parquet import write_table

    windows = TokenWindows.from_manifest(tokens, "train")
    index = np.arange(1, len(windows) * windows.seq_len + 1)
    loss = values if values is not None else np.random.default_rng(0).random(len(index), dtype=np.float32)
    root.mkdir(parents=True, exist_ok=True)
    stream = np.asarray(windows.stream)
    write_table(root / "part-train-000.parquet", pa.table({
        "split": ["train"] * len(index), "token_index": index, "doc_id": np.zeros(len(index), np.int64),
        "position": np.zeros(len(index), np.int32), "token_id": stream[index].astype(np.int32),
        "ref_loss": loss.astype(np.float32), "ref_entropy": (2 * loss).astype(np.float32)}), TOKEN_SCORES)
    return tokens.model_copy(update={"stage": "score_reference", "key": "s", "path": str(root)})


def _run_target(variant, inputs, out):
    return train_target.run(TargetRun.of(_target_cfg(variant), variant), inputs, out)


def test_reference_trains_on_ref_train_and_evaluates_ref_val_and_val(tokens, tmp_path):
    summary = train_reference.run(ReferenceConfig(model=TINY_MODEL, train=tiny_train_config()), {"tokens": tokens},
                                  tmp_path)
    assert set(summary["val_loss"]) == {"ref_val", "val"}
    assert {p.name for p in tmp_path.iterdir()} == {"model.safetensors", "model.json", "metrics.parquet"}
    model = load_model(tmp_path, "cpu")
    assert model.num_future_tokens == 1 and model.vocab_size == 64


def test_target_with_selection_needs_scores(tokens, tmp_path):
    with pytest.raises(ValueError, match="score_reference"):
        _run_target(SLM, {"tokens": tokens}, tmp_path)


def test_target_with_selection_reads_reference_scores(tokens, tmp_path):
    scores = _fake_scores(tokens, tmp_path / "scores")
    summary = _run_target(SLM, {"tokens": tokens, "scores": scores}, tmp_path / "out")
    metrics = pq.read_table(tmp_path / "out" / "metrics.parquet").to_pylist()
    fractions = [r["value"] for r in metrics if r["name"] == "train/selected_fraction"]
    assert len(fractions) == summary["steps"] == 4 and all(f == 0.5 for f in fractions)
    probe = pq.read_table(tmp_path / "out" / "probe_losses.parquet")
    assert probe.num_rows == 2 * 2 * 16 and set(probe["split"].to_pylist()) == {"val"}  # step 0 and end, 2 windows
    assert (tmp_path / "out" / "token_selection.parquet").is_file()


def test_non_finite_reference_scores_are_rejected(tokens, tmp_path):
    windows = TokenWindows.from_manifest(tokens, "train")
    values = np.ones(len(windows) * windows.seq_len, np.float32)
    values[4] = np.nan  # token_index 5
    scores = _fake_scores(tokens, tmp_path / "scores", values)
    with pytest.raises(ValueError, match="non-finite"):
        _run_target(SLM, {"tokens": tokens, "scores": scores}, tmp_path / "out")


def test_multi_token_target_without_scores(tokens, tmp_path):
    mtp = TargetVariant(name="mtp", num_future_tokens=2)
    summary = _run_target(mtp, {"tokens": tokens}, tmp_path)
    assert summary["steps"] == 4 and load_model(tmp_path, "cpu").num_future_tokens == 2
    names = set(pq.read_table(tmp_path / "metrics.parquet")["name"].to_pylist())
    assert {"train/head1/loss", "train/head2/loss", "val/val/loss", "val/ref_val/loss"} <= names
