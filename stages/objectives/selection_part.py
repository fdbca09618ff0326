"""Token selection as a part of the objective (Rho-1): per-head selected loss, ranking over the step, counters.

Each head ranks its own valid targets; the reference scores are shifted exactly like the targets, so a head
scores token x_{t+1+i} with the reference's loss/entropy for that same token (computed by the reference in its
next-token context). Each head's loss is normalised by its own number of selected tokens (selection.py: top k%
over the pooled micro-batch). With head_selection="shifted" heads 2..n train on head 1's mask shifted by i.
With `rank_over = "step"` the pool is the whole optimiser step: `begin_step` fixes every head's masks over all of
the step's micro-batches first (after a no-grad forward of each micro-batch for excess_loss scores) and each
micro-batch's loss is the sum of its selected losses times the number of micro-batches over the step's selected
count (the loop's 1/accum_steps brings it back).
Logged metrics of head 1: `selected_fraction`, `loss_selected`, `loss_unselected`. Written:
token_selection.parquet (per train token, times seen and times selected).
"""

from dataclasses import dataclass
from pathlib import Path

import torch

from schemas.configs import SelectionConfig
from schemas.tables import TOKEN_SELECTION
from stages.models.gpt import GPT
from stages.models.losses import token_loss
from stages.objectives.base import Batch, LossOutput, TokenColumns
from stages.objectives.part import Part
from stages.objectives.selection import SelectionCounter, select_tokens, select_tokens_pooled
from stages.runtime.devices import autocast
from storage.parquet import write_table

IGNORE_INDEX = -100
REF_LOSS, REF_ENTROPY = "ref_loss", "ref_entropy"
NUM_UNSELECTED = "_num_unselected"
"""A metric the objective drops before logging (with loss_unselected when it is 0)."""


@dataclass(frozen=True)
class RankingPool:
    """One head's counts over the pool its mask was ranked in, when that pool is the whole optimiser step
    (SelectionConfig.rank_over="step") instead of the micro-batch."""

    num_valid: torch.Tensor
    """Valid targets of this head over all of the step's micro-batches (int64 scalar)."""
    num_selected: torch.Tensor
    """Selected targets of this head over the step (int64 scalar)."""
    num_micro_batches: int
    """Micro-batches in the step. A micro-batch's sums are multiplied by it: the loop's mean over the
    micro-batches (and its gradient scale 1 / num_micro_batches) then gives the step's sums over its counts."""


@dataclass(frozen=True)
class StepSelection:
    """Every head's selection mask for every micro-batch of one optimiser step, fixed before their forwards."""

    batches: list[Batch]
    """The step's micro-batches, in the order begin_step got them."""
    masks_BT: list[list[torch.Tensor]]
    """[micro-batch][head]: bool mask over that head's targets (targets_BT[:, i:])."""
    pools: list[RankingPool]
    """[head]: the step's counts."""

    def masks_for(self, batch: Batch) -> list[torch.Tensor] | None:
        """The per-head masks of `batch` (the same object begin_step got), or None when it is not in this step."""
        return next((masks for candidate, masks in zip(self.batches, self.masks_BT, strict=True)
                     if candidate is batch), None)


def head_loss(logits_BTV: torch.Tensor, targets_BT: torch.Tensor, selection: SelectionConfig,
              ref_loss_BT: torch.Tensor | None = None, ref_entropy_BT: torch.Tensor | None = None,
              mask_BT: torch.Tensor | None = None,
              pool: RankingPool | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss of one head over its (already aligned) targets, and detached statistics for logging.

    `mask_BT` given: train on exactly those targets instead of ranking this head's own. `pool` given (the mask
    was ranked over the whole optimiser step): the loss and the statistics divide by the step's counts and scale
    the micro-batch's sums by the number of micro-batches, so their mean over the step is the step's value."""
    valid_BT = targets_BT.ne(IGNORE_INDEX)
    if selection.kind == "all":  # mean over valid targets (F.cross_entropy's value; token_loss is faster on CPU)
        loss = token_loss(logits_BTV, targets_BT, IGNORE_INDEX).sum() / valid_BT.sum().clamp(min=1)
        return loss, {"loss": loss.detach()}
    token_loss_BT = token_loss(logits_BTV, targets_BT, IGNORE_INDEX)  # fp32, 0 at ignored targets
    if mask_BT is None:
        mask_BT = select_tokens(selection.score, selection.keep_ratio, valid_BT, token_loss_BT,
                                ref_loss_BT, ref_entropy_BT)
    if pool is None:
        num_valid, num_selected, shares = valid_BT.sum(), mask_BT.sum(), 1
    else:
        num_valid, num_selected, shares = pool.num_valid, pool.num_selected, pool.num_micro_batches
    loss = shares * (token_loss_BT * mask_BT).sum() / num_selected.clamp(min=1)
    detached_BT = token_loss_BT.detach()
    selected_sum = shares * (detached_BT * mask_BT).sum()
    stats = {
        "loss": shares * detached_BT.sum() / num_valid.clamp(min=1),
        "num_valid": num_valid,
        "num_selected": num_selected,
        "selected_sum": selected_sum,
        "unselected_sum": shares * (detached_BT * valid_BT).sum() - selected_sum,
        "mask": mask_BT,
    }
    return loss, stats


def head_column(batch: Batch, name: str, i: int) -> torch.Tensor | None:
    """Per-token column `name` aligned with head i's targets (shifted left by i); None when the batch has none."""
    column_BT = batch.per_token.get(name)
    return None if column_BT is None else column_BT[:, i:]


def _head_columns(batches: list[Batch], name: str, i: int) -> list[torch.Tensor] | None:
    """head_column of every micro-batch; None when any lacks the column."""
    columns_BT = [head_column(batch, name, i) for batch in batches]
    return None if any(column_BT is None for column_BT in columns_BT) else columns_BT


