"""TokenPrediction: one head = plain next-token CE (exactly), n heads = sum of shifted CEs, per-head selection."""

import numpy as np
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
    assert torch.equal(out.loss, plain)
    for a, b in zip(ours, _grads(model), strict=True):  # losses.token_loss's backward: equal to float rounding
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    assert out.metrics == {"head1/loss": plain.item()}


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
    from stages.training.loop import train
    from storage.windows import TokenWindows
    from tests.helpers import TINY_MODEL, make_token_artifact, tiny_train_config

    tokens = make_token_artifact(tmp_path / "tokens")
    windows = TokenWindows.from_manifest(tokens, "train")
    variant = TargetVariant(name="slm", selection=SelectionConfig(kind="top_k", keep_ratio=0.5))
    cfg = tiny_train_config()
    lookup = {name: np.zeros(windows.num_tokens, np.float32) for name in ("ref_loss", "ref_entropy")}
    train(TokenPrediction(TINY_MODEL, variant), windows, {}, cfg, tmp_path / "work",
          vocab_size=int(tokens.summary["vocab_size"]), label="slm", lookups=lookup)
    table = pq.read_table(tmp_path / "work" / "token_selection.parquet").to_pydict()
    seen, selected = np.array(table["times_seen"]), np.array(table["times_selected"])
    tokens_per_micro_batch = cfg.micro_batch_size * windows.seq_len
    num_micro_batches = seen.sum() // tokens_per_micro_batch
    assert seen.sum() == cfg.max_tokens // cfg.batch_size_tokens * cfg.batch_size_tokens
    assert selected.sum() == num_micro_batches * round(0.5 * tokens_per_micro_batch)
    assert (selected <= seen).all() and set(table["split"]) == {"train"}
