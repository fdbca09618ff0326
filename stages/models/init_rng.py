"""torch's global RNG while modules are built: stage builds run as threads of one process (the Prefect task
runner runs two at once), and building a module draws from the global stream (its weight init).

Without a lock, a second build's `manual_seed`, or a module built only to load saved weights into it, lands in the
middle of the first build's weight init and changes that model; which builds collide depends on timing (found by
the kill -9 fault suite: the same config gave different weights). So a seeded init holds the lock (`seeded`), and
a module whose weights are loaded afterwards is built under the lock without touching the stream
(`rng_untouched`)."""

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

GLOBAL_RNG = threading.Lock()
"""Held while the global torch RNG is seeded, drawn from for an init, or restored from a checkpoint."""


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """torch.manual_seed(seed), with the global RNG held for the block (e.g. a model's construction)."""
    with GLOBAL_RNG:
        torch.manual_seed(seed)
        yield


@contextmanager
def rng_untouched() -> Iterator[None]:
    """Hold the global RNG and give back its state afterwards (building a module whose init is overwritten)."""
    with GLOBAL_RNG, torch.random.fork_rng(devices=[]):
        yield
