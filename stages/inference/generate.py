"""Autoregressive generation with the GPT's KV cache: greedy (temperature 0) or seeded sampling.

The prompt is prefilled in one forward pass, then tokens are decoded one at a time, each step feeding only
the newest token against the cached keys/values. Generation stops at `eos_id` (which is included in the
output), after `max_new_tokens`, or when prompt + generated tokens fill the model context (`max_seq_len`).

Context rule: when len(prompt) + max_new_tokens exceeds `max_seq_len`, the prompt is truncated from the left
to its last max(1, max_seq_len - max_new_tokens) tokens (a warning is logged), so that the requested number of
new tokens fits whenever possible; if it still does not fit, generation stops when the context is full.
"""

import logging

import torch

from stages.corpus.tokenizers import EOT
from stages.models.gpt import GPT, KVCache

logger = logging.getLogger(__name__)


def fit_prompt(prompt_ids: list[int], max_new_tokens: int, max_seq_len: int) -> list[int]:
    """The prompt truncated from the left so that prompt + max_new_tokens fits in max_seq_len (keeps >= 1 token)."""
    keep = max(1, max_seq_len - max_new_tokens)
    if len(prompt_ids) <= keep:
        return list(prompt_ids)
    logger.warning("prompt of %d tokens + %d new tokens exceeds the context (%d): keeping its last %d tokens",
                   len(prompt_ids), max_new_tokens, max_seq_len, keep)
    return list(prompt_ids[-keep:])


def next_token(logits_V: torch.Tensor, temperature: float, top_k: int | None,
               generator: torch.Generator | None) -> int:
    """Pick the next token from last-position logits: argmax at temperature 0, else sample (optionally top-k)."""
    if temperature == 0.0:
        return int(logits_V.argmax())
    scaled_V = logits_V.float() / temperature
    if top_k is not None and top_k < scaled_V.numel():
        kth_value = torch.topk(scaled_V, top_k).values[-1]
        scaled_V = scaled_V.masked_fill(scaled_V < kth_value, float("-inf"))
    probs_V = torch.softmax(scaled_V, dim=-1)
    return int(torch.multinomial(probs_V, 1, generator=generator))


@torch.inference_mode()
def generate(model: GPT, prompt_ids: list[int], max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int | None = None, seed: int = 0, eos_id: int | None = None) -> list[int]:
    """New token ids after `prompt_ids` (prompt not included), greedy at temperature 0 else seeded sampling."""
    if not prompt_ids:
        raise ValueError("prompt_ids is empty: give at least one token (e.g. the end-of-text id)")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} must be >= 1 or None")
    if max_new_tokens == 0:
        return []
    prompt_ids = fit_prompt(prompt_ids, max_new_tokens, model.max_seq_len)
    param = next(model.parameters())
    generator = None
    if temperature > 0:
        generator = torch.Generator(device=param.device)
        generator.manual_seed(seed)

    was_training = model.training
    model.eval()
    try:
        cache = KVCache(model, batch_size=1, device=param.device, dtype=param.dtype)
        idx_BT = torch.tensor([prompt_ids], dtype=torch.long, device=param.device)
        new_ids: list[int] = []
        # The sequence (prompt + generated) never grows past the context; the last token is never fed back.
        max_total = min(max_new_tokens, model.max_seq_len - len(prompt_ids))
        while True:
            logits_BTV = model(idx_BT, cache)
            token = next_token(logits_BTV[0, -1], temperature, top_k, generator)
            new_ids.append(token)
            if token == eos_id or len(new_ids) >= max_total:
                break
            idx_BT = torch.tensor([[token]], dtype=torch.long, device=param.device)
    finally:
        model.train(was_training)
    return new_ids


def generate_text(model: GPT, tokenizer, prompt: str, max_new_tokens: int = 64, *, temperature: float = 0.0,
                  top_k: int | None = None, seed: int = 0, eos_token: str | None = EOT) -> str:
    """Decoded continuation of `prompt` (a `tokenizers.Tokenizer`); stops at `eos_token` when it is in the vocab."""
    prompt_ids = tokenizer.encode(prompt).ids
    if not prompt_ids:
        raise ValueError("prompt encodes to no tokens")
    eos_id = tokenizer.token_to_id(eos_token) if eos_token is not None else None
    new_ids = generate(model, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k, seed=seed,
                       eos_id=eos_id)
    return tokenizer.decode(new_ids)
