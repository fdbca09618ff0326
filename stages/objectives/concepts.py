"""CoCoMix concepts (arXiv 2502.08524, Sec. 3.2): the part of the objective that predicts and mixes concepts.

Labels: extract_concepts' top-K attribution concept ids of every token (per-token column `concept_ids`, shape
(B, T, K)). Row t belongs to target token_index t+1, i.e. to the hidden state at input position t: the
student's concept logits at position t are matched to the reference's labels at the same position.
loss = mean over positions and the K labels of CE(z_t, label) = mean(logsumexp(z_t) - z_t[label]) (one
logsumexp per position, not K separate cross-entropies). The objective adds weight * loss over every position
(token selection masks only the next-token loss). The model gets a `concepts` insert before block
`concepts.block` (the concept head and the mixing of the compressed concept back into the stream).
"""

import torch

from schemas.configs import ConceptsConfig, ModelConfig
from schemas.manifest import Manifest
from stages.objectives.base import TokenColumns
from stages.objectives.part import Forward, Part, insert_block

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


class Concepts(Part):
    """Concept prediction loss + mixing; reads the labels, and the concept count from the labels' artifact."""

    name = "concepts"
    needs = (TokenColumns("concepts", "extract_concepts", (CONCEPT_IDS,)),)
    evaluate_upstream = {"sae": "train_sae",  # its final quality goes into the report
                         "concepts": "extract_concepts"}  # labelling cost

    def __init__(self, cfg: ConceptsConfig, variant: str):
        self.cfg, self.variant = cfg, variant
        if cfg.attribution is not None:  # labels of another rule: the node extract_concepts.<rule>
            self.needs = (TokenColumns("concepts", f"extract_concepts.{cfg.attribution}", (CONCEPT_IDS,)),)

    def inserts(self, model_cfg: ModelConfig, num_heads: int, upstream: dict[str, Manifest]) -> dict[int, dict]:
        """A `concepts` insert sized by the extract_concepts artifact (latents, the SAE's k)."""
        concepts = upstream.get("concepts")
        if concepts is None:
            raise ValueError(f"variant {self.variant!r} uses concepts but no extract_concepts artifact was given")
        num_latents, sae_k = int(concepts.summary["num_latents"]), int(concepts.summary["k"])
        block = insert_block(self.cfg.block, model_cfg.num_layers, num_heads)
        return {block - 1: {"kind": "concepts", "num_latents": num_latents,
                            "num_active": self.cfg.num_active or sae_k, "mixing": self.cfg.mixing}}

    def trunk_term(self, fwd: Forward) -> torch.Tensor:
        """weight * concept loss of the insert's concept logits against the labels."""
        loss_c, metrics = concept_loss(fwd.trunk_out.extras["concept_logits_BTL"], fwd.batch.per_token[CONCEPT_IDS])
        fwd.metrics.update(metrics)
        return self.cfg.weight * loss_c
