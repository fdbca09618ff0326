"""The composed token-prediction objective: prediction heads, plus the parts a variant names (part.py).

Nothing is written by the loss; the train loop (stages/training/loop.py) calls `begin_step` once per optimiser
step and `step(model, batch, scale)` per micro-batch.
- Heads (Gloeckle et al. 2024, arXiv 2404.19737): head i (0-based) at position t predicts token t+1+i, so its
  targets are targets_BT shifted left by i and its last i positions have no target (they are sliced off).
  The loss is the SUM over heads of each head's mean loss (weighted by head_weights, 1 each by default).
  With several heads and mtp_backward="sequential" (the MTP paper's memory-efficient backward, Sec. 2 / Fig. 2)
  `step` runs the trunk once, then each head's forward, loss and backward in turn on the detached trunk output
  (one head's (B, T, V) logits alive at a time), then one backward through the trunk; "joint" backpropagates
  the summed loss of `loss` once.
- With one head and no selection the loss is F.cross_entropy(logits, targets) (mean; computed by the faster
  losses.token_loss, equal to float rounding).
- Parts: token selection (selection_part.py: each head's selected loss, ranking over the step), CoCoMix
  concepts (concepts.py: a trunk term), pause slots (pause.py: an insert only), distillation (distillation.py:
  mixed into head 1's loss). The parts' needs and inserts are the objective's.
Logged metrics: `head<i>/loss` (mean CE over ALL valid targets of head i, 1-based, comparable across
variants), and each part's (selection: of head 1; concepts; distill_kl).
"""

from pathlib import Path

import torch
from torch import nn

from schemas.configs import ModelConfig, TargetVariant
from schemas.manifest import Manifest
from stages.models.gpt import GPT, TrunkOutput
from stages.objectives.base import Batch, LossOutput, ObjectiveBase
from stages.objectives.concepts import Concepts
from stages.objectives.distillation import Distillation
from stages.objectives.part import Forward, Part
from stages.objectives.pause import Pause
from stages.objectives.selection_part import NUM_UNSELECTED, TokenSelection, head_loss, selection_metrics
from stages.runtime.devices import autocast


def variant_parts(variant: TargetVariant) -> list[Part]:
    """The parts of a variant's objective, in the order their needs become upstream roles."""
    parts: list[Part] = []
    if variant.selection.kind != "all":
        parts.append(TokenSelection(variant.selection, variant.head_selection))
    if variant.concepts is not None:
        parts.append(Concepts(variant.concepts, variant.name))
    if variant.pause is not None:
        parts.append(Pause(variant.pause))
    if variant.distill is not None:
        parts.append(Distillation(variant.distill, variant.name))
    return parts


