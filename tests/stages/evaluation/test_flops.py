"""The compute ledger's FLOPs formula against a hand count and against torch's own FLOP counter."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from schemas.configs import ModelConfig
from stages.evaluation.flops import forward_flops_per_token, training_flops_per_token, upstream_flops
from stages.models.gpt import GPT

CFG = ModelConfig(num_layers=2, num_heads=2, d_model=16)
VOCAB, SEQ = 100, 32


def test_forward_flops_by_hand():
    """2 blocks of d=16 (SwiGLU hidden 8 * ceil(8/3 * 16 / 8) = 48): per block 2 * (4 d^2 + 3 d * 48) matmul
    FLOPs plus attention 4 * T * d, then the unembedding 2 * d * V."""
    spec = GPT(CFG, VOCAB, SEQ).build_spec()
    per_block = 2 * (4 * 16 * 16 + 3 * 16 * 48) + 4 * SEQ * 16
    assert forward_flops_per_token(spec) == 2 * per_block + 2 * 16 * VOCAB
    assert training_flops_per_token(spec) == 3 * forward_flops_per_token(spec)
    assert training_flops_per_token(spec, teacher_spec=spec) == 4 * forward_flops_per_token(spec)


def test_formula_matches_torch_flop_counter():
    """torch counts every linear layer's matmul of a forward, and of forward + backward: the formula's 1x and 3x.
    (Its counter does not see the CPU attention kernel, so the attention term 4 * T * d per block is added.)"""
    torch.manual_seed(0)
    model = GPT(CFG, VOCAB, SEQ)
    inputs = torch.randint(0, VOCAB, (2, SEQ))
    with FlopCounterMode(display=False) as forward_counter, torch.no_grad():
        model(inputs)
    per_token = forward_flops_per_token(model.build_spec())
    attention = CFG.num_layers * 4 * SEQ * CFG.d_model
    assert forward_counter.get_total_flops() / inputs.numel() + attention == pytest.approx(per_token, rel=1e-6)
    with FlopCounterMode(display=False) as train_counter:
        model(inputs).float().logsumexp(-1).sum().backward()
    assert train_counter.get_total_flops() / inputs.numel() + 3 * attention == pytest.approx(3 * per_token, rel=1e-6)


def test_upstream_flops_counts_only_what_a_target_reads():
    spec = GPT(CFG, VOCAB, SEQ).build_spec()
    forward = forward_flops_per_token(spec)
    reference = {"spec": spec, "tokens_seen": 1000}
    assert upstream_flops(set(), reference) == 0.0 and upstream_flops({"tokens"}, reference) == 0.0
    assert upstream_flops({"teacher"}, reference) == 3 * forward * 1000
    assert upstream_flops({"scores"}, reference, scored_tokens=500) == 3 * forward * 1000 + forward * 500
    sae = {"rows": 200, "num_latents": 64, "k": 4}
    encoder, decoder = 2 * 16 * 64, 2 * 4 * 16
    assert upstream_flops({"concepts"}, reference, sae=sae, labelled_tokens=300) == pytest.approx(
        3 * forward * 1000 + 200 * (forward + 3 * (encoder + decoder)) + 300 * (3 * forward + encoder))
