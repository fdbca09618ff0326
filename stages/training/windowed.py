"""The one windowed-loss helper: per-token next-token loss (and entropy) of a model over token windows.

Used by training-time evaluation, the evaluate stage (splits and extra files) and reference scoring, so every
number is computed on the same windows in the same way. Head 0 = `model(inputs)`; fp32 results on the CPU.
"""

from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from stages.models.losses import token_loss, token_loss_and_entropy
from stages.training.devices import autocast
from storage.windows import TokenWindows


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
                logits_BTV = model(inputs_BT)
            if entropy:
                loss_BT, entropy_BT = token_loss_and_entropy(logits_BTV, targets_BT)
                yield ids, targets_BT.cpu().numpy(), loss_BT.cpu().numpy(), entropy_BT.cpu().numpy()
            else:
                yield ids, targets_BT.cpu().numpy(), token_loss(logits_BTV, targets_BT).cpu().numpy(), None
    finally:
        model.train(was_training)


def token_losses(model: nn.Module, windows: TokenWindows, window_ids: np.ndarray, batch_size: int,
                 device: torch.device) -> np.ndarray:
    """Next-token loss (nats) of every target of the windows, float32 (N, T)."""
    rows = [loss_BT for _, _, loss_BT, _ in iter_window_losses(model, windows, window_ids, batch_size, device)]
    return np.concatenate(rows) if rows else np.zeros((0, windows.seq_len), dtype=np.float32)
