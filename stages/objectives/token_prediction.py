"""The composed token-prediction objective: next-token or multi-token heads, with optional Rho-1 selection.

Nothing is written; the train loop (stages/training.py) calls `loss(model, batch)` per micro-batch.
- Heads (Gloeckle et al. 2024, arXiv 2404.19737): head i (0-based) at position t predicts token t+1+i, so its
  targets are targets_BT shifted left by i and its last i positions have no target (they are sliced off).
  The loss is the unweighted SUM over heads of each head's mean loss.
- Selection (Rho-1): each head ranks its own valid targets; the reference scores are shifted exactly like
  the targets, so a head scores token x_{t+1+i} with the reference's loss/entropy for that same token
  (computed by the reference in its next-token context). Each head's loss is normalised by its own number
  of selected tokens (selection.py: top k% over the pooled micro-batch).
- With one head and selection kind `all` the loss is exactly F.cross_entropy(logits, targets) (mean).
Logged metrics: `head<i>/loss` (mean CE over ALL valid targets of head i, 1-based, comparable across
variants); when selecting, `selected_fraction`, `loss_selected`, `loss_unselected` of head 1.
Later optimisation (not done): the memory-efficient sequential per-head backward of the MTP paper (Sec. 2),
which avoids holding every head's (B, T, V) logits and their gradients at once.
"""

import logging

import torch
import torch.nn.functional as F

from schemas.configs import ModelConfig, SelectionConfig, TargetVariant
from stages.models.gpt import GPT, per_token_loss
from stages.objectives.base import Batch, LossOutput
from stages.objectives.selection import select_tokens

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
_NUM_UNSELECTED = "_num_unselected"


def head_loss(logits_BTV: torch.Tensor, targets_BT: torch.Tensor, selection: SelectionConfig,
              ref_loss_BT: torch.Tensor | None = None, ref_entropy_BT: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss of one head over its (already aligned) targets, and detached statistics for logging."""
    valid_BT = targets_BT.ne(IGNORE_INDEX)
    if selection.kind == "all":
        loss = F.cross_entropy(logits_BTV.float().flatten(0, 1), targets_BT.flatten(), ignore_index=IGNORE_INDEX)
        return loss, {"loss": loss.detach()}
    token_loss_BT = per_token_loss(logits_BTV, targets_BT, IGNORE_INDEX)  # fp32, 0 at ignored targets
    mask_BT = select_tokens(selection.score, selection.keep_ratio, valid_BT, token_loss_BT,
                            ref_loss_BT, ref_entropy_BT)
    num_selected = mask_BT.sum()
    loss = (token_loss_BT * mask_BT).sum() / num_selected.clamp(min=1)
    detached_BT = token_loss_BT.detach()
    num_valid = valid_BT.sum()
    selected_sum = (detached_BT * mask_BT).sum()
    stats = {
        "loss": detached_BT.sum() / num_valid.clamp(min=1),
        "num_valid": num_valid,
        "num_selected": num_selected,
        "selected_sum": selected_sum,
        "unselected_sum": (detached_BT * valid_BT).sum() - selected_sum,
        "mask": mask_BT,
    }
    return loss, stats


def _selection_metrics(stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """selected_fraction, loss_selected, loss_unselected (dropped later when no valid token was unselected)."""
    num_valid, num_selected = stats["num_valid"].float(), stats["num_selected"].float()
    num_unselected = num_valid - num_selected
    return {
        "selected_fraction": num_selected / num_valid.clamp(min=1),
        "loss_selected": stats["selected_sum"] / num_selected.clamp(min=1),
        "loss_unselected": stats["unselected_sum"] / num_unselected.clamp(min=1),
        _NUM_UNSELECTED: num_unselected,
    }


class TokenPrediction:
    """Objective of one target variant (or the reference): num_future_tokens heads + token selection."""

    def __init__(self, model_cfg: ModelConfig, variant: TargetVariant):
        self.model_cfg = model_cfg
        self.variant = variant
        self.needs_reference_scores = variant.needs_reference_scores

    def build_model(self, vocab_size: int, seq_len: int) -> GPT:
        """A fresh GPT with the variant's number of prediction heads."""
        if self.variant.num_future_tokens >= seq_len:
            raise ValueError(f"variant {self.variant.name}: num_future_tokens={self.variant.num_future_tokens} "
                             f"needs seq_len > num_future_tokens (seq_len={seq_len})")
        return GPT(self.model_cfg, vocab_size, seq_len, num_future_tokens=self.variant.num_future_tokens)

    def loss(self, model: GPT, batch: Batch) -> LossOutput:
        """Sum over heads of each head's mean (selected) cross-entropy, with per-head metrics."""
        logits_heads = model.forward_heads(batch.inputs_BT)
        seq_len = batch.targets_BT.shape[1]
        total = torch.zeros((), device=batch.targets_BT.device)
        metrics: dict[str, torch.Tensor] = {}
        selected_BT = None
        for i, logits_BTV in enumerate(logits_heads):
            ref_loss_BT = batch.ref_loss_BT[:, i:] if batch.ref_loss_BT is not None else None
            ref_entropy_BT = batch.ref_entropy_BT[:, i:] if batch.ref_entropy_BT is not None else None
            loss_i, stats = head_loss(logits_BTV[:, : seq_len - i], batch.targets_BT[:, i:],
                                      self.variant.selection, ref_loss_BT, ref_entropy_BT)
            total = loss_i if i == 0 else total + loss_i
            metrics[f"head{i + 1}/loss"] = stats["loss"]
            if i == 0 and self.variant.selection.kind != "all":
                metrics.update(_selection_metrics(stats))
                selected_BT = stats["mask"]
        names = list(metrics)
        numbers = torch.stack([metrics[name].float() for name in names]).tolist()  # one device sync
        values = dict(zip(names, numbers, strict=True))
        if values.pop(_NUM_UNSELECTED, 1.0) == 0:  # every valid token selected: no unselected loss to report
            del values["loss_unselected"]
        return LossOutput(loss=total, metrics=values, selected_BT=selected_BT)
