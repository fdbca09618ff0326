"""RNG states in checkpoints: torch (CPU and CUDA), numpy-global and python, as checkpoint-safe plain types; and
`seeded`, which holds torch's global RNG while a model is initialised.

Stage builds run as threads of one process (the Prefect task runner runs two at once). torch's RNG is global:
without the lock, a second build's `manual_seed` in the middle of the first one's weight init changes the first
model's init, and which runs race depends on timing (found by the kill -9 fault suite: the same config gave
different weights)."""

import random
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch


def rng_state() -> dict:
    """torch (CPU and CUDA), numpy-global and python RNG states as checkpoint-safe plain types."""
    name, key, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [name, torch.from_numpy(key.astype(np.int64)), pos, has_gauss, gauss],
        "python": random.getstate(),
    }


_GLOBAL_RNG = threading.Lock()


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """torch.manual_seed(seed), with the global RNG held for the block (e.g. a model's construction)."""
    with _GLOBAL_RNG:
        torch.manual_seed(seed)
        yield


def set_rng_state(state: dict) -> None:
    """Restore the states saved by rng_state() (under the same lock as `seeded`)."""
    with _GLOBAL_RNG:
        _set_rng_state(state)


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    name, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
