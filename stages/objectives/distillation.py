"""Knowledge distillation from a teacher model (train_teacher): the baseline CoCoMix is compared with.

KD term (Hinton et al.): T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over positions;
head 1's loss becomes (1 - weight) * CE + weight * KD. Teacher logits are computed on the fly for each
micro-batch (one teacher forward, no backward); evaluate counts that forward in the training FLOPs of every
target that read the `teacher` role.
"""

import torch
import torch.nn.functional as F
from torch import nn

from schemas.configs import DistillConfig
from stages.objectives.base import UpstreamModel
from stages.objectives.part import Forward, Part

TEACHER = "teacher"
"""Upstream role of the teacher model (a train_teacher artifact)."""


def distill_loss(student_logits_BTV: torch.Tensor, teacher_logits_BTV: torch.Tensor, temperature: float
                 ) -> torch.Tensor:
    """T^2 * mean over positions of KL(teacher_T || student_T), fp32."""
    if student_logits_BTV.shape != teacher_logits_BTV.shape:
        raise ValueError(f"student logits {tuple(student_logits_BTV.shape)} != teacher logits "
                         f"{tuple(teacher_logits_BTV.shape)} (the teacher must share the vocabulary)")
    student_logp = F.log_softmax(student_logits_BTV.float() / temperature, dim=-1).flatten(0, 1)
    teacher_logp = F.log_softmax(teacher_logits_BTV.float() / temperature, dim=-1).flatten(0, 1)
    return F.kl_div(student_logp, teacher_logp, log_target=True, reduction="batchmean") * temperature ** 2


class Distillation(Part):
    """KD from the teacher mixed into head 1's loss."""

    name = "distill"
    needs = (UpstreamModel(TEACHER, "train_teacher"),)

    def __init__(self, cfg: DistillConfig, variant: str):
        self.cfg, self.variant = cfg, variant
        self.teacher: nn.Module | None = None

    def attach(self, models: dict[str, nn.Module]) -> None:
        """Keep the teacher (frozen)."""
        self.teacher = models.get(TEACHER)
        if self.teacher is not None:
            self.teacher.requires_grad_(False)

    def before_heads(self, fwd: Forward) -> None:
        """The teacher's logits on the micro-batch (no graph)."""
        if self.teacher is None:
            raise ValueError(f"variant {self.variant!r} distills but no teacher model was attached")
        with torch.no_grad():
            fwd.extras[TEACHER] = self.teacher(fwd.batch.inputs_BT)

    def head_term(self, fwd: Forward, i: int, logits_BTV: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        """Head 1: (1 - weight) * loss + weight * KD; the other heads unchanged."""
        if i != 0:
            return loss
        kd = distill_loss(logits_BTV, fwd.extras[TEACHER], self.cfg.temperature)
        fwd.metrics["distill_kl"] = kd.detach()
        return (1 - self.cfg.weight) * loss + self.cfg.weight * kd
