"""Self-speculative decoding: output identical to greedy head-1 decoding, for many prompts, lengths, draft counts,
end-of-text and the context limit; drafts get accepted when the heads agree."""

import pytest
import torch

from schemas.configs import ModelConfig
from stages.inference.generate import generate
from stages.inference.speculative import generate_speculative
from stages.models.gpt import GPT

V, T = 40, 24


def mtp_model(heads: int, seed: int, copy_heads: bool = False, inserts: dict | None = None) -> GPT:
    torch.manual_seed(seed)
    model = GPT(ModelConfig(num_layers=4, num_heads=2, d_model=32), V, T, num_future_tokens=heads,
                inserts=inserts).eval()
    if copy_heads:  # extra heads = head 1, so repetitive continuations are drafted correctly
        for block in model.head_blocks[1:]:
            block.load_state_dict(model.head_blocks[0].state_dict())
    return model


@pytest.mark.parametrize("heads,copy_heads", [(2, False), (4, False), (4, True), (3, True)])
def test_speculative_equals_greedy(heads, copy_heads):
    model = mtp_model(heads, seed=heads, copy_heads=copy_heads)
    gen = torch.Generator().manual_seed(0)
    accepted_somewhere = False
    for trial in range(12):
        prompt = torch.randint(0, V, (int(torch.randint(1, 9, (1,), generator=gen)),), generator=gen).tolist()
        length = int(torch.randint(1, T, (1,), generator=gen))
        expected = generate(model, prompt, length)
        for draft in range(heads):
            out, stats = generate_speculative(model, prompt, length, draft=draft)
            assert out == expected, (trial, draft)
            assert stats.new_tokens == len(out)
            accepted_somewhere |= stats.tokens_per_forward > 1.0 + 1e-9
    if copy_heads:
        assert accepted_somewhere


def test_end_of_text_and_context_limit():
    model = mtp_model(4, seed=1, copy_heads=True)
    prompt = [5, 6, 7]
    full = generate(model, prompt, T - len(prompt))  # fills the context exactly
    assert len(full) == T - len(prompt)
    assert generate_speculative(model, prompt, T - len(prompt), draft=3)[0] == full
    for eos in set(full):
        expected = generate(model, prompt, T - len(prompt), eos_id=eos)
        assert expected[-1] == eos
        for draft in range(4):
            assert generate_speculative(model, prompt, T - len(prompt), draft=draft, eos_id=eos)[0] == expected


def test_works_with_an_interleaving_insert():
    model = mtp_model(2, seed=3, copy_heads=True, inserts={1: {"kind": "pause"}})
    prompt = [1, 2, 3, 4]
    assert generate_speculative(model, prompt, 12)[0] == generate(model, prompt, 12)


def test_too_many_drafts_is_a_clear_error():
    with pytest.raises(ValueError, match="0..1 tokens can be drafted"):
        generate_speculative(mtp_model(2, seed=0), [1], 5, draft=2)
