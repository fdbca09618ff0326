"""Knowledge distillation from a teacher model (the reference): the baseline CoCoMix is compared with.

KD term (Hinton et al.): T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over positions;
the objective mixes it with next-token CE as (1 - weight) * CE + weight * KD. Teacher logits are computed on
the fly for each micro-batch (one teacher forward, no backward).
"""

import torch
import torch.nn.functional as F


def distill_loss(student_logits_BTV: torch.Tensor, teacher_logits_BTV: torch.Tensor, temperature: float
                 ) -> torch.Tensor:
    """T^2 * mean over positions of KL(teacher_T || student_T), fp32."""
    if student_logits_BTV.shape != teacher_logits_BTV.shape:
        raise ValueError(f"student logits {tuple(student_logits_BTV.shape)} != teacher logits "
                         f"{tuple(teacher_logits_BTV.shape)} (the teacher must share the vocabulary)")
    student_logp = F.log_softmax(student_logits_BTV.float() / temperature, dim=-1).flatten(0, 1)
    teacher_logp = F.log_softmax(teacher_logits_BTV.float() / temperature, dim=-1).flatten(0, 1)
    return F.kl_div(student_logp, teacher_logp, log_target=True, reduction="batchmean") * temperature ** 2
