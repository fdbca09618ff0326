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


SPREAD_SEED = 0
"""Seed of the window sample: fixed, so every model of every run is measured on the same windows."""


def spread_window_ids(num_windows: int, count: int | None) -> np.ndarray:
    """`count` sorted window ids spread over the whole split: the split cut into `count` equal strata and one
    seeded-random window from each (so every part of the split, every document region, is sampled and no
    periodic structure is aliased). All windows when count is None or >= num_windows."""
    if count is None or count >= num_windows:
        return np.arange(num_windows, dtype=np.int64)
    edges_S = np.linspace(0, num_windows, count + 1)
    offsets_S = np.random.default_rng(SPREAD_SEED).random(count)
    ids_S = np.floor(edges_S[:-1] + offsets_S * (edges_S[1:] - edges_S[:-1])).astype(np.int64)
    return np.clip(ids_S, 0, num_windows - 1)


class TokenWindows:
    """Read-only windows of seq_len (+1) tokens over one split's token stream."""

    def __init__(self, path: Path, seq_len: int, split: str | None = None):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"token stream {path} is missing; rebuild it with: "
                                    "lmpipe run --only tokenize_corpus --force tokenize_corpus")
        self._init(np.load(path, mmap_mode="r"), seq_len, split or path.stem.removeprefix("stream-"), path)

    def _init(self, stream: np.ndarray, seq_len: int, split: str, path: Path | None) -> None:
        self.path, self.seq_len, self.split, self.stream = path, seq_len, split, stream
        self.num_windows = max(0, (len(self.stream) - 1) // seq_len)

    def __reduce__(self):
        """Pickled (e.g. for a training worker process) as its file when it has one, not as a copy of the stream."""
        if self.path is None:
            return (TokenWindows.from_array, (np.asarray(self.stream), self.seq_len, self.split))
        return (TokenWindows, (self.path, self.seq_len, self.split))

    @classmethod
    def from_array(cls, stream: np.ndarray, seq_len: int, split: str) -> "TokenWindows":
        """Windows over an in-memory stream (e.g. an extra evaluation file)."""
        windows = cls.__new__(cls)
        windows._init(np.asarray(stream), seq_len, split, None)
        return windows

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
