"""Seeded weight init that does not use torch's global RNG.

Stage builds run as threads of one process (the Prefect task runner runs two at once). Drawing an init from the
global stream made it depend on timing: another thread building a model (a reference loaded for scoring, a
teacher, a second target) drew from the same stream in the middle of it, and the same config gave different
weights (found by the kill -9 fault suite). Every seeded init therefore draws from its own generator; what other
threads draw from the global stream cannot change it."""

import torch


def seeded_generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with `seed` (modules are built on the CPU, then moved to the device)."""
    return torch.Generator(device="cpu").manual_seed(seed)
