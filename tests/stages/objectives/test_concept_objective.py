"""The CoCoMix part of the objective: concept loss, composition with selection and heads, distillation, pause."""

import pytest
import torch
import torch.nn.functional as F

from schemas.configs import ConceptsConfig, DistillConfig, PauseConfig, SelectionConfig, TargetVariant
from schemas.manifest import Manifest
from stages.models.gpt import GPT
from stages.objectives.base import Batch, TokenColumns, UpstreamModel
from stages.objectives.concepts import concept_loss
from stages.objectives.distillation import distill_loss
from stages.objectives.factory import build_objective
from tests.helpers import TINY_MODEL

V, T, L, K = 64, 16, 96, 4
CONCEPTS = Manifest(stage="extract_concepts", key="c", path="/nonexistent", code_version="1", config={},
                    upstream={}, summary={"num_latents": L, "k": 8})


def batch(seed: int = 0) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    rows_BT1 = torch.randint(0, V, (4, T + 1), generator=gen)
    per_token = {"ref_loss": torch.rand(4, T, generator=gen), "ref_entropy": torch.rand(4, T, generator=gen),
                 "concept_ids": torch.randint(0, L, (4, T, K), generator=gen, dtype=torch.int32)}
    return Batch(rows_BT1[:, :-1], rows_BT1[:, 1:], torch.arange(4 * T).view(4, T) + 1, per_token)


def test_concept_loss_is_the_mean_cross_entropy_of_the_k_labels():
    z = torch.randn(2, 5, L)
    labels = torch.randint(0, L, (2, 5, K))
    loss, metrics = concept_loss(z, labels)
    expected = sum(F.cross_entropy(z.flatten(0, 1), labels[..., i].flatten()) for i in range(K)) / K
    torch.testing.assert_close(loss, expected)
    hand = torch.zeros(1, 1, L)
    hand[0, 0, 7] = 10.0  # a confident prediction of concept 7: top-1 is among labels {7, 1}
    assert float(concept_loss(hand, torch.tensor([[[7, 1]]]))[1]["concept_top1_in_labels"]) == 1.0


def test_needs_are_declared_as_data():
    plain = build_objective(TINY_MODEL, TargetVariant(name="ntp"))
    assert plain.needs == ()
    mixed = build_objective(TINY_MODEL, TargetVariant(name="x", selection=SelectionConfig(kind="top_k"),
                                                      concepts=ConceptsConfig(), distill=DistillConfig()))
    assert {(type(n), n.role, n.stage) for n in mixed.needs} == {
        (TokenColumns, "scores", "score_reference"), (TokenColumns, "concepts", "extract_concepts"),
        (UpstreamModel, "teacher", "train_teacher")}


def test_cocomix_loss_adds_lambda_times_concept_loss_to_the_token_loss():
    variant = TargetVariant(name="cocomix", concepts=ConceptsConfig(weight=0.3))
    objective = build_objective(TINY_MODEL, variant, {"concepts": CONCEPTS})
    torch.manual_seed(0)
    model = objective.build_model(V, T)
    assert model.insert_specs == {0: {"kind": "concepts", "num_latents": L, "num_active": 8, "mixing": "interleave"}}
    b = batch()
    out = objective.loss(model, b)
    logits_heads, trunk = model.forward_heads(b.inputs_BT)
    ntp = F.cross_entropy(logits_heads[0].flatten(0, 1), b.targets_BT.flatten())
    concept, _ = concept_loss(trunk.extras["concept_logits_BTL"], b.per_token["concept_ids"])
    torch.testing.assert_close(out.loss, ntp + 0.3 * concept)
    assert {"concept_loss", "concept_top1_in_labels", "head1/loss"} <= set(out.metrics)


def test_cocomix_composes_with_selection_and_extra_heads():
    """Selection masks only the next-token loss; the concept loss counts every position; heads add up."""
    selection = SelectionConfig(kind="top_k", keep_ratio=0.5)
    variant = TargetVariant(name="mix", selection=selection, num_future_tokens=2, concepts=ConceptsConfig())
    objective = build_objective(TINY_MODEL.model_copy(update={"num_layers": 4}), variant, {"concepts": CONCEPTS})
    model = objective.build_model(V, T)
    assert model.num_future_tokens == 2 and list(model.insert_specs) == [1]
    out = objective.loss(model, batch())
    out.loss.backward()
    assert out.selected_BT.sum() == 4 * T // 2 and out.metrics["selected_fraction"] == 0.5
    assert {"head1/loss", "head2/loss", "concept_loss"} <= set(out.metrics)
    mixer = model.inserts["1"]
    assert mixer.predictor.weight.grad.abs().sum() > 0 and mixer.compress_LD.grad.abs().sum() > 0


def test_distillation_mixes_ce_and_tempered_kl_with_the_teacher():
    torch.manual_seed(0)
    teacher = GPT(TINY_MODEL, V, T).eval()
    variant = TargetVariant(name="kd", distill=DistillConfig(weight=0.25, temperature=2.0))
    objective = build_objective(TINY_MODEL, variant)
    objective.attach({"teacher": teacher})
    model = objective.build_model(V, T)
    b = batch()
    out = objective.loss(model, b)
    student = model(b.inputs_BT)
    ce = F.cross_entropy(student.flatten(0, 1), b.targets_BT.flatten())
    kd = distill_loss(student, teacher(b.inputs_BT), 2.0)
    torch.testing.assert_close(out.loss, 0.75 * ce + 0.25 * kd)
    assert all(p.grad is None for p in teacher.parameters())
    assert float(distill_loss(student.detach(), student.detach(), 1.0)) == pytest.approx(0.0, abs=1e-6)


def test_pause_variant_interleaves_a_learned_vector_and_adds_no_loss():
    objective = build_objective(TINY_MODEL, TargetVariant(name="pause", pause=PauseConfig()))
    model = objective.build_model(V, T)
    assert model.insert_specs == {0: {"kind": "pause"}} and model.slots_at(1) == 2
    b = batch()
    out = objective.loss(model, b)
    torch.testing.assert_close(out.loss, F.cross_entropy(model(b.inputs_BT).flatten(0, 1), b.targets_BT.flatten()))


def test_concept_variant_without_labels_is_a_clear_error():
    objective = build_objective(TINY_MODEL, TargetVariant(name="cocomix", concepts=ConceptsConfig()))
    with pytest.raises(ValueError, match="extract_concepts"):
        objective.build_model(V, T)
