"""train_sae on 2 processes (gloo) against 1 with the same config: the same SAE, metrics and evaluation to float
tolerance, also when the 2-process run resumes from a 1-process checkpoint (stages/training/sae_parallel.py)."""

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from stages import train_sae
from stages.runtime import interrupt
from storage.checkpoints import list_checkpoints
from tests.helpers import make_model, make_tokens
from tests.stages.test_concept_stages import SAE_CFG, VOCAB, _stop_after

pytestmark = pytest.mark.multiprocess

TOLERANCE = dict(rtol=1e-4, atol=1e-5)
TWO = SAE_CFG.model_copy(update={"num_processes": 2})


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    """The inputs and the 1-process SAE (6 steps of 1024 rows; dead latents, so AuxK, from step 3)."""
    root = tmp_path_factory.mktemp("sae")
    inputs = {"tokens": make_tokens(root, vocab_size=VOCAB), "reference": make_model(root, "reference", VOCAB)}
    (root / "one").mkdir()
    return inputs, train_sae.run(SAE_CFG, inputs, root / "one"), root / "one"


def assert_same_sae(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "sae.safetensors"), load_file(b / "sae.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], **TOLERANCE)
    ma, mb = ({(r["step"], r["name"]): r["value"] for r in pq.read_table(d / "metrics.parquet").to_pylist()
               if r["name"] != "train/rows_per_s"} for d in (a, b))
    assert ma.keys() == mb.keys()
    assert any(name == "train/aux_loss" and value > 0 for (_, name), value in ma.items())
    np.testing.assert_allclose([mb[k] for k in sorted(ma)], [ma[k] for k in sorted(ma)], **TOLERANCE)


def test_two_processes_train_the_sae_one_trains(one, tmp_path):
    inputs, summary, single = one
    two = train_sae.run(TWO, inputs, tmp_path)
    assert two["rows"] == summary["rows"] == 6 * 1024
    assert two["fvu"] == pytest.approx(summary["fvu"], rel=1e-4)
    assert_same_sae(single, tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_two_processes_resume_a_one_process_checkpoint(one, tmp_path, monkeypatch):
    inputs, _, single = one
    monkeypatch.setattr(interrupt, "requested", _stop_after(4))
    with pytest.raises(interrupt.Interrupted):
        train_sae.run(SAE_CFG, inputs, tmp_path)
    assert [step for step, _ in list_checkpoints(tmp_path / "checkpoints")] == [3, 4]
    monkeypatch.setattr(interrupt, "requested", lambda: False)
    assert train_sae.run(TWO, inputs, tmp_path)["resumed_from_step"] == 4
    assert_same_sae(single, tmp_path)


def test_a_stop_signal_stops_both_processes_after_a_step_with_a_checkpoint(one, tmp_path):
    """A stop requested in the launching process reaches the workers (its stop file): they checkpoint after the
    first step and stop together; the re-run resumes there and ends as the uninterrupted run."""
    inputs, _, single = one
    interrupt.STOP.set()
    try:
        with pytest.raises(interrupt.Interrupted, match="train_sae's workers saved a checkpoint"):
            train_sae.run(TWO, inputs, tmp_path)
    finally:
        interrupt.STOP.clear()
    assert [step for step, _ in list_checkpoints(tmp_path / "checkpoints")] == [1]
    assert train_sae.run(TWO, inputs, tmp_path)["resumed_from_step"] == 1
    assert_same_sae(single, tmp_path)
