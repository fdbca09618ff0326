"""TokenPrediction: one head = plain next-token CE (exactly), n heads = sum of shifted CEs, per-head selection."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from schemas.configs import SelectionConfig, TargetVariant
from stages.objectives.base import Batch
from stages.objectives.token_prediction import TokenPrediction
from tests.helpers import TINY_MODEL

V, T = 64, 16


def _batch(seed: int = 0, with_scores: bool = False) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    rows_BT1 = torch.randint(0, V, (4, T + 1), generator=gen)
    scores = {"ref_loss": torch.rand(4, T, generator=gen), "ref_entropy": torch.rand(4, T, generator=gen)}
    return Batch(rows_BT1[:, :-1], rows_BT1[:, 1:], torch.arange(4 * T).view(4, T) + 1, scores if with_scores else {})


def _grads(model) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


def test_one_head_all_tokens_equals_handwritten_cross_entropy():
    objective = TokenPrediction(TINY_MODEL, TargetVariant(name="ntp"))
    torch.manual_seed(0)
    model = objective.build_model(V, T)
    batch = _batch()
    out = objective.loss(model, batch)
    out.loss.backward()
    ours = _grads(model)
    model.zero_grad()
    plain = F.cross_entropy(model(batch.inputs_BT).flatten(0, 1), batch.targets_BT.flatten())
    plain.backward()
    torch.testing.assert_close(out.loss, plain, rtol=1e-6, atol=0)  # same terms, another summation order
    for a, b in zip(ours, _grads(model), strict=True):  # losses.token_loss's backward: equal to float rounding
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    assert out.metrics == {"head1/loss": out.loss.item()}


def test_n_heads_loss_is_the_sum_of_shifted_cross_entropies():
    objective = TokenPrediction(TINY_MODEL, TargetVariant(name="mtp", num_future_tokens=2))
    torch.manual_seed(0)
    model = objective.build_model(V, T)
    batch = _batch()
    out = objective.loss(model, batch)
    logits, _ = model.forward_heads(batch.inputs_BT)
    ce = [F.cross_entropy(logits[i][:, : T - i].flatten(0, 1), batch.targets_BT[:, i:].flatten()) for i in range(2)]
    torch.testing.assert_close(out.loss, ce[0] + ce[1], rtol=0, atol=1e-6)
    assert abs(out.metrics["head2/loss"] - ce[1].item()) < 1e-6


def test_selection_with_heads_ranks_each_head_on_shifted_reference_scores():
    selection = SelectionConfig(kind="top_k", score="reference_loss", keep_ratio=0.25)
    objective = TokenPrediction(TINY_MODEL, TargetVariant(name="slm_mtp", selection=selection, num_future_tokens=2))
    torch.manual_seed(0)
    model = objective.build_model(V, T)
    batch = _batch(with_scores=True)
    out = objective.loss(model, batch)
    logits, _ = model.forward_heads(batch.inputs_BT)
    expected = 0.0
    for i in range(2):
        ref_N = batch.per_token['ref_loss'][:, i:].flatten()
        keep_N = ref_N.topk(round(0.25 * ref_N.numel()), largest=False).indices
        ce_N = F.cross_entropy(logits[i][:, : T - i].flatten(0, 1), batch.targets_BT[:, i:].flatten(), reduction="none")
        expected = expected + ce_N[keep_N].mean()
    torch.testing.assert_close(out.loss, expected, rtol=0, atol=1e-5)
    assert out.metrics["selected_fraction"] == 0.25
    assert {"loss_selected", "loss_unselected", "head1/loss", "head2/loss"} <= set(out.metrics)


def test_keep_ratio_one_reports_no_unselected_loss():
    selection = SelectionConfig(kind="top_k", keep_ratio=1.0)
    objective = TokenPrediction(TINY_MODEL, TargetVariant(name="slm", selection=selection))
    out = objective.loss(objective.build_model(V, T), _batch(with_scores=True))
    assert out.metrics["selected_fraction"] == 1.0 and "loss_unselected" not in out.metrics


def test_selection_counts_are_written_per_training_token(tmp_path):
    """SLM training records, per train token, how often it was seen and selected (exactly k per micro-batch)."""
    import pyarrow.parquet as pq

    from schemas.configs import SelectionConfig, TargetVariant
    from stages.objectives.token_prediction import TokenPrediction
    from stages.training.loop import TrainRun, train
    from storage.windows import TokenWindows
    from tests.helpers import TINY_MODEL, make_token_artifact, tiny_train_config

    tokens = make_token_artifact(tmp_path / "tokens")
    windows = TokenWindows.from_manifest(tokens, "train")
    variant = TargetVariant(name="slm", selection=SelectionConfig(kind="top_k", keep_ratio=0.5))
    cfg = tiny_train_config()
    lookup = {name: np.zeros(windows.num_tokens, np.float32) for name in ("ref_loss", "ref_entropy")}
    train(TrainRun(TokenPrediction(TINY_MODEL, variant), windows, {}, cfg, tmp_path / "work",
                   vocab_size=int(tokens.summary["vocab_size"]), label="slm", lookups=lookup))
    table = pq.read_table(tmp_path / "work" / "token_selection.parquet").to_pydict()
    seen, selected = np.array(table["times_seen"]), np.array(table["times_selected"])
    tokens_per_micro_batch = cfg.micro_batch_size * windows.seq_len
    num_micro_batches = seen.sum() // tokens_per_micro_batch
    assert seen.sum() == cfg.max_tokens // cfg.batch_size_tokens * cfg.batch_size_tokens
    assert selected.sum() == num_micro_batches * round(0.5 * tokens_per_micro_batch)
    assert (selected <= seen).all() and set(table["split"]) == {"train"}


# --- rank_over="step": Rho-1 selection ranked over every micro-batch of the optimiser step ---------------------

def _slm(score: str = "excess_loss", rank_over: str = "step", keep_ratio: float = 0.5, **variant) -> TokenPrediction:
    selection = SelectionConfig(kind="top_k", score=score, keep_ratio=keep_ratio, rank_over=rank_over)
    return TokenPrediction(TINY_MODEL, TargetVariant(name="slm", selection=selection, **variant))


def _accumulate(objective: TokenPrediction, batches: list[Batch], begin: bool = True):
    """What train_step does: begin_step, then step() of every micro-batch with scale 1 / micro-batches."""
    torch.manual_seed(0)
    model = objective.build_model(V, T)
    if begin:
        objective.begin_step(model, batches)
    outs = [objective.step(model, batch, 1.0 / len(batches)) for batch in batches]
    return model, outs, _grads(model)


def _pooled_topk(scores_BT: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """A handwritten global top-k over the micro-batches' scores, split back per micro-batch."""
    flat_N = torch.cat([s.flatten() for s in scores_BT])
    keep_N = torch.zeros_like(flat_N, dtype=torch.bool)
    keep_N[flat_N.topk(k).indices] = True
    return [m.view(s.shape) for m, s in zip(keep_N.split([s.numel() for s in scores_BT]), scores_BT, strict=True)]


