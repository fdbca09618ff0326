"""Seeded weight init draws from its own generator: other threads using torch's global stream cannot change it."""

import threading

import torch

from schemas.configs import ModelConfig
from stages.models.gpt import GPT
from stages.models.init_rng import seeded_generator
from stages.models.sae import TopKSAE

CFG = ModelConfig(num_layers=3, num_heads=2, d_model=32)
INSERTS = {0: {"kind": "concepts", "num_latents": 64, "num_active": 4, "mixing": "interleave"}}


def _weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in module.state_dict().items()}


def _build(seed: int) -> dict[str, torch.Tensor]:
    model = GPT(CFG, 50, 12, num_future_tokens=2, inserts=INSERTS, generator=seeded_generator(seed))
    sae = TopKSAE(32, 64, 4, generator=seeded_generator(seed))
    return _weights(model) | {f"sae.{name}": tensor for name, tensor in _weights(sae).items()}


def test_seeded_init_ignores_the_global_stream():
    torch.manual_seed(123)
    first = _build(0)
    torch.manual_seed(456)
    torch.randn(1000)
    second = _build(0)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    other = _build(1)
    assert not torch.equal(first["embed.weight"], other["embed.weight"])
    assert not torch.equal(first["inserts.0.compress_LD"], other["inserts.0.compress_LD"])


def test_seeded_init_is_identical_while_other_threads_build_models():
    """The fault suite's finding: a model built (e.g. loaded) in another thread drew from the global stream in the
    middle of a seeded init, so the same config gave different weights."""
    expected = _build(0)
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            GPT(CFG, 50, 12)  # an unseeded build, as load_model does before loading weights
            torch.manual_seed(7)

    threads = [threading.Thread(target=churn) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        builds = [_build(0) for _ in range(20)]
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert all(torch.equal(build[k], expected[k]) for build in builds for k in expected)
