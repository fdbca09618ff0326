"""RNG states in checkpoints: torch (CPU and CUDA), numpy-global and python, as checkpoint-safe plain types.

Nothing that shapes a result draws from these global streams today (weight init has its own generator,
stages/models/init_rng.py; data order is WindowOrder's own); they are saved so that a future stochastic
feature resumes exactly in a single-stage process."""

import random

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


def set_rng_state(state: dict) -> None:
    """Restore the states saved by rng_state()."""
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    name, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