def test_step_ranking_gradient_equals_one_pooled_computation_with_a_global_top_k():
    batches = [_batch(0, with_scores=True), _batch(1, with_scores=True)]
    model, outs, grads = _accumulate(_slm("excess_loss"), batches)
    model.zero_grad()
    ce_BT = [F.cross_entropy(model(b.inputs_BT).transpose(1, 2), b.targets_BT, reduction="none") for b in batches]
    k = round(0.5 * 2 * 4 * T)
    keep_BT = _pooled_topk([ce.detach() - b.per_token["ref_loss"] for ce, b in zip(ce_BT, batches, strict=True)], k)
    pooled = sum((ce * keep).sum() for ce, keep in zip(ce_BT, keep_BT, strict=True)) / k
    pooled.backward()
    for ours, expected in zip(grads, _grads(model), strict=True):
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-7)
    assert [torch.equal(out.selected_BT, keep) for out, keep in zip(outs, keep_BT, strict=True)] == [True, True]
    assert sum(int(out.selected_BT.sum()) for out in outs) == k  # exactly k per step, not k/2 per micro-batch
    # what the loop logs (means over the micro-batches) are the step's own numbers
    torch.testing.assert_close(sum(out.loss for out in outs) / 2, pooled.detach())
    mean = {name: sum(out.metrics[name] for out in outs) / 2 for name in outs[0].metrics}
    all_ce = torch.cat([ce.detach().flatten() for ce in ce_BT])
    kept = torch.cat([keep.flatten() for keep in keep_BT])
    assert mean["selected_fraction"] == 0.5
    assert abs(mean["loss_selected"] - all_ce[kept].mean().item()) < 1e-5
    assert abs(mean["loss_unselected"] - all_ce[~kept].mean().item()) < 1e-5
    assert abs(mean["head1/loss"] - all_ce.mean().item()) < 1e-5


