"""Rho-1 token selection: exact k, pooled over the batch, invalid never selected, zero grads when dropped."""

import pytest
import torch

from schemas.configs import SelectionConfig
from stages.models.losses import token_loss
from stages.objectives.selection import num_to_keep, select_tokens, selection_scores, top_k_mask
from stages.objectives.selection_part import head_loss


def test_top_k_keeps_exactly_k_highest_and_never_invalid():
    torch.manual_seed(0)
    score_BT = torch.randn(4, 10)
    valid_BT = torch.rand(4, 10) > 0.3
    score_BT[~valid_BT] = 100.0  # invalid positions with the best scores must still be dropped
    mask_BT = top_k_mask(score_BT, valid_BT, 0.6)
    k = round(0.6 * int(valid_BT.sum()))
    assert int(mask_BT.sum()) == k
    assert not (mask_BT & ~valid_BT).any()
    kept_min = score_BT[mask_BT].min()
    dropped = score_BT[valid_BT & ~mask_BT]
    assert (dropped <= kept_min).all()


def test_selection_is_pooled_over_the_batch_not_per_row():
    score_BT = torch.tensor([[10.0, 9.0, 8.0, 7.0], [1.0, 2.0, 3.0, 4.0]])
    mask_BT = top_k_mask(score_BT, torch.ones(2, 4, dtype=torch.bool), 0.5)
    assert mask_BT[0].all() and not mask_BT[1].any()  # per-row would keep 2 of each row


def test_num_to_keep_bounds():
    assert num_to_keep(0, 0.6) == 0
    assert num_to_keep(1, 0.01) == 1
    assert num_to_keep(10, 1.0) == 10
    assert num_to_keep(10, 0.64) == 6
    with pytest.raises(ValueError):
        num_to_keep(10, 0.0)


def test_scores_excess_is_detached_fp32_and_reference_scores_prefer_low():
    token_loss_BT = torch.tensor([[2.0, 3.0]], dtype=torch.bfloat16, requires_grad=True)
    ref_BT = torch.tensor([[1.0, 1.0]])
    excess_BT = selection_scores("excess_loss", token_loss_BT, ref_BT, None)
    assert excess_BT.dtype == torch.float32 and not excess_BT.requires_grad
    assert torch.equal(excess_BT, torch.tensor([[1.0, 2.0]]))
    assert torch.equal(selection_scores("reference_loss", None, ref_BT * 2, None), -2 * ref_BT)
    with pytest.raises(ValueError, match="excess_loss needs"):
        selection_scores("excess_loss", token_loss_BT, None, None)


def test_intersection_of_reference_loss_and_entropy():
    ref_loss_BT = torch.tensor([[0.1, 0.2, 0.3, 5.0, 6.0, 7.0]])
    ref_entropy_BT = torch.tensor([[9.0, 0.1, 0.2, 0.3, 8.0, 7.0]])
    valid_BT = torch.ones(1, 6, dtype=torch.bool)
    mask_BT = select_tokens("reference_loss_and_entropy", 0.5, valid_BT, None, ref_loss_BT, ref_entropy_BT)
    # lowest-loss half = {0,1,2}, lowest-entropy half = {1,2,3}: intersection {1,2}
    assert mask_BT.tolist() == [[False, True, True, False, False, False]]


def test_selected_loss_has_exactly_zero_grad_on_unselected_logits():
    torch.manual_seed(0)
    logits_BTV = torch.randn(3, 8, 11, requires_grad=True)
    targets_BT = torch.randint(0, 11, (3, 8))
    targets_BT[0, :3] = -100  # ignored targets
    ref_loss_BT = torch.rand(3, 8)
    selection = SelectionConfig(kind="top_k", score="excess_loss", keep_ratio=0.6)
    loss, stats = head_loss(logits_BTV, targets_BT, selection, ref_loss_BT, None)
    loss.backward()
    valid_BT = targets_BT.ne(-100)
    token_loss_BT = token_loss(logits_BTV.detach(), targets_BT)
    mask_BT = top_k_mask(token_loss_BT - ref_loss_BT, valid_BT, 0.6)
    k = round(0.6 * int(valid_BT.sum()))
    assert int(stats["num_selected"]) == k == int(mask_BT.sum())
    grad_norm_BT = logits_BTV.grad.abs().sum(-1)
    assert torch.equal(grad_norm_BT[~mask_BT], torch.zeros(int((~mask_BT).sum())))
    assert (grad_norm_BT[mask_BT] > 0).all()
    torch.testing.assert_close(loss, token_loss_BT[mask_BT].sum() / k)


