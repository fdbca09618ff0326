"""Pure parts of the train loop (stages/training.py): device, schedule, optimizer, data order, evaluation.

Nothing here writes files. Shapes: B windows, T seq_len, V vocab.
"""

import logging
import math
import random

import numpy as np
import torch
from torch import nn

from schemas.configs import TrainConfig
from stages.devices import autocast, resolve_device  # noqa: F401 - re-exported for the train loop
from stages.models.gpt import per_token_loss
from stages.objectives.base import Batch
from storage.windows import TokenWindows

log = logging.getLogger(__name__)


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """LR of the update after `step` completed steps: linear warmup to cfg.lr, cosine to lr*min_lr_ratio.

    Warmup steps 0..W-1 use lr*(step+1)/W; steps W..S-1 decay so that step W has the peak and the last
    step S-1 the minimum.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    min_lr = cfg.lr * cfg.min_lr_ratio
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - 1 - cfg.warmup_steps))
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: weight decay on every parameter with ndim >= 2 (matrices, embedding/unembedding
    included), none on vectors (norm gains, biases). Tied weights appear once."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with the two weight-decay groups; fused kernels on CUDA, torch's default (foreach) elsewhere."""
    extra = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             **extra)


class WindowOrder:
    """Endless deterministic window order: epoch e is rng(seed + e).permutation(num_windows), wrapping."""

    def __init__(self, num_windows: int, seed: int, epoch: int = 0, position: int = 0):
        if num_windows < 1:
            raise ValueError("the training split has no complete window; add data or lower tokenize.seq_len")
        self.num_windows, self.seed, self.epoch, self.position = num_windows, seed, epoch, position
        self._perm = self._permutation(epoch)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng(self.seed + epoch).permutation(self.num_windows)

    def take(self, count: int) -> np.ndarray:
        """The next `count` window ids (continuing into the next epoch when this one runs out)."""
        out = []
        while count > 0:
            chunk = self._perm[self.position: self.position + count]
            out.append(chunk)
            count -= len(chunk)
            self.position += len(chunk)
            if self.position == self.num_windows:
                self.epoch, self.position = self.epoch + 1, 0
                self._perm = self._permutation(self.epoch)
        return np.concatenate(out)

    def state(self) -> dict:
        """Epoch and position: all a checkpoint needs to continue the order exactly."""
        return {"epoch": self.epoch, "position": self.position}


def make_batch(windows: TokenWindows, window_ids: np.ndarray, device: torch.device, score_lookup=None) -> Batch:
    """A Batch of the given windows; `score_lookup(token_index_BT) -> (ref_loss, ref_entropy)` adds scores."""
    inputs_BT, targets_BT = windows.batch(window_ids, device)
    token_index_BT = windows.target_index(window_ids)
    ref_loss_BT = ref_entropy_BT = None
    if score_lookup is not None:
        ref_loss, ref_entropy = score_lookup(token_index_BT)
        ref_loss_BT = torch.as_tensor(np.asarray(ref_loss, dtype=np.float32), device=device)
        ref_entropy_BT = torch.as_tensor(np.asarray(ref_entropy, dtype=np.float32), device=device)
    return Batch(inputs_BT, targets_BT, torch.from_numpy(token_index_BT).to(device), ref_loss_BT, ref_entropy_BT)


@torch.inference_mode()
def token_losses(model: nn.Module, windows: TokenWindows, window_ids: np.ndarray, batch_size: int,
                 device: torch.device) -> np.ndarray:
    """Next-token loss (nats, head 0 = `model(inputs)`) of every target of the windows, float32 (N, T)."""
    was_training = model.training
    model.eval()
    rows = []
    for start in range(0, len(window_ids), batch_size):
        inputs_BT, targets_BT = windows.batch(window_ids[start: start + batch_size], device)
        with autocast(device):
            logits_BTV = model(inputs_BT)
        rows.append(per_token_loss(logits_BTV, targets_BT).float().cpu().numpy())
    model.train(was_training)
    return np.concatenate(rows) if rows else np.zeros((0, windows.seq_len), dtype=np.float32)


def rng_state() -> dict:
    """torch (CPU and CUDA), numpy-global and python RNG states as checkpoint-safe plain types."""
    name, key, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [name, torch.from_numpy(key.astype(np.int64)), pos, has_gauss, gauss],
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    """Restore the states saved by rng_state()."""
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    name, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def format_duration(seconds: float) -> str:
    """Compact duration: 45s, 1m20s, 2h03m."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