def test_rank_over_micro_batch_ignores_the_step_and_matches_the_per_micro_batch_formula():
    batches = [_batch(0, with_scores=True), _batch(1, with_scores=True)]
    model, outs, grads = _accumulate(_slm("excess_loss", rank_over="micro_batch"), batches)
    _, _, unprepared = _accumulate(_slm("excess_loss", rank_over="micro_batch"), batches, begin=False)
    assert all(torch.equal(a, b) for a, b in zip(grads, unprepared, strict=True))  # begin_step is a no-op
    model.zero_grad()
    expected = 0.0
    for out, b in zip(outs, batches, strict=True):
        ce_BT = F.cross_entropy(model(b.inputs_BT).transpose(1, 2), b.targets_BT, reduction="none")
        (keep_BT,) = _pooled_topk([ce_BT.detach() - b.per_token["ref_loss"]], 32)
        assert torch.equal(out.selected_BT, keep_BT) and int(out.selected_BT.sum()) == 32  # k per micro-batch
        expected = expected + 0.5 * (ce_BT * keep_BT).sum() / 32
    expected.backward()
    for ours, want in zip(grads, _grads(model), strict=True):
        torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-7)


def test_step_ranking_of_one_micro_batch_equals_micro_batch_ranking():
    batches = [_batch(0, with_scores=True)]
    _, outs_step, step_grads = _accumulate(_slm("excess_loss", rank_over="step"), batches)
    _, outs_micro, micro_grads = _accumulate(_slm("excess_loss", rank_over="micro_batch"), batches)
    assert all(torch.equal(a, b) for a, b in zip(step_grads, micro_grads, strict=True))
    assert outs_step[0].metrics == outs_micro[0].metrics


def _no_pre_pass(*args):
    pytest.fail("a reference-only score ran the target's forward pre-pass")


def test_reference_scores_rank_over_the_step_without_a_forward_pre_pass(monkeypatch):
    batches = [_batch(0, with_scores=True), _batch(1, with_scores=True)]
    for score, column in [("reference_loss", "ref_loss"), ("reference_entropy", "ref_entropy")]:
        objective = _slm(score, keep_ratio=0.3)
        monkeypatch.setattr(objective.selection, "_target_token_losses", _no_pre_pass)
        _, outs, _ = _accumulate(objective, batches)
        k = round(0.3 * 2 * 4 * T)
        keep_BT = _pooled_topk([-b.per_token[column] for b in batches], k)
        assert all(torch.equal(out.selected_BT, keep) for out, keep in zip(outs, keep_BT, strict=True))
    objective = _slm("reference_loss_and_entropy", keep_ratio=0.3)
    monkeypatch.setattr(objective.selection, "_target_token_losses", _no_pre_pass)
    model, outs, _ = _accumulate(objective, batches)
    by_loss = _pooled_topk([-b.per_token["ref_loss"] for b in batches], k)
    by_entropy = _pooled_topk([-b.per_token["ref_entropy"] for b in batches], k)
    for out, loss_BT, entropy_BT in zip(outs, by_loss, by_entropy, strict=True):
        assert torch.equal(out.selected_BT, loss_BT & entropy_BT)
    selected = sum(int(out.selected_BT.sum()) for out in outs)
    assert 0 < selected < k  # the intersection of two step-level top-k masks, normalised by what it kept:
    assert all(abs(out.metrics["selected_fraction"] - selected / (2 * 4 * T)) < 1e-7 for out in outs)
    with torch.no_grad():
        kept_sum = sum((F.cross_entropy(model(b.inputs_BT).transpose(1, 2), b.targets_BT, reduction="none")
                        * out.selected_BT).sum() for b, out in zip(batches, outs, strict=True))
    torch.testing.assert_close(sum(out.loss.detach() for out in outs) / 2, kept_sum / selected)