def test_keep_ratio_one_equals_next_token_loss_and_grads():
    torch.manual_seed(1)
    logits_BTV = torch.randn(2, 6, 9, requires_grad=True)
    targets_BT = torch.randint(0, 9, (2, 6))
    everything = SelectionConfig(kind="top_k", score="excess_loss", keep_ratio=1.0)
    loss, _ = head_loss(logits_BTV, targets_BT, everything, torch.rand(2, 6), None)
    (grad,) = torch.autograd.grad(loss, logits_BTV)
    plain = torch.nn.functional.cross_entropy(logits_BTV.flatten(0, 1), targets_BT.flatten())
    (plain_grad,) = torch.autograd.grad(plain, logits_BTV)
    torch.testing.assert_close(loss, plain, rtol=0, atol=1e-6)
    torch.testing.assert_close(grad, plain_grad, rtol=0, atol=1e-7)


def test_pooled_selection_keeps_exactly_k_of_the_whole_step_by_score():
    """rank_over="step": one top-k over every micro-batch's valid targets, so the micro-batches keep unequal counts."""
    from stages.objectives.selection import select_tokens_pooled

    torch.manual_seed(0)
    scores_BT = [torch.randn(3, 8) + 1.0, torch.randn(3, 8) - 1.0]  # the first micro-batch scores higher
    valid_BT = [torch.rand(3, 8) > 0.2, torch.ones(3, 8, dtype=torch.bool)]
    ref_loss_BT = [-score_BT for score_BT in scores_BT]  # reference_loss keeps the lowest reference loss
    masks_BT = select_tokens_pooled("reference_loss", 0.4, valid_BT, None, ref_loss_BT, None)
    k = num_to_keep(sum(int(v.sum()) for v in valid_BT), 0.4)
    assert [m.shape for m in masks_BT] == [(3, 8), (3, 8)]
    assert sum(int(m.sum()) for m in masks_BT) == k
    assert int(masks_BT[0].sum()) > int(masks_BT[1].sum())  # not k/2 each: ranked over the step
    assert not any((m & ~v).any() for m, v in zip(masks_BT, valid_BT, strict=True))
    kept = torch.cat([s[m] for s, m in zip(scores_BT, masks_BT, strict=True)])
    dropped = torch.cat([s[v & ~m] for s, m, v in zip(scores_BT, masks_BT, valid_BT, strict=True)])
    pooled_N = torch.cat([s[v] for s, v in zip(scores_BT, valid_BT, strict=True)])
    assert torch.equal(kept.sort().values, pooled_N.topk(k).values.sort().values)
    assert dropped.max() <= kept.min()


def test_pooled_intersection_is_the_intersection_of_two_step_level_masks():
    from stages.objectives.selection import select_tokens_pooled

    torch.manual_seed(1)
    ref_loss_BT, ref_entropy_BT = [torch.rand(2, 6) for _ in range(2)], [torch.rand(2, 6) for _ in range(2)]
    valid_BT = [torch.ones(2, 6, dtype=torch.bool)] * 2
    both_BT = select_tokens_pooled("reference_loss_and_entropy", 0.5, valid_BT, None, ref_loss_BT, ref_entropy_BT)
    by_loss_BT = select_tokens_pooled("reference_loss", 0.5, valid_BT, None, ref_loss_BT, None)
    by_entropy_BT = select_tokens_pooled("reference_entropy", 0.5, valid_BT, None, None, ref_entropy_BT)
    for both, loss, entropy in zip(both_BT, by_loss_BT, by_entropy_BT, strict=True):
        assert torch.equal(both, loss & entropy)
    assert sum(int(m.sum()) for m in by_loss_BT) == 12
