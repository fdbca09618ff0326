"""The objective of a variant: the one place stages build objectives from config."""

from schemas.configs import ModelConfig, TargetVariant
from schemas.manifest import Manifest
from stages.objectives.base import Objective
from stages.objectives.token_prediction import TokenPrediction


def build_objective(model_cfg: ModelConfig, variant: TargetVariant,
                    upstream: dict[str, Manifest] | None = None) -> Objective:
    """The composed objective of a variant (heads, selection, concepts/pause, distillation).

    `upstream` (role -> manifest) gives what the model shape depends on (the concept count); planning calls
    this without it to read `needs`."""
    return TokenPrediction(model_cfg, variant, upstream)
