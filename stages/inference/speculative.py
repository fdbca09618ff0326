"""Greedy self-speculative decoding with the extra heads of a multi-token model (Gloeckle et al. 2024, Sec. 3.2).

Each forward pass runs every head on [the last exact token + k drafted tokens] with the KV cache:
- head 1's argmax at each position verifies the next draft; the longest matching prefix is accepted, plus head
  1's own token at the first mismatch (always exact), so every forward yields 1..k+1 tokens;
- heads 2..k+1 at the last accepted position draft the next k tokens;
- the cache is rolled back past the rejected drafts (KVCache.truncate), so their keys are overwritten later.
With greedy head-1 verification the output is identical to ordinary greedy decoding with head 1.
"""

from dataclasses import dataclass

import torch

from stages.inference.generate import fit_prompt
from stages.models.gpt import GPT, KVCache


@dataclass
class SpeculativeStats:
    """What one speculative generation did."""

    new_tokens: int
    forwards: int
    """Forward passes after the prompt's (each verifies the drafts and proposes new ones)."""
    draft: int

    @property
    def tokens_per_forward(self) -> float:
        """Mean tokens produced per forward pass after the prompt (1.0 = no speed-up)."""
        return self.new_tokens / max(self.forwards, 1)


@torch.inference_mode()
def generate_speculative(model: GPT, prompt_ids: list[int], max_new_tokens: int, *, draft: int | None = None,
                         eos_id: int | None = None) -> tuple[list[int], SpeculativeStats]:
    """Greedy continuation of `prompt_ids` drafting `draft` tokens per forward (default: every extra head)."""
    max_draft = model.num_future_tokens - 1
    draft = max_draft if draft is None else draft
    if not 0 <= draft <= max_draft:
        raise ValueError(f"draft={draft}: this model has {model.num_future_tokens} heads, so 0..{max_draft} "
                         "tokens can be drafted per forward (train a variant with num_future_tokens > 1)")
    if not prompt_ids:
        raise ValueError("prompt_ids is empty: give at least one token (e.g. the end-of-text id)")
    if max_new_tokens <= 0:
        return [], SpeculativeStats(0, 0, draft)
    prompt_ids = fit_prompt(prompt_ids, max_new_tokens, model.max_seq_len)
    param = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        cache = KVCache(model, batch_size=1, device=param.device, dtype=param.dtype)
        max_total = min(max_new_tokens, model.max_seq_len - len(prompt_ids))
        logits, _ = model.forward_heads(torch.tensor([prompt_ids], device=param.device), cache, draft + 1)
        new_ids = [int(logits[0][0, -1].argmax())]
        drafts = [int(head[0, -1].argmax()) for head in logits[1:]]
        forwards = 0
        while len(new_ids) < max_total and new_ids[-1] != eos_id:
            # never feed more tokens than the context has room for (the last token is never fed back)
            room = model.max_seq_len - cache.pos - 1
            drafts = drafts[: max(0, min(len(drafts), room, max_total - len(new_ids) - 1))]
            block = [new_ids[-1], *drafts]
            start = cache.pos
            logits, _ = model.forward_heads(torch.tensor([block], device=param.device), cache, draft + 1)
            forwards += 1
            verified = logits[0][0].argmax(-1).tolist()  # head 1's next token after each block position
            accepted = 0
            while accepted < len(drafts) and verified[accepted] == drafts[accepted]:
                accepted += 1
            produced = drafts[:accepted] + [verified[accepted]]
            if eos_id is not None and eos_id in produced:
                produced = produced[: produced.index(eos_id) + 1]
            new_ids += produced[: max_total - len(new_ids)]
            cache.truncate(start + 1 + accepted)  # keep the exact token and the accepted drafts
            drafts = [int(head[0, accepted].argmax()) for head in logits[1:]]
    finally:
        model.train(was_training)
    return new_ids, SpeculativeStats(len(new_ids), forwards, draft)
