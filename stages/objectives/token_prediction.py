"""The composed token-prediction objective: heads, Rho-1 selection, CoCoMix concepts or pause slots, distillation.

Nothing is written; the train loop (stages/training.py) calls `loss(model, batch)` per micro-batch.
- Heads (Gloeckle et al. 2024, arXiv 2404.19737): head i (0-based) at position t predicts token t+1+i, so its
  targets are targets_BT shifted left by i and its last i positions have no target (they are sliced off).
  The loss is the unweighted SUM over heads of each head's mean loss.
- Selection (Rho-1): each head ranks its own valid targets; the reference scores are shifted exactly like
  the targets, so a head scores token x_{t+1+i} with the reference's loss/entropy for that same token
  (computed by the reference in its next-token context). Each head's loss is normalised by its own number
  of selected tokens (selection.py: top k% over the pooled micro-batch). With `rank_over = "step"` the pool is
  the whole optimiser step: `begin_step` fixes every head's masks over all of the step's micro-batches first
  (after a no-grad forward for excess_loss scores) and each micro-batch's loss is the sum of its selected losses
  times the number of micro-batches over the step's selected count (the loop's 1/accum_steps brings it back).
- With one head and selection kind `all` the loss is F.cross_entropy(logits, targets) (mean; computed by the
  faster losses.token_loss, equal to float rounding).
Logged metrics: `head<i>/loss` (mean CE over ALL valid targets of head i, 1-based, comparable across
variants); when selecting, `selected_fraction`, `loss_selected`, `loss_unselected` of head 1.
- Concepts (CoCoMix): a `concepts` insert before block `concepts.block`; + weight * concept loss
  (objectives/concepts.py) over every position; selection masks only the next-token loss. Pause: the same
  interleaving with a learned vector and no extra loss.
- Distillation: head 1's loss becomes (1 - w) * CE + w * T^2 KL(teacher || student) (objectives/distillation.py).
Later optimisation (not done): the memory-efficient sequential per-head backward of the MTP paper (Sec. 2),
which avoids holding every head's (B, T, V) logits and their gradients at once.
"""

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from schemas.configs import ModelConfig, SelectionConfig, TargetVariant
from schemas.manifest import Manifest
from schemas.tables import TOKEN_SELECTION
from stages.models.gpt import GPT, TrunkOutput
from stages.models.losses import token_loss
from stages.objectives.base import Batch, LossOutput, ObjectiveBase, TokenColumns, UpstreamModel
from stages.objectives.concepts import CONCEPT_IDS, concept_loss
from stages.objectives.distillation import distill_loss
from stages.objectives.selection import SelectionCounter, select_tokens, select_tokens_pooled
from stages.runtime.devices import autocast
from storage.parquet import write_table

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
REF_LOSS, REF_ENTROPY = "ref_loss", "ref_entropy"
_NUM_UNSELECTED = "_num_unselected"


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


def _head_column(batch: Batch, name: str, i: int) -> torch.Tensor | None:
    """Per-token column `name` aligned with head i's targets (shifted left by i); None when the batch has none."""
    column_BT = batch.per_token.get(name)
    return None if column_BT is None else column_BT[:, i:]


def _head_columns(batches: list[Batch], name: str, i: int) -> list[torch.Tensor] | None:
    """_head_column of every micro-batch; None when any lacks the column."""
    columns_BT = [_head_column(batch, name, i) for batch in batches]
    return None if any(column_BT is None for column_BT in columns_BT) else columns_BT


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


