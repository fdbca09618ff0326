"""Per-head validation metrics of multi-token models and their self-speculative decoding speed.

- head_metrics: for every head i (1-based), the mean cross-entropy and top-1 accuracy of its prediction of
  token t+i over the given windows (head i's last i-1 positions have no target);
- speculative_rows: greedy decoding with head 1 against self-speculative decoding with 1..n-1 drafts, on the
  same prompts in the same process: new tokens, forwards, tokens per forward, seconds, speed-up.
"""

import time

import numpy as np
import torch

from stages.inference.generate import generate
from stages.inference.speculative import forget, generate_speculative
from stages.models.gpt import GPT
from stages.runtime.devices import autocast
from storage.windows import TokenWindows


@torch.inference_mode()
def head_metrics(model: GPT, windows: TokenWindows, window_ids: np.ndarray, batch_size: int,
                 device: torch.device) -> list[dict]:
    """[{head, tokens, loss, accuracy}] of every head over the windows."""
    heads = model.num_future_tokens
    loss_sum, correct, count = np.zeros(heads), np.zeros(heads), np.zeros(heads, np.int64)
    model.eval()
    for start in range(0, len(window_ids), batch_size):
        inputs_BT, targets_BT = windows.batch(window_ids[start:start + batch_size], device)
        T = targets_BT.shape[1]
        with autocast(device):
            logits, _ = model.forward_heads(inputs_BT)
        for i, logits_BTV in enumerate(logits):
            pred_BTV, target_BT = logits_BTV[:, : T - i].float(), targets_BT[:, i:]
            loss_sum[i] += float(torch.nn.functional.cross_entropy(pred_BTV.flatten(0, 1), target_BT.flatten(),
                                                                   reduction="sum"))
            correct[i] += int((pred_BTV.argmax(-1) == target_BT).sum())
            count[i] += target_BT.numel()
    return [{"head": i + 1, "tokens": int(count[i]), "loss": loss_sum[i] / max(count[i], 1),
             "accuracy": correct[i] / max(count[i], 1)} for i in range(heads)]


def speculative_rows(model: GPT, prompts: list[list[int]], new_tokens: int) -> list[dict]:
    """Plain greedy (draft 0 row), self-speculative decoding with each fixed draft count, and with the adaptive
    draft length (generate_speculative's default, up to every extra head) on the same prompts. Every way runs on
    a prompt back to back before the next prompt, so a slow spell of the machine hits them alike."""
    generate(model, prompts[0], new_tokens)  # warm-up: one-time allocations and kernel selection are not timed
    generate_speculative(model, prompts[0], new_tokens)
    forget(model)  # the warm-up's timings carry one-time costs: the adaptive policy must not learn from them
    most = model.num_future_tokens - 1
    ways = [(0, False)] + [(d, False) for d in range(1, most + 1)] + ([(most, True)] if most else [])
    seconds, forwards, produced = (dict.fromkeys(ways, 0.0), dict.fromkeys(ways, 0), dict.fromkeys(ways, 0))
    for prompt in prompts:
        start = time.perf_counter()
        expected = generate(model, prompt, new_tokens)
        seconds[0, False] += time.perf_counter() - start
        forwards[0, False] += len(expected)
        produced[0, False] += len(expected)
        for draft, adaptive in ways[1:]:
            start = time.perf_counter()
            ids, stats = generate_speculative(model, prompt, new_tokens, draft=None if adaptive else draft)
            seconds[draft, adaptive] += time.perf_counter() - start
            if ids != expected:
                raise AssertionError(f"speculative decoding ({'adaptive' if adaptive else f'draft {draft}'}) "
                                     "diverged from greedy decoding")
            forwards[draft, adaptive] += stats.forwards + 1  # + the prompt pass
            produced[draft, adaptive] += stats.new_tokens
    return [{"draft": draft, "adaptive": adaptive, "new_tokens": produced[draft, adaptive],
             "forwards": forwards[draft, adaptive],
             "tokens_per_forward": produced[draft, adaptive] / max(forwards[draft, adaptive], 1),
             "seconds": seconds[draft, adaptive],
             "speedup": seconds[0, False] / max(seconds[draft, adaptive], 1e-9)} for draft, adaptive in ways]
