"""Stage configs and the PipelineConfig that bundles them, one module per stage group.

Every field has a docstring: it is the help text in the Prefect UI form and in `lmpipe config --explain`.
Cross-field checks run at construction, so a bad config fails before any compute, naming the field.
Artifact keys hash a config's data (its JSON dump), never its class or module, so where a class lives is free.

    corpus        TokenizeConfig (tokenize_corpus), TextUnit, PACKAGED_DATASET_BUILDERS
    models        ModelConfig (the transformer shape), Llama3RopeScaling
    objectives    TargetVariant and its parts: SelectionConfig, ConceptsConfig, PauseConfig, DistillConfig;
                  ScoreConfig (score_reference, the scores selection ranks by)
    training      TrainConfig, CheckpointRole (init_from), BaseConfig, TeacherConfig, ReferenceConfig, DynamicsConfig,
                  TargetConfig, TargetRun, replica_name, variant_of
    sae_concepts  SAEConfig (train_sae), ExtractConfig (extract_concepts), LatentDashboardConfig
                  (latent_dashboards)
    evaluation    EvaluateConfig (evaluate)
    pipeline      PipelineConfig
"""

from schemas.configs.corpus import PACKAGED_DATASET_BUILDERS, TextUnit, TokenizeConfig
from schemas.configs.evaluation import EvaluateConfig
from schemas.configs.later_fields import LaterFields
from schemas.configs.models import Llama3RopeScaling, ModelConfig
from schemas.configs.objectives import (
    ConceptsConfig,
    DistillConfig,
    PauseConfig,
    ScoreConfig,
    SelectionConfig,
    TargetVariant,
)
from schemas.configs.pipeline import PipelineConfig
from schemas.configs.sae_concepts import ExtractConfig, LatentDashboardConfig, SAEConfig
from schemas.configs.training import (
    BaseConfig,
    CheckpointRole,
    DynamicsConfig,
    ReferenceConfig,
    TargetConfig,
    TargetRun,
    TeacherConfig,
    TrainConfig,
    replica_name,
    variant_of,
)

__all__ = [
    "PACKAGED_DATASET_BUILDERS", "BaseConfig", "CheckpointRole", "ConceptsConfig", "DistillConfig", "DynamicsConfig",
    "EvaluateConfig", "ExtractConfig", "LatentDashboardConfig", "LaterFields", "Llama3RopeScaling", "ModelConfig",
    "PauseConfig",
    "PipelineConfig", "ReferenceConfig", "SAEConfig", "ScoreConfig", "SelectionConfig", "TargetConfig", "TargetRun",
    "TargetVariant", "TeacherConfig", "TextUnit", "TokenizeConfig", "TrainConfig", "replica_name", "variant_of",
]