def selection_metrics(stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """selected_fraction, loss_selected, loss_unselected (dropped later when no valid token was unselected)."""
    num_valid, num_selected = stats["num_valid"].float(), stats["num_selected"].float()
    num_unselected = num_valid - num_selected
    return {
        "selected_fraction": num_selected / num_valid.clamp(min=1),
        "loss_selected": stats["selected_sum"] / num_selected.clamp(min=1),
        "loss_unselected": stats["unselected_sum"] / num_unselected.clamp(min=1),
        NUM_UNSELECTED: num_unselected,
    }


class TokenSelection(Part):
    """Rho-1 top-k selection of every head's targets, reading the reference's per-token scores."""

    name = "selection"
    needs = (TokenColumns("scores", "score_reference", (REF_LOSS, REF_ENTROPY)),)
    evaluate_upstream = {"scores": "score_reference"}  # selection by reference-subset side, scoring cost

    def __init__(self, selection: SelectionConfig, head_selection: str):
        self.selection, self.head_selection = selection, head_selection
        self.counter = SelectionCounter()
        self.step: StepSelection | None = None  # masks begin_step fixed over the current step

    def begin_step(self, model: GPT, batches: list[Batch]) -> None:
        """With rank_over="step" and several micro-batches: fix every head's masks over the whole step (head_loss
        trains on them). Otherwise, and for a micro-batch this did not get, each micro-batch ranks its own
        targets in its forward (a step of one micro-batch is the same either way)."""
        over_step = self.selection.rank_over == "step" and len(batches) > 1
        self.step = self._select_over_step(model, batches) if over_step else None

    def _select_over_step(self, model: GPT, batches: list[Batch]) -> StepSelection:
        """Each head ranks its targets over all of the step's micro-batches (with head_selection="shifted", heads
        2..n take head 1's step-level masks shifted); excess_loss scores come from a no-grad forward first."""
        selection, num_heads = self.selection, model.num_future_tokens
        ranked = range(1 if self.head_selection == "shifted" else num_heads)
        token_losses = ([self._target_token_losses(model, batch, ranked) for batch in batches]
                        if selection.score == "excess_loss" else None)  # [micro-batch][head], fp32 (B, T - i)
        valid_BTs = [[batch.targets_BT[:, i:].ne(IGNORE_INDEX) for batch in batches] for i in range(num_heads)]
        masks_BTs: list[list[torch.Tensor]] = []  # [head][micro-batch]
        for i in range(num_heads):
            if i not in ranked:
                masks_BTs.append([mask_BT[:, i:] for mask_BT in masks_BTs[0]])
                continue
            masks_BTs.append(select_tokens_pooled(
                selection.score, selection.keep_ratio, valid_BTs[i],
                None if token_losses is None else [losses_BT[i] for losses_BT in token_losses],
                _head_columns(batches, REF_LOSS, i), _head_columns(batches, REF_ENTROPY, i)))
        pools = [RankingPool(torch.stack([v.sum() for v in valid_BTs[i]]).sum(),
                             torch.stack([m.sum() for m in masks_BTs[i]]).sum(), len(batches))
                 for i in range(num_heads)]
        return StepSelection(list(batches), [list(masks) for masks in zip(*masks_BTs, strict=True)], pools)

    @torch.no_grad()
    def _target_token_losses(self, model: GPT, batch: Batch, heads: range) -> list[torch.Tensor]:
        """The target's fp32 per-target loss of each head in `heads` (no graph; one head's logits at a time)."""
        seq_len = batch.targets_BT.shape[1]
        with autocast(batch.inputs_BT.device):
            trunk_out = model.trunk(batch.inputs_BT)
            return [token_loss(model.logits(model.head(trunk_out, i))[:, : seq_len - i], batch.targets_BT[:, i:],
                               IGNORE_INDEX) for i in heads]

    def head_loss(self, logits_BTV: torch.Tensor, batch: Batch, i: int, head1_mask_BT: torch.Tensor | None
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """head_loss of head i (logits over its targets) with its mask fixed by begin_step over the step, or
        head 1's shifted (head_selection="shifted"), or else ranked over this micro-batch."""
        mask_BT, pool = self._fixed_mask(batch, i, head1_mask_BT)
        return head_loss(logits_BTV, batch.targets_BT[:, i:], self.selection, head_column(batch, REF_LOSS, i),
                         head_column(batch, REF_ENTROPY, i), mask_BT, pool)

    def _fixed_mask(self, batch: Batch, i: int, head1_mask_BT: torch.Tensor | None
                    ) -> tuple[torch.Tensor | None, RankingPool | None]:
        """Head i's mask when fixed before its forward (with the step's counts when ranked over the step);
        (None, None): head_loss ranks the micro-batch itself."""
        masks_BT = self.step.masks_for(batch) if self.step is not None else None
        if masks_BT is not None:
            return masks_BT[i], self.step.pools[i]
        if i > 0 and head1_mask_BT is not None and self.head_selection == "shifted":
            return head1_mask_BT[:, i:], None
        return None, None

    def observe(self, batch: Batch, out: LossOutput) -> None:
        """Count per-token selections."""
        if out.selected_BT is not None:
            self.counter.add(batch.token_index_BT, out.selected_BT)

    def state_dict(self) -> dict:
        """Selection counters."""
        return self.counter.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Restore selection counters."""
        self.counter.load_state_dict(state)

    def write_tables(self, work_dir: Path, split: str) -> list[str]:
        """token_selection.parquet."""
        write_table(Path(work_dir) / "token_selection.parquet", self.counter.table(split), TOKEN_SELECTION)
        return ["token_selection.parquet"]

