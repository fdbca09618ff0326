"""GPT with inserts (CoCoMix concept mixing, pause slots): causality, positions, KV-cache decoding, save/load."""

import pytest
import torch

from schemas.configs import ModelConfig
from stages.inference.generate import generate
from stages.models.gpt import GPT, KVCache
from stages.models.inserts import interleave
from stages.models.saved import load_model
from storage.checkpoints import save_model

CFG = ModelConfig(num_layers=3, num_heads=2, d_model=32)
V, T = 50, 12
INSERTS = {
    "concepts": {1: {"kind": "concepts", "num_latents": 64, "num_active": 4, "mixing": "interleave"}},
    "concepts_add": {0: {"kind": "concepts", "num_latents": 64, "num_active": 4, "mixing": "add"}},
    "pause": {1: {"kind": "pause"}},
    "pause_token": {1: {"kind": "pause", "readout": "token"}},
}


def model_with(kind: str, seed: int = 0, num_future_tokens: int = 1) -> GPT:
    torch.manual_seed(seed)
    model = GPT(CFG, V, T, num_future_tokens=num_future_tokens, inserts=INSERTS[kind]).eval()
    with torch.no_grad():  # non-zero biases/vectors so a broken insert cannot hide behind zero init
        for name, param in model.named_parameters():
            if "inserts" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model


def test_interleave_puts_each_concept_right_after_its_token():
    h = torch.arange(6.0).view(1, 3, 2)
    c = -torch.arange(6.0).view(1, 3, 2)
    assert interleave(h, c)[0, :, 0].tolist() == [0, -0, 2, -2, 4, -4]


@pytest.mark.parametrize("kind", sorted(INSERTS))
def test_no_position_sees_a_later_token(kind):
    """Changing token t changes no logits before t (interleaving keeps causality)."""
    model = model_with(kind)
    idx = torch.randint(0, V, (1, T))
    base = model(idx)
    for t in (0, 5, T - 1):
        changed = idx.clone()
        changed[0, t] = (changed[0, t] + 1) % V
        out = model(changed)
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=1e-6)
        assert not torch.allclose(out[:, t], base[:, t])


@pytest.mark.parametrize("kind", sorted(INSERTS))
def test_cached_decoding_equals_uncached(kind):
    model = model_with(kind)
    idx = torch.randint(0, V, (2, T))
    full = model(idx)
    cache = KVCache(model, 2, torch.device("cpu"), torch.float32)
    steps = [model(idx[:, :5], cache)] + [model(idx[:, t:t + 1], cache) for t in range(5, T)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", sorted(INSERTS))
def test_greedy_generation_with_and_without_cache_agree(kind):
    model = model_with(kind)
    prompt = [3, 7, 1]
    cached = generate(model, prompt, 6)
    uncached, ids = [], list(prompt)
    for _ in range(6):
        token = int(model(torch.tensor([ids]))[0, -1].argmax())
        uncached.append(token)
        ids.append(token)
    assert cached == uncached


@pytest.mark.parametrize("kind", sorted(INSERTS))
def test_model_with_insert_round_trips_through_save_and_load(kind, tmp_path):
    model = model_with(kind, num_future_tokens=2 if kind == "concepts_add" else 1)  # inserts sit in the trunk
    save_model(tmp_path, model, {"note": "test"})
    loaded = load_model(tmp_path)
    assert loaded.insert_specs == model.insert_specs and loaded.num_future_tokens == model.num_future_tokens
    idx = torch.randint(0, V, (2, T))
    for a, b in zip(model.forward_heads(idx)[0], loaded.forward_heads(idx)[0], strict=True):
        assert torch.equal(a, b)


def test_trunk_reports_insert_outputs_and_captures_the_right_block():
    model = model_with("concepts")
    idx = torch.randint(0, V, (2, T))
    out = model.trunk(idx, capture_layers=(0, 1))
    assert out.slots == 2 and out.h_BSD.shape == (2, 2 * T, CFG.d_model)
    assert out.extras["concept_logits_BTL"].shape == (2, T, 64)
    assert out.captured[0].shape == (2, T, CFG.d_model)  # before the insert after block 1: T positions
    assert out.captured[1].shape == (2, T, CFG.d_model)
    manual, _ = model.run_blocks(model.embed(idx), 0, 1)
    torch.testing.assert_close(out.captured[0], manual)
    h_after_1 = model.residual_after(idx, 1)
    assert h_after_1.shape == (2, 2 * T, CFG.d_model)  # residual_after includes the insert after block 1
    torch.testing.assert_close(h_after_1[:, 0::2], out.captured[1])  # h slots are the captured stream


@pytest.mark.parametrize(("kind", "slot"), [("concepts", 1), ("pause", 1), ("pause_token", 0)])
def test_the_head_reads_the_slot_the_insert_names(kind, slot):
    """Logits come from the inserted slot (concept, pause) or the token's own slot (pause read from the token)."""
    model = model_with(kind)
    idx = torch.randint(0, V, (2, T))
    stream, _ = model.run_blocks(model.embed(idx), 0, CFG.num_layers)  # every block, both slots of each token
    torch.testing.assert_close(model(idx), model.logits(stream[:, slot::2]))


def test_a_pause_readout_that_names_no_slot_is_a_clear_error():
    with pytest.raises(ValueError, match="pause readout"):
        GPT(CFG, V, T, inserts={1: {"kind": "pause", "readout": "last"}})


def test_steering_changes_the_continuous_concept():
    model = model_with("concepts")
    mixer = model.inserts["1"]
    idx = torch.randint(0, V, (1, T))
    base = model(idx)
    logits = model.trunk(idx).extras["concept_logits_BTL"]
    concept = int(logits[0, -1].argmin())  # not among the top-k anywhere near the end
    mixer.steer = {concept: 5.0}
    steered_logits = model.trunk(idx).extras["concept_logits_BTL"]
    assert (steered_logits.topk(4, dim=-1).indices == concept).any(-1).all()
    assert not torch.allclose(model(idx), base)
    mixer.steer = {}
    torch.testing.assert_close(model(idx), base)


def test_bad_inserts_are_clear_errors():
    with pytest.raises(ValueError, match="trunk block"):
        GPT(CFG, V, T, num_future_tokens=2, inserts={1: {"kind": "pause"}})
    with pytest.raises(ValueError, match="unknown insert kind"):
        GPT(CFG, V, T, inserts={0: {"kind": "nope"}})
