"""Data order and batches: an endless deterministic window order, and micro-batches with per-token inputs."""

import numpy as np
import torch

from stages.objectives.base import Batch
from storage.windows import TokenWindows


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


def make_batch(windows: TokenWindows, window_ids: np.ndarray, device: torch.device,
               lookups: dict[str, np.ndarray] | None = None) -> Batch:
    """A Batch of the given windows; each lookup (array indexed by token_index) becomes batch.per_token[name]."""
    inputs_BT, targets_BT = windows.batch(window_ids, device)
    token_index_BT = windows.target_index(window_ids)
    per_token = {name: torch.as_tensor(values[token_index_BT], device=device)
                 for name, values in (lookups or {}).items()}
    return Batch(inputs_BT, targets_BT, torch.from_numpy(token_index_BT).to(device), per_token)