class TokenPrediction(ObjectiveBase):
    """Objective of one target variant (or the reference): the prediction heads and the variant's parts."""

    def __init__(self, model_cfg: ModelConfig, variant: TargetVariant, upstream: dict[str, Manifest] | None = None):
        self.model_cfg, self.variant, self.upstream = model_cfg, variant, upstream or {}
        self.parts = variant_parts(variant)
        self.selection = next((part for part in self.parts if isinstance(part, TokenSelection)), None)
        self.needs = tuple(need for part in self.parts for need in part.needs)
        self.head_weights = list(variant.head_weights or [1.0] * variant.num_future_tokens)

    def build_model(self, vocab_size: int, seq_len: int, generator: torch.Generator | None = None) -> GPT:
        """A fresh GPT with the variant's prediction heads and its parts' inserts, weights drawn from `generator`."""
        heads = self.variant.num_future_tokens
        if heads >= seq_len:
            raise ValueError(f"variant {self.variant.name}: num_future_tokens={heads} "
                             f"needs seq_len > num_future_tokens (seq_len={seq_len})")
        inserts: dict[int, dict] = {}
        for part in self.parts:
            for block, spec in part.inserts(self.model_cfg, heads, self.upstream).items():
                if block in inserts:
                    raise ValueError(f"variant {self.variant.name}: two parts insert after block {block}")
                inserts[block] = spec
        return GPT(self.model_cfg, vocab_size, seq_len, num_future_tokens=heads, inserts=inserts, generator=generator)

    def attach(self, models: dict[str, nn.Module]) -> None:
        """Hand the upstream models to the parts."""
        for part in self.parts:
            part.attach(models)

    def loss(self, model: GPT, batch: Batch) -> LossOutput:
        """Weighted sum over heads of each head's loss, plus the parts' trunk terms (one graph: the joint
        backward)."""
        fwd = self._forward(model, batch)
        total, selected_BT = self._trunk_terms(fwd), None
        for i in range(model.num_future_tokens):
            loss_i, mask_BT = self._head_term(model, fwd, fwd.trunk_out, i, selected_BT)
            total = total + self.head_weights[i] * loss_i
            selected_BT = mask_BT if i == 0 else selected_BT
        return self._output(total, fwd.metrics, selected_BT)

    def step(self, model: GPT, batch: Batch, scale: float) -> LossOutput:
        """Forward and backward of one micro-batch: the joint backward of `loss`, or with several heads and
        mtp_backward="sequential" each head's forward, loss and backward in turn on the detached trunk output
        (which frees that head's logits and graph), then one backward through the trunk (and its terms)."""
        if model.num_future_tokens == 1 or self.variant.mtp_backward == "joint":
            return super().step(model, batch, scale)
        with autocast(batch.inputs_BT.device):
            fwd = self._forward(model, batch)
        trunk_out = fwd.trunk_out
        detached = TrunkOutput(trunk_out.h_BSD.detach().requires_grad_(True), trunk_out.slots)
        total = torch.zeros((), device=batch.targets_BT.device)
        selected_BT = None
        for i in range(model.num_future_tokens):
            with autocast(batch.inputs_BT.device):
                loss_i, mask_BT = self._head_term(model, fwd, detached, i, selected_BT)
            (self.head_weights[i] * scale * loss_i).backward()
            total = total + self.head_weights[i] * loss_i.detach()
            selected_BT = mask_BT if i == 0 else selected_BT
        trunk_terms = self._trunk_terms(fwd)
        outputs, grads = [trunk_out.h_BSD], [detached.h_BSD.grad]
        if trunk_terms.requires_grad:
            outputs.append(trunk_terms * scale)
            grads.append(None)
        torch.autograd.backward(outputs, grads)
        return self._output(total + trunk_terms.detach(), fwd.metrics, selected_BT)

    def _forward(self, model: GPT, batch: Batch) -> Forward:
        """The trunk's forward, then what the parts prepare before the heads."""
        fwd = Forward(batch, model.trunk(batch.inputs_BT))
        for part in self.parts:
            part.before_heads(fwd)
        return fwd

    def _trunk_terms(self, fwd: Forward) -> torch.Tensor:
        """The sum of the parts' trunk terms (a 0 without any)."""
        total = None
        for part in self.parts:
            term = part.trunk_term(fwd)
            if term is not None:
                total = term if total is None else total + term
        return torch.zeros((), device=fwd.batch.targets_BT.device) if total is None else total

    def _head_term(self, model: GPT, fwd: Forward, trunk_out: TrunkOutput, i: int,
                   head1_mask_BT: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Head i's loss (its targets shifted by i, the parts' head terms mixed in) and its selection mask."""
        batch = fwd.batch
        seq_len = batch.targets_BT.shape[1]
        logits_BTV = model.logits(model.head(trunk_out, i))
        if self.selection is None:
            loss_i, stats = head_loss(logits_BTV[:, : seq_len - i], batch.targets_BT[:, i:], self.variant.selection)
        else:
            loss_i, stats = self.selection.head_loss(logits_BTV[:, : seq_len - i], batch, i, head1_mask_BT)
        for part in self.parts:
            loss_i = part.head_term(fwd, i, logits_BTV, loss_i)
        fwd.metrics[f"head{i + 1}/loss"] = stats["loss"]
        if i == 0 and self.selection is not None:
            fwd.metrics.update(selection_metrics(stats))
        return loss_i, stats.get("mask")

    @staticmethod
    def _output(total: torch.Tensor, metrics: dict, selected_BT: torch.Tensor | None) -> LossOutput:
        names = list(metrics)
        numbers = torch.stack([metrics[name].float() for name in names]).tolist()  # one device sync
        values = dict(zip(names, numbers, strict=True))
        if values.pop(NUM_UNSELECTED, 1.0) == 0:  # every valid token selected: no unselected loss to report
            del values["loss_unselected"]
        return LossOutput(loss=total, metrics=values, selected_BT=selected_BT)

    def begin_step(self, model: GPT, batches: list[Batch]) -> None:
        """Let the parts prepare what spans the step (selection ranked over all of its micro-batches)."""
        for part in self.parts:
            part.begin_step(model, batches)

    def observe(self, batch: Batch, out: LossOutput) -> None:
        """Let the parts count the micro-batch (per-token selections)."""
        for part in self.parts:
            part.observe(batch, out)

    def state_dict(self) -> dict:
        """The parts' state, by part name (selection counters)."""
        return {part.name: state for part in self.parts if (state := part.state_dict()) is not None}

    def load_state_dict(self, state: dict) -> None:
        """Restore the parts' state."""
        for part in self.parts:
            part.load_state_dict(state.get(part.name, {}))

    def write_tables(self, work_dir: Path, split: str) -> list[str]:
        """The parts' tables (token_selection.parquet for selecting variants)."""
        return [name for part in self.parts for name in part.write_tables(work_dir, split)]
