"""Checkpoints: atomic, newest two kept, plain-type state round trip; saved models load back identically."""

import json
import random

import numpy as np
import pytest
import torch

from stages.models.gpt import GPT
from stages.models.saved import load_model
from stages.training.rng import rng_state, set_rng_state
from storage import checkpoints
from tests.helpers import TINY_MODEL


def test_keeps_the_newest_two_and_ignores_unfinished_folders(tmp_path):
    directory = tmp_path / "checkpoints"
    assert checkpoints.latest_checkpoint(directory) is None
    for step in (3, 6, 9):
        checkpoints.save_checkpoint(directory, step, {"step": step}, {"w": torch.full((2,), float(step))})
    (directory / ".tmp-step-000012").mkdir()  # a killed save
    (directory / "step-000015").mkdir()  # no run.pt: not finished
    assert [s for s, _ in checkpoints.list_checkpoints(directory)] == [6, 9]
    latest = checkpoints.latest_checkpoint(directory)
    assert latest.name == "step-000009"
    tensors = {"w": torch.zeros(2)}
    assert checkpoints.load_checkpoint(latest, tensors)["step"] == 9
    assert torch.equal(tensors["w"], torch.full((2,), 9.0))


def test_rng_states_survive_a_weights_only_round_trip(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    path = checkpoints.save_checkpoint(tmp_path, 1, {"rng": rng_state(), "rows": [(1, 2, "train/loss", 0.5)]}, {})
    expected = (torch.rand(3), np.random.rand(3), random.random())
    loaded = checkpoints.load_checkpoint(path)
    set_rng_state(loaded["rng"])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]
    assert loaded["rows"] == [(1, 2, "train/loss", 0.5)]


@pytest.mark.parametrize("num_future_tokens", [1, 2])
def test_save_and_load_model_round_trip(tmp_path, num_future_tokens):
    torch.manual_seed(0)
    model = GPT(TINY_MODEL, 64, 16, num_future_tokens=num_future_tokens)
    checkpoints.save_model(tmp_path, model, {"variant": "x"})
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["vocab_size"] == 64 and meta["seq_len"] == 16 and meta["num_future_tokens"] == num_future_tokens
    assert meta["variant"] == "x" and meta["model"]["d_model"] == TINY_MODEL.d_model
    loaded = load_model(tmp_path, "cpu")
    assert not loaded.training and loaded.lm_head.weight is loaded.embed.weight  # tied weights stay tied
    idx_BT = torch.randint(0, 64, (2, 16))
    for a, b in zip(model.forward_heads(idx_BT)[0], loaded.forward_heads(idx_BT)[0], strict=True):
        assert torch.equal(a, b)
    assert not list(tmp_path.glob(".*.tmp"))
