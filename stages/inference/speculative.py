"""Greedy self-speculative decoding with the extra heads of a multi-token model (Gloeckle et al. 2024, Sec. 3.2).

Each forward pass runs the trunk and head 1 on [the last exact token + the drafted tokens] with the KV cache:
- head 1's argmax at each position verifies the next draft; the longest matching prefix is accepted, plus head
  1's own token at the first mismatch (always exact), so every forward yields 1..k+1 tokens;
- then heads 2..k'+1 draft the next k' tokens, each run only on the accepted positions (never on rejected ones)
  and unembedded only at the last one; a head that sat out earlier forwards first catches up on the trunk
  outputs it missed (kept in a buffer), so its cache is complete whenever it drafts;
- the cache is rolled back past the rejected drafts (KVCache.truncate), so their keys are overwritten later.
With greedy head-1 verification the output is identical to ordinary greedy decoding with head 1, whatever k.

The draft length is fixed (`draft=k`) or adaptive (the default, DraftPolicy): drafting pays only when the heads
are right often enough to cover the extra heads' cost, which depends on the model, the text and the hardware, so
the policy (stages/inference/draft_policy.py) watches both the acceptance and the wall-clock, as assisted
generation in transformers adapts its number of assistant tokens. Draft 0 is a plain greedy step.
"""

import time
import weakref
from dataclasses import dataclass

import torch

from stages.inference.draft_policy import DraftPolicy
from stages.inference.generate import fit_prompt
from stages.models.gpt import GPT, KVCache, TrunkOutput

_LEARNT: "weakref.WeakKeyDictionary[GPT, dict]" = weakref.WeakKeyDictionary()
"""model -> what its last adaptive generation measured (DraftPolicy.learnt): the next one starts from it, as
transformers' assisted generation keeps its number of assistant tokens across calls."""


@dataclass
class SpeculativeStats:
    """What one speculative generation did."""

    new_tokens: int
    forwards: int
    """Forward passes after the prompt's (each verifies the drafts and proposes new ones)."""
    draft: int
    """Drafts per forward (fixed), or the most drafted per forward (adaptive)."""
    adaptive: bool = False
    drafted: int = 0
    """Drafted tokens verified, over all forwards."""
    accepted: int = 0
    """Drafted tokens accepted."""

    @property
    def tokens_per_forward(self) -> float:
        """Mean tokens produced per forward pass after the prompt (1.0 = no speed-up)."""
        return self.new_tokens / max(self.forwards, 1)


class _Decoder:
    """The model, its cache and the trunk outputs of every cached token, for one generation."""

    def __init__(self, model: GPT):
        param = next(model.parameters())
        self.model, self.device = model, param.device
        self.cache = KVCache(model, batch_size=1, device=param.device, dtype=param.dtype)
        self.slots = model.slots_at(model.num_trunk_layers)
        self.hidden_BSD = torch.empty(1, model.max_seq_len * self.slots, model.cfg.d_model, device=param.device,
                                      dtype=param.dtype)
        self.filled = [0] * model.num_future_tokens
        """Tokens whose keys head i has cached (head 1 always has them all)."""

    def verify(self, block: list[int], last_only: bool = False) -> list[int]:
        """Trunk and head 1 on `block`: head 1's argmax after each position (only the last one: last_only)."""
        model, cache, start, slots = self.model, self.cache, self.cache.pos, self.slots
        trunk_out = model.trunk(torch.tensor([block], device=self.device), cache)
        self.hidden_BSD[:, start * slots:(start + len(block)) * slots] = trunk_out.h_BSD
        h_BTD = model.head(trunk_out, 0, cache)
        cache.pos = start + len(block)
        return model.logits(h_BTD[:, -1:] if last_only else h_BTD)[0].argmax(-1).tolist()

    def propose(self, count: int) -> list[int]:
        """Drafts of heads 2..count+1 after the last cached token (each head catching up on what it missed)."""
        cache, slots, upto, drafts = self.cache, self.slots, self.cache.pos, []
        for i in range(1, count + 1):
            cache.pos = self.filled[i]  # head() reads its rotary start and cache slot from cache.pos
            trunk_out = TrunkOutput(self.hidden_BSD[:, self.filled[i] * slots: upto * slots], slots)
            h_BTD = self.model.head(trunk_out, i, cache)
            drafts.append(int(self.model.logits(h_BTD[:, -1])[0].argmax()))
            self.filled[i] = upto
        cache.pos = upto
        return drafts

    def truncate(self, num_tokens: int) -> None:
        """Forget the cached tokens after the first num_tokens (rejected drafts), for every head."""
        self.cache.truncate(num_tokens)
        self.filled = [min(f, num_tokens) for f in self.filled]


