"""Multi-token training through the objective protocol: the sequential per-head backward gives the joint
backward's gradients; head weights and head-1-shifted selection do what they say."""

import pytest
import torch

from schemas.configs import ConceptsConfig, ModelConfig, SelectionConfig, TargetVariant
from schemas.manifest import Manifest
from stages.objectives.base import Batch
from stages.objectives.factory import build_objective

V, T, L = 64, 16, 48
MODEL = ModelConfig(num_layers=4, num_heads=2, d_model=32)
CONCEPTS = Manifest(stage="extract_concepts", key="c", path="/", code_version="1", config={}, upstream={},
                    summary={"num_latents": L, "k": 6})


def batch() -> Batch:
    gen = torch.Generator().manual_seed(0)
    rows = torch.randint(0, V, (4, T + 1), generator=gen)
    per_token = {"ref_loss": torch.rand(4, T, generator=gen), "ref_entropy": torch.rand(4, T, generator=gen),
                 "concept_ids": torch.randint(0, L, (4, T, 3), generator=gen)}
    return Batch(rows[:, :-1], rows[:, 1:], torch.arange(4 * T).view(4, T) + 1, per_token)


def grads_of(variant: TargetVariant, scale: float = 0.5):
    objective = build_objective(MODEL, variant, {"concepts": CONCEPTS})
    torch.manual_seed(0)
    model = objective.build_model(V, T)
    out = objective.step(model, batch(), scale)
    return out, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("extra", [{}, {"selection": SelectionConfig(kind="top_k", keep_ratio=0.5)},
                                   {"concepts": ConceptsConfig()}, {"head_weights": [1.0, 0.5, 0.25]}])
def test_sequential_backward_equals_joint(extra):
    joint_out, joint = grads_of(TargetVariant(name="j", num_future_tokens=3, mtp_backward="joint", **extra))
    seq_out, seq = grads_of(TargetVariant(name="s", num_future_tokens=3, mtp_backward="sequential", **extra))
    assert joint.keys() == seq.keys()
    for name in joint:
        torch.testing.assert_close(seq[name], joint[name], rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(seq_out.loss, joint_out.loss.detach(), rtol=1e-6, atol=1e-6)
    assert seq_out.metrics.keys() == joint_out.metrics.keys()


def test_one_head_equals_plain_next_token_training():
    import torch.nn.functional as F

    out, grads = grads_of(TargetVariant(name="n"), scale=1.0)
    objective = build_objective(MODEL, TargetVariant(name="n"))
    torch.manual_seed(0)
    model = objective.build_model(V, T)
    b = batch()
    F.cross_entropy(model(b.inputs_BT).flatten(0, 1), b.targets_BT.flatten()).backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_head_weights_scale_each_head():
    out, _ = grads_of(TargetVariant(name="w", num_future_tokens=2, head_weights=[1.0, 0.0]))
    torch.testing.assert_close(out.loss, torch.tensor(out.metrics["head1/loss"]), rtol=1e-6, atol=1e-6)


def test_shifted_selection_trains_later_heads_on_head_one_choices():
    selection = SelectionConfig(kind="top_k", keep_ratio=0.5)
    objective = build_objective(MODEL, TargetVariant(name="s", num_future_tokens=2, selection=selection,
                                                     head_selection="shifted"))
    torch.manual_seed(0)
    model = objective.build_model(V, T)
    b = batch()
    trunk = model.trunk(b.inputs_BT)
    _, stats1 = objective.selection.head_loss(model.logits(model.head(trunk, 0)), b, 0, None)
    mask1 = stats1["mask"]
    from stages.objectives.selection_part import head_loss

    logits2 = model.logits(model.head(trunk, 1))[:, : T - 1]
    loss2, _ = objective.selection.head_loss(logits2, b, 1, mask1)
    expected, _ = head_loss(logits2, b.targets_BT[:, 1:], selection, mask_BT=mask1[:, 1:])
    torch.testing.assert_close(loss2, expected)


def test_head_weights_length_is_checked():
    with pytest.raises(ValueError, match="head_weights"):
        TargetVariant(name="x", num_future_tokens=2, head_weights=[1.0])
