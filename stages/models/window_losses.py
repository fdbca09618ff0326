"""The one windowed-loss helper: per-token next-token loss (and entropy) of a model over token windows.

Used by training-time evaluation, the evaluate stage (splits and extra files) and reference scoring, so every
number is computed on the same windows in the same way. Head 0 = `model(inputs)`; fp32 results on the CPU.
A model with `features` (stages.models.gpt.GPT) is scored by losses.hidden_loss_and_entropy on its final hidden
states and lm_head weight: the same numbers without the (B, T, V) logits tensor (1.17x the bare forward's
tokens/s on CPU where forward + token_loss_and_entropy reaches 0.88x; benchmarks/scoring_throughput.py).
"""

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from stages.models.losses import hidden_loss_and_entropy, token_loss, token_loss_and_entropy
from stages.runtime.devices import autocast
from storage.windows import TokenWindows

MAX_LOG_PERPLEXITY = 700.0
"""Losses above this give exp(700) ~ 1e304 as perplexity: a diverged model's number, not an OverflowError."""


@torch.inference_mode()
def iter_window_losses(model: nn.Module, windows: TokenWindows, window_ids: np.ndarray, batch_size: int,
                       device: torch.device, *, entropy: bool = False
                       ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]]:
    """Per batch of windows: (window_ids_B, targets_BT, loss_BT, entropy_BT or None), numpy on the CPU."""
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(window_ids), batch_size):
            ids = np.asarray(window_ids[start: start + batch_size])
            inputs_BT, targets_BT = windows.batch(ids, device)
            with autocast(device):
                if hasattr(model, "features"):
                    loss_BT, entropy_BT = hidden_loss_and_entropy(model.features(inputs_BT), model.lm_head.weight,
                                                                  targets_BT)
                elif entropy:
                    loss_BT, entropy_BT = token_loss_and_entropy(model(inputs_BT), targets_BT)
                else:
                    loss_BT, entropy_BT = token_loss(model(inputs_BT), targets_BT), None
            yield (ids, targets_BT.cpu().numpy(), loss_BT.cpu().numpy(),
                   entropy_BT.cpu().numpy() if entropy else None)
    finally:
        model.train(was_training)


def token_losses(model: nn.Module, windows: TokenWindows, window_ids: np.ndarray, batch_size: int,
                 device: torch.device) -> np.ndarray:
    """Next-token loss (nats) of every target of the windows, float32 (N, T)."""
    rows = [loss_BT for _, _, loss_BT, _ in iter_window_losses(model, windows, window_ids, batch_size, device)]
    return np.concatenate(rows) if rows else np.zeros((0, windows.seq_len), dtype=np.float32)


def perplexity(loss: float) -> float:
    """Perplexity of a mean next-token loss in nats: exp(loss), capped at exp(MAX_LOG_PERPLEXITY)."""
    return math.exp(min(loss, MAX_LOG_PERPLEXITY))
