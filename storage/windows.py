"""Fixed token windows over a split's packed token stream, read from a memory-mapped .npy file.

Window w covers stream tokens [w*T, w*T + T]: inputs are tokens [w*T, w*T+T), targets [w*T+1, w*T+T].
Targets of window w are therefore token_index w*T+1 ... w*T+T, each token a target exactly once.
Nothing is loaded into Python lists: a batch is one fancy-index into the memmap.
"""

from pathlib import Path

import numpy as np
import torch

from schemas.manifest import Manifest


def stream_file(split: str) -> str:
    """File name of a split's token stream inside the tokenize_corpus artifact."""
    return f"stream-{split}.npy"


class TokenWindows:
    """Read-only windows of seq_len (+1) tokens over one split's token stream."""

    def __init__(self, path: Path, seq_len: int, split: str | None = None):
        self.path = Path(path)
        self.seq_len = seq_len
        self.split = split or self.path.stem.removeprefix("stream-")
        if not self.path.is_file():
            raise FileNotFoundError(f"token stream {self.path} is missing; rebuild it with: "
                                    "lmpipe run --only tokenize_corpus --force tokenize_corpus")
        self.stream = np.load(self.path, mmap_mode="r")
        self.num_windows = max(0, (len(self.stream) - 1) // seq_len)

    @classmethod
    def from_manifest(cls, tokens: Manifest, split: str) -> "TokenWindows":
        """Windows of one split of a tokenize_corpus artifact."""
        return cls(Path(tokens.path) / stream_file(split), int(tokens.config["seq_len"]), split)

    def __len__(self) -> int:
        return self.num_windows

    @property
    def num_tokens(self) -> int:
        """Tokens in the stream."""
        return len(self.stream)

    def target_index(self, window_ids: np.ndarray) -> np.ndarray:
        """token_index of every target of the given windows, shape (B, T)."""
        return np.asarray(window_ids, dtype=np.int64)[:, None] * self.seq_len + 1 + np.arange(self.seq_len)

    def batch(self, window_ids, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets of the given windows, each int64 of shape (B, T)."""
        starts = np.asarray(window_ids, dtype=np.int64)[:, None] * self.seq_len
        rows_BT1 = np.asarray(self.stream[starts + np.arange(self.seq_len + 1)], dtype=np.int64)
        rows = torch.from_numpy(rows_BT1).to(device)
        return rows[:, :-1], rows[:, 1:]
