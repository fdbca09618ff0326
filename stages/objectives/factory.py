"""The objective of a variant: the one place stages build objectives (and read their parts) from config."""

from schemas.configs import ModelConfig, TargetVariant
from schemas.manifest import Manifest
from stages.objectives.base import Objective
from stages.objectives.token_prediction import TokenPrediction, variant_parts


def build_objective(model_cfg: ModelConfig, variant: TargetVariant,
                    upstream: dict[str, Manifest] | None = None) -> Objective:
    """The composed objective of a variant (heads, selection, concepts/pause, distillation).

    `upstream` (role -> manifest) gives what the model shape depends on (the concept count); planning calls
    this without it to read `needs`."""
    return TokenPrediction(model_cfg, variant, upstream)


def evaluate_upstream(variant: TargetVariant) -> dict[str, str]:
    """The upstream roles (role -> stage) the evaluate stage reads to report on a variant's parts."""
    return {role: stage for part in variant_parts(variant) for role, stage in part.evaluate_upstream.items()}