def insert_block(block: int | None, num_layers: int, num_heads: int = 1) -> int:
    """The block whose input gets an insert: the configured one, or the middle (num_layers // 2) capped to the
    trunk (an insert sits after a trunk block, before the prediction heads)."""
    trunk = num_layers - num_heads
    if trunk < 1:
        raise ValueError(f"an insert needs a trunk block, but all {num_layers} blocks are prediction heads; "
                         "use fewer num_future_tokens or more model.num_layers")
    return block if block is not None else max(1, min(num_layers // 2, trunk))


class TokenPrediction(ObjectiveBase):
    """Objective of one target variant (or the reference): heads + selection + concepts/pause + distillation."""

    def __init__(self, model_cfg: ModelConfig, variant: TargetVariant, upstream: dict[str, Manifest] | None = None):
        self.model_cfg, self.variant, self.upstream = model_cfg, variant, upstream or {}
        needs: list = []
        if variant.selection.kind != "all":
            needs.append(TokenColumns("scores", "score_reference", (REF_LOSS, REF_ENTROPY)))
        if variant.concepts is not None:
            needs.append(TokenColumns("concepts", "extract_concepts", (CONCEPT_IDS,)))
        if variant.distill is not None:
            needs.append(UpstreamModel("teacher", "train_reference"))
        self.needs = tuple(needs)
        self.counter = SelectionCounter() if variant.selection.kind != "all" else None
        self.step_selection: StepSelection | None = None  # masks begin_step fixed over the current step
        self.teacher: nn.Module | None = None
        self.head_weights = list(variant.head_weights or [1.0] * variant.num_future_tokens)

    def _inserts(self) -> dict[int, dict]:
        """Insert specs of the variant (after block `block - 1`)."""
        v, layers, heads = self.variant, self.model_cfg.num_layers, self.variant.num_future_tokens
        if v.concepts is not None:
            concepts = self.upstream.get("concepts")
            if concepts is None:
                raise ValueError(f"variant {v.name!r} uses concepts but no extract_concepts artifact was given")
            num_latents, sae_k = int(concepts.summary["num_latents"]), int(concepts.summary["k"])
            block = insert_block(v.concepts.block, layers, heads)
            return {block - 1: {"kind": "concepts", "num_latents": num_latents,
                                "num_active": v.concepts.num_active or sae_k, "mixing": v.concepts.mixing}}
        if v.pause is not None:
            return {insert_block(v.pause.block, layers, heads) - 1: {"kind": "pause"}}
        return {}

    def build_model(self, vocab_size: int, seq_len: int, generator: torch.Generator | None = None) -> GPT:
        """A fresh GPT with the variant's prediction heads and inserts, its weights drawn from `generator`."""
        if self.variant.num_future_tokens >= seq_len:
            raise ValueError(f"variant {self.variant.name}: num_future_tokens={self.variant.num_future_tokens} "
                             f"needs seq_len > num_future_tokens (seq_len={seq_len})")
        return GPT(self.model_cfg, vocab_size, seq_len, num_future_tokens=self.variant.num_future_tokens,
                   inserts=self._inserts(), generator=generator)

    def attach(self, models: dict[str, nn.Module]) -> None:
        """Keep the distillation teacher (frozen)."""
        self.teacher = models.get("teacher")
        if self.teacher is not None:
            self.teacher.requires_grad_(False)

    def loss(self, model: GPT, batch: Batch) -> LossOutput:
        """Weighted sum over heads of each head's mean (selected) cross-entropy, plus the concept and distillation
        terms (one graph: the joint backward)."""
        trunk_out = model.trunk(batch.inputs_BT)
        teacher_logits = self._teacher_logits(batch)
        metrics: dict[str, torch.Tensor] = {}
        total, selected_BT = self._concept_term(trunk_out, batch, metrics), None
        for i in range(model.num_future_tokens):
            loss_i, mask_BT = self._head_term(model, trunk_out, batch, i, teacher_logits, selected_BT, metrics)
            total = total + self.head_weights[i] * loss_i
            selected_BT = mask_BT if i == 0 else selected_BT
        return self._output(total, metrics, selected_BT)

    def begin_step(self, model: GPT, batches: list[Batch]) -> None:
        """With selection rank_over="step" and several micro-batches: fix every head's masks over the whole step
        (step() and loss() train on them). Otherwise, and for a micro-batch this did not get, each micro-batch
        ranks its own targets in its forward (a step of one micro-batch is the same either way)."""
        selection = self.variant.selection
        over_step = selection.kind == "top_k" and selection.rank_over == "step" and len(batches) > 1
        self.step_selection = self._select_over_step(model, batches) if over_step else None

    def _select_over_step(self, model: GPT, batches: list[Batch]) -> StepSelection:
        """Each head ranks its targets over all of the step's micro-batches (with head_selection="shifted", heads
        2..n take head 1's step-level masks shifted); excess_loss scores come from a no-grad forward first."""
        selection, num_heads = self.variant.selection, model.num_future_tokens
        ranked = range(1 if self.variant.head_selection == "shifted" else num_heads)
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

    def _fixed_selection(self, batch: Batch, i: int, head1_mask_BT: torch.Tensor | None
                         ) -> tuple[torch.Tensor | None, RankingPool | None]:
        """Head i's mask when fixed before its forward: by begin_step over the step (with the step's counts), or
        head 1's shifted (head_selection="shifted"). (None, None): head_loss ranks the micro-batch itself."""
        masks_BT = self.step_selection.masks_for(batch) if self.step_selection is not None else None
        if masks_BT is not None:
            return masks_BT[i], self.step_selection.pools[i]
        if i > 0 and head1_mask_BT is not None and self.variant.head_selection == "shifted":
            return head1_mask_BT[:, i:], None
        return None, None

    def step(self, model: GPT, batch: Batch, scale: float) -> LossOutput:
        """Forward and backward of one micro-batch. With several heads and mtp_backward='sequential' (the MTP
        paper's Fig. 2): the trunk runs once, each head does forward, loss and backward in turn on the detached
        trunk output (one head's logits alive at a time), then one backward through the trunk."""
        if model.num_future_tokens == 1 or self.variant.mtp_backward == "joint":
            return super().step(model, batch, scale)
        with autocast(batch.inputs_BT.device):
            trunk_out = model.trunk(batch.inputs_BT)
            teacher_logits = self._teacher_logits(batch)
        detached = TrunkOutput(trunk_out.h_BSD.detach().requires_grad_(True), trunk_out.slots)
        metrics: dict[str, torch.Tensor] = {}
        total = torch.zeros((), device=batch.targets_BT.device)
        selected_BT = None
        for i in range(model.num_future_tokens):
            with autocast(batch.inputs_BT.device):
                loss_i, mask_BT = self._head_term(model, detached, batch, i, teacher_logits, selected_BT, metrics)
            (self.head_weights[i] * scale * loss_i).backward()  # frees this head's logits and graph
            total = total + self.head_weights[i] * loss_i.detach()
            selected_BT = mask_BT if i == 0 else selected_BT
        concept = self._concept_term(trunk_out, batch, metrics)
        outputs, grads = [trunk_out.h_BSD], [detached.h_BSD.grad]
        if concept.requires_grad:
            outputs.append(concept * scale)
            grads.append(None)
        torch.autograd.backward(outputs, grads)  # one backward through the trunk (and the concept head)
        return self._output(total + concept.detach(), metrics, selected_BT)

    def _teacher_logits(self, batch: Batch) -> torch.Tensor | None:
        """The distillation teacher's logits on the batch (no graph), when distilling."""
        if self.variant.distill is None:
            return None
        if self.teacher is None:
            raise ValueError(f"variant {self.variant.name!r} distills but no teacher model was attached")
        with torch.no_grad():
            return self.teacher(batch.inputs_BT)

    def _head_term(self, model: GPT, trunk_out: TrunkOutput, batch: Batch, i: int,
                   teacher_logits: torch.Tensor | None, head1_mask_BT: torch.Tensor | None,
                   metrics: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Head i's loss (its targets shifted by i; distillation mixed into head 1) and its selection mask."""
        seq_len = batch.targets_BT.shape[1]
        logits_BTV = model.logits(model.head(trunk_out, i))
        mask_BT, pool = self._fixed_selection(batch, i, head1_mask_BT)
        loss_i, stats = head_loss(logits_BTV[:, : seq_len - i], batch.targets_BT[:, i:], self.variant.selection,
                                  _head_column(batch, REF_LOSS, i), _head_column(batch, REF_ENTROPY, i), mask_BT,
                                  pool)
        if i == 0 and teacher_logits is not None:
            kd = distill_loss(logits_BTV, teacher_logits, self.variant.distill.temperature)
            metrics["distill_kl"] = kd.detach()
            loss_i = (1 - self.variant.distill.weight) * loss_i + self.variant.distill.weight * kd
        metrics[f"head{i + 1}/loss"] = stats["loss"]
        if i == 0 and self.variant.selection.kind != "all":
            metrics.update(_selection_metrics(stats))
        return loss_i, stats.get("mask")

    def _concept_term(self, trunk_out: TrunkOutput, batch: Batch, metrics: dict) -> torch.Tensor:
        """weight * concept loss (0 without concepts)."""
        if self.variant.concepts is None:
            return torch.zeros((), device=batch.targets_BT.device)
        loss_c, concept_metrics = concept_loss(trunk_out.extras["concept_logits_BTL"], batch.per_token[CONCEPT_IDS])
        metrics.update(concept_metrics)
        return self.variant.concepts.weight * loss_c

    @staticmethod
    def _output(total: torch.Tensor, metrics: dict, selected_BT: torch.Tensor | None) -> LossOutput:
        names = list(metrics)
        numbers = torch.stack([metrics[name].float() for name in names]).tolist()  # one device sync
        values = dict(zip(names, numbers, strict=True))
        if values.pop(_NUM_UNSELECTED, 1.0) == 0:  # every valid token selected: no unselected loss to report
            del values["loss_unselected"]
        return LossOutput(loss=total, metrics=values, selected_BT=selected_BT)

    def observe(self, batch: Batch, out: LossOutput) -> None:
        """Count per-token selections (selecting variants)."""
        if self.counter is not None and out.selected_BT is not None:
            self.counter.add(batch.token_index_BT, out.selected_BT)

    def state_dict(self) -> dict:
        """Selection counters."""
        return {"selection": self.counter.state_dict()} if self.counter is not None else {}

    def load_state_dict(self, state: dict) -> None:
        """Restore selection counters."""
        if self.counter is not None:
            self.counter.load_state_dict(state.get("selection", {}))

    def write_tables(self, work_dir: Path, split: str) -> list[str]:
        """token_selection.parquet for selecting variants."""
        if self.counter is None:
            return []
        write_table(Path(work_dir) / "token_selection.parquet", self.counter.table(split), TOKEN_SELECTION)
        return ["token_selection.parquet"]