@pytest.mark.parametrize("head_selection", ["own", "shifted"])
@pytest.mark.parametrize("mtp_backward", ["sequential", "joint"])
def test_heads_rank_over_the_step(head_selection, mtp_backward):
    """Each head keeps exactly k of the step's targets (own), or follows head 1's step mask (shifted); the
    accumulated gradient is the sum over heads of each head's pooled selected mean."""
    batches = [_batch(0, with_scores=True), _batch(1, with_scores=True)]
    objective = _slm("excess_loss", num_future_tokens=2, head_selection=head_selection, mtp_backward=mtp_backward)
    model, outs, grads = _accumulate(objective, batches)
    masks = objective.selection.step.masks_BT  # [micro-batch][head]
    model.zero_grad()
    logits = [model.forward_heads(b.inputs_BT)[0] for b in batches]
    expected = 0.0
    for i in range(2):
        ce_BT = [F.cross_entropy(lg[i][:, : T - i].transpose(1, 2), b.targets_BT[:, i:], reduction="none")
                 for lg, b in zip(logits, batches, strict=True)]
        if head_selection == "own" or i == 0:
            k = round(0.5 * 2 * 4 * (T - i))
            keep_BT = _pooled_topk([ce.detach() - b.per_token["ref_loss"][:, i:]
                                    for ce, b in zip(ce_BT, batches, strict=True)], k)
        else:
            keep_BT = [m[0][:, i:] for m in masks]
        assert all(torch.equal(m[i], keep) for m, keep in zip(masks, keep_BT, strict=True))
        kept = sum(keep.sum() for keep in keep_BT)
        expected = expected + sum((ce * keep).sum() for ce, keep in zip(ce_BT, keep_BT, strict=True)) / kept
    assert [torch.equal(out.selected_BT, m[0]) for out, m in zip(outs, masks, strict=True)] == [True, True]
    expected.backward()
    for ours, want in zip(grads, _grads(model), strict=True):
        torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-6)


def test_step_ranking_through_the_train_loop_keeps_exactly_k_per_step(tmp_path):
    """The real loop: begin_step gets each step's micro-batches, so the selection counts are k per STEP."""
    import pyarrow.parquet as pq

    from stages.training.loop import TrainRun, train
    from storage.windows import TokenWindows
    from tests.helpers import make_token_artifact, tiny_train_config

    tokens = make_token_artifact(tmp_path / "tokens")
    windows = TokenWindows.from_manifest(tokens, "train")
    cfg = tiny_train_config()
    rng = np.random.default_rng(0)
    lookup = {name: rng.random(windows.num_tokens + 1).astype(np.float32) for name in ("ref_loss", "ref_entropy")}
    objective = _slm("reference_loss", keep_ratio=0.3)
    counts: list[int] = []
    observe = objective.observe
    objective.observe = lambda batch, out: (counts.append(int(out.selected_BT.sum())), observe(batch, out))
    summary = train(TrainRun(objective, windows, {}, cfg, tmp_path / "work", vocab_size=64, label="slm",
                             lookups=lookup))
    step_tokens = cfg.batch_size_tokens
    per_step = [a + b for a, b in zip(counts[::2], counts[1::2], strict=True)]
    assert len(per_step) == summary["steps"] and set(per_step) == {round(0.3 * step_tokens)}
    assert len(set(counts)) > 1  # the micro-batches of a step keep different numbers
    table = pq.read_table(tmp_path / "work" / "token_selection.parquet").to_pydict()
    assert sum(table["times_selected"]) == summary["steps"] * round(0.3 * step_tokens)
    metrics = pq.read_table(tmp_path / "work" / "metrics.parquet").to_pylist()
    fractions = [r["value"] for r in metrics if r["name"] == "train/selected_fraction"]
    assert len(fractions) == summary["steps"] and all(abs(f - round(0.3 * step_tokens) / step_tokens) < 1e-7
                                                      for f in fractions)