def forget(model: GPT) -> None:
    """Drop what the adaptive policy learnt on `model` (e.g. from a warm-up whose timings carry one-time costs)."""
    _LEARNT.pop(model, None)


@torch.inference_mode()
def generate_speculative(model: GPT, prompt_ids: list[int], max_new_tokens: int, *, draft: int | None = None,
                         eos_id: int | None = None) -> tuple[list[int], SpeculativeStats]:
    """Greedy continuation of `prompt_ids`, drafting `draft` tokens per forward, or (draft=None, the default)
    an adaptive number up to every extra head (DraftPolicy). The output equals generate(..., temperature 0)."""
    max_draft = model.num_future_tokens - 1
    if draft is not None and not 0 <= draft <= max_draft:
        raise ValueError(f"draft={draft}: this model has {model.num_future_tokens} heads, so 0..{max_draft} "
                         "tokens can be drafted per forward (train a variant with num_future_tokens > 1)")
    policy = DraftPolicy(max_draft if draft is None else draft, adaptive=draft is None)
    policy.resume(_LEARNT.get(model))
    stats = SpeculativeStats(0, 0, policy.max_draft, adaptive=policy.adaptive)
    if not prompt_ids:
        raise ValueError("prompt_ids is empty: give at least one token (e.g. the end-of-text id)")
    if max_new_tokens <= 0:
        return [], stats
    prompt_ids = fit_prompt(prompt_ids, max_new_tokens, model.max_seq_len)
    was_training = model.training
    model.eval()
    try:
        dec = _Decoder(model)
        max_total = min(max_new_tokens, model.max_seq_len - len(prompt_ids))
        new_ids = dec.verify(prompt_ids, last_only=True)
        drafts = dec.propose(policy.first()) if max_total > 1 else []
        while len(new_ids) < max_total and new_ids[-1] != eos_id:
            tick = time.perf_counter()
            # never feed more tokens than the context has room for (the last token is never fed back)
            room = model.max_seq_len - dec.cache.pos - 1
            drafts = drafts[: max(0, min(len(drafts), room, max_total - len(new_ids) - 1))]
            start = dec.cache.pos
            verified = dec.verify([new_ids[-1], *drafts])
            accepted = 0
            while accepted < len(drafts) and verified[accepted] == drafts[accepted]:
                accepted += 1
            produced = drafts[:accepted] + [verified[accepted]]
            if eos_id is not None and eos_id in produced:
                produced = produced[: produced.index(eos_id) + 1]
            new_ids += produced[: max_total - len(new_ids)]
            dec.truncate(start + 1 + accepted)  # keep the exact token and the accepted drafts
            stats.forwards, stats.drafted, stats.accepted = (stats.forwards + 1, stats.drafted + len(drafts),
                                                             stats.accepted + accepted)
            count = policy.next_draft(len(drafts), accepted)
            done = len(new_ids) >= max_total or new_ids[-1] == eos_id
            verified_drafts, drafts = len(drafts), ([] if done else dec.propose(count))
            policy.record(verified_drafts, len(drafts), accepted + 1, time.perf_counter() - tick)
    finally:
        model.train(was_training)
    if policy.adaptive:
        _LEARNT[model] = policy.learnt()
    stats.new_tokens = len(new_ids)
    return new_ids, stats
