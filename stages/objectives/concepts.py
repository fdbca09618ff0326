"""CoCoMix concept prediction loss (arXiv 2502.08524, Sec. 3.2): the part of the objective that reads labels.

Labels: extract_concepts' top-K attribution concept ids of every token (per-token column `concept_ids`, shape
(B, T, K)). Row t belongs to target token_index t+1, i.e. to the hidden state at input position t: the
student's concept logits at position t are matched to the reference's labels at the same position.
loss = mean over positions and the K labels of CE(z_t, label) = mean(logsumexp(z_t) - z_t[label]) (one
logsumexp per position, not K separate cross-entropies).
"""

import torch

CONCEPT_IDS = "concept_ids"


def concept_loss(concept_logits_BTL: torch.Tensor, concept_ids_BTK: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Mean cross-entropy of the K labels per position (fp32) and its top-1 accuracy against the labels."""
    if concept_logits_BTL.shape[:2] != concept_ids_BTK.shape[:2]:
        raise ValueError(f"concept logits {tuple(concept_logits_BTL.shape)} and labels "
                         f"{tuple(concept_ids_BTK.shape)} disagree on (B, T)")
    z_BTL = concept_logits_BTL.float()
    labels_BTK = concept_ids_BTK.long()
    lse_BT1 = z_BTL.logsumexp(-1, keepdim=True)
    loss = (lse_BT1 - z_BTL.gather(-1, labels_BTK)).mean()
    with torch.no_grad():
        top1_BT = z_BTL.argmax(-1)
        hit = (labels_BTK == top1_BT.unsqueeze(-1)).any(-1).float().mean()
    return loss, {"concept_loss": loss.detach(), "concept_top1_in_labels": hit}
