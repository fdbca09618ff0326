"""Self-speculative decoding: output identical to greedy head-1 decoding, for many prompts, lengths, draft counts
(fixed and adaptive), end-of-text and the context limit; drafts get accepted when the heads agree; the adaptive
policy shrinks, grows, backs off and caps as documented."""

import pytest
import torch

from schemas.configs import ModelConfig, TargetVariant
from stages.inference.draft_policy import (
    INITIAL_BACKOFF,
    JUDGE_AFTER,
    JUDGE_EARLY,
    RETRY_AFTER,
    DraftPolicy,
)
from stages.inference.generate import generate
from stages.inference.speculative import generate_speculative
from stages.models.gpt import GPT
from stages.objectives.base import Batch
from stages.objectives.factory import build_objective

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


def test_decoding_builds_no_autograd_graph():
    """Greedy and speculative decoding run under inference mode (an autograd graph per token once cost
    speculative decoding a third of its speed on CPU)."""
    model = mtp_model(3, seed=0, copy_heads=True)
    modes = []
    model.lm_head.register_forward_hook(lambda *_: modes.append(torch.is_inference_mode_enabled()))
    generate(model, [1, 2, 3], 6)
    for draft in (None, 0, 2):
        generate_speculative(model, [1, 2, 3], 6, draft=draft)
    assert modes and all(modes)


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


def successor_rows(count: int, length: int, seed: int) -> torch.Tensor:
    """Rows of a deterministic successor walk x -> (3x + 1) mod V from random starts: learnable far ahead."""
    x = torch.randint(0, V, (count, 1), generator=torch.Generator().manual_seed(seed))
    rows = [x]
    for _ in range(length - 1):
        rows.append((3 * rows[-1] + 1) % V)
    return torch.cat(rows, dim=1)


@pytest.fixture(scope="module")
def trained():
    """Tiny 2- and 4-head models trained 30 steps on the successor walk (their extra heads mostly right)."""
    models = {}
    for heads in (2, 4):
        torch.manual_seed(heads)
        objective = build_objective(ModelConfig(num_layers=4, num_heads=2, d_model=32),
                                    TargetVariant(name=f"mtp{heads}", num_future_tokens=heads))
        model = objective.build_model(V, T)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        for step in range(30):
            rows = successor_rows(8, T + 1, seed=step)
            objective.step(model, Batch(rows[:, :-1], rows[:, 1:], torch.zeros(8, T, dtype=torch.long)), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        models[heads] = model.eval()
    return models


@pytest.mark.parametrize("heads", [2, 4])
def test_adaptive_equals_greedy_on_trained_and_random_heads(trained, heads):
    """The default (adaptive) draft length: greedy's output on models whose heads are right and on random ones;
    the trained heads get most drafts accepted."""
    prompts = [successor_rows(1, 3, seed=100 + i)[0].tolist() for i in range(3)]
    accepted = drafted = 0
    for prompt in prompts:
        for length in (1, 5, T - 3):
            expected = generate(trained[heads], prompt, length)
            for draft in (None, *range(heads)):
                out, stats = generate_speculative(trained[heads], prompt, length, draft=draft)
                assert out == expected, (prompt, length, draft)
                if draft is None:
                    assert stats.adaptive and stats.draft == heads - 1
                    accepted, drafted = accepted + stats.accepted, drafted + stats.drafted
    assert drafted > 0 and accepted / drafted > 0.5
    random_model = mtp_model(heads, seed=7)
    for prompt in prompts:
        expected = generate(random_model, prompt, T - 3)
        assert generate_speculative(random_model, prompt, T - 3)[0] == expected


def test_draft_policy_follows_the_acceptance():
    """Calibration greedy steps, then one draft; grow after full acceptance (up to the cap), shrink to what was
    accepted, back off at 0 with a doubling wait, probe with one draft."""
    policy = DraftPolicy(3, adaptive=True)
    assert policy.first() == 0 and policy.cap == 1
    assert [policy.next_draft(0, 0) for _ in range(3)] == [0, 0, 1]
    assert policy.next_draft(1, 1) == 1  # the cap (1) holds the growth
    policy.cap = 3  # as the clock climbs it
    assert policy.next_draft(1, 1) == 2 and policy.next_draft(2, 2) == 3 and policy.next_draft(3, 3) == 3
    assert policy.next_draft(3, 1) == 1
    assert policy.next_draft(1, 0) == 0
    assert [policy.next_draft(0, 0) for _ in range(INITIAL_BACKOFF + 1)] == [0] * INITIAL_BACKOFF + [1]
    assert policy.next_draft(1, 0) == 0  # failed probe: twice the wait
    assert [policy.next_draft(0, 0) for _ in range(2 * INITIAL_BACKOFF + 1)] == [0] * 2 * INITIAL_BACKOFF + [1]
    fixed = DraftPolicy(2, adaptive=False)
    assert fixed.first() == 2 and fixed.next_draft(2, 0) == 2 and fixed.next_draft(0, 0) == 2


def test_the_clock_climbs_while_drafting_is_faster_and_steps_down_when_slower():
    """The cap starts at 1 and climbs after each faster judgement; a slower one lowers it and ends the climb, after
    JUDGE_AFTER drafting forwards, or JUDGE_EARLY when clearly slower; switches to drafting are not timed."""
    policy = DraftPolicy(3, adaptive=True)
    for _ in range(2):
        policy.record(0, 0, 1, 0.01)  # greedy: 100 tokens/s
    policy.record(0, 1, 1, 1.0)  # a switch to drafting (the heads' catch-up): not timed
    for _ in range(JUDGE_AFTER - 1):
        policy.record(1, 1, 2, 0.01)  # 200 tokens/s
    assert policy.cap == 1  # not judged before JUDGE_AFTER drafting forwards
    policy.record(1, 1, 2, 0.01)
    assert policy.cap == 2 and policy.trial
    for _ in range(JUDGE_AFTER):
        policy.record(2, 2, 3, 0.02)  # 150 tokens/s
    assert policy.cap == 3
    for _ in range(JUDGE_AFTER):
        policy.record(3, 3, 3, 0.033)  # 91 tokens/s: slower but not clearly, judged at JUDGE_AFTER
    assert policy.cap == 2 and not policy.climbing and policy.retry_in == 2 * RETRY_AFTER  # a failed climb
    for _ in range(JUDGE_AFTER):
        policy.record(2, 2, 3, 0.02)
    assert policy.cap == 2  # faster, but the climb ended: the cap one higher waits for its retry
    for _ in range(JUDGE_EARLY):
        policy.record(2, 2, 2, 0.05)  # 40 tokens/s: clearly slower, judged early
    assert policy.cap == 1


def test_the_evaluation_times_greedy_every_fixed_draft_and_the_adaptive_default():
    from stages.evaluation.heads import speculative_rows

    prompts = [[1, 2, 3], [7, 7], [5]]
    rows = speculative_rows(mtp_model(3, seed=3, copy_heads=True), prompts, 12)
    assert [(r["draft"], r["adaptive"]) for r in rows] == [(0, False), (1, False), (2, False), (2, True)]
    assert all(r["new_tokens"] == rows[0]["new_tokens"] for r in rows)  # each produced greedy's tokens
    assert rows[0]["forwards"] == rows[0]["new_tokens"] and rows[0]["speedup"] == 1.0
    assert all(1.0 <= r["tokens_per_forward"] <= r["draft"] + 1 for r in rows)
    assert [r["draft"] for r in speculative_rows(mtp_model(1, seed=0), prompts, 4)] == [0]  # one head: greedy only


def slow_drafting(policy: DraftPolicy, draft: int) -> None:
    """Time greedy steps at 100 tokens/s and drafting forwards at 40 tokens/s until the clock judges (early)."""
    for _ in range(2):
        policy.record(0, 0, 1, 0.01)
    for _ in range(JUDGE_EARLY):
        policy.record(draft, draft, 2, 0.05)


def test_a_cap_the_clock_lowered_to_zero_steps_greedily_then_retries_one_draft():
    """At cap 0 no probes; RETRY_AFTER forwards later one draft is tried again, kept if it beats greedy, dropped
    with a doubled wait if not; a resumed policy keeps cap, clock and retry and skips calibration; a fixed policy
    ignores what was learnt."""
    policy = DraftPolicy(1, adaptive=True)
    assert [policy.next_draft(0, 0) for _ in range(3)] == [0, 0, 1]
    slow_drafting(policy, 1)  # cap 1 is not a retry: the first retry comes RETRY_AFTER forwards later
    assert policy.cap == 0 and policy.next_draft(1, 1) == 0 and policy.retry_in == RETRY_AFTER
    resumed = DraftPolicy(1, adaptive=True)
    resumed.resume(policy.learnt())
    assert resumed.cap == 0 and resumed.clock == policy.clock and resumed.next_draft(0, 0) == 0
    for _ in range(RETRY_AFTER - 1):
        assert policy.next_draft(0, 0) == 0
        policy.record(0, 0, 1, 0.01)
    assert policy.cap == 0
    policy.record(0, 0, 1, 0.01)
    assert policy.cap == 1 and policy.trial and policy.next_draft(0, 0) == 1  # the retry probes at once
    slow_drafting(policy, 1)  # still slower: back to 0, the next retry twice as far
    assert policy.cap == 0 and policy.retry_in == 2 * RETRY_AFTER
    fast = DraftPolicy(3, adaptive=True)
    fast.resume({**policy.learnt(), "cap": 2})
    assert fast.first() == 0 and fast.next_draft(0, 0) == 1 and fast.next_draft(1, 1) == 2  # the learnt cap
    for _ in range(JUDGE_AFTER):
        fast.record(2, 2, 3, 0.01)  # 300 tokens/s: faster than greedy; a retry pending, no climb
    assert fast.cap == 2
    fixed = DraftPolicy(2, adaptive=False)
    fixed.resume(policy.learnt())
    assert fixed.cap == 2 and fixed.next_draft(0, 0) == 2
