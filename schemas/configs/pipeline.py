"""The PipelineConfig that bundles one config per stage, and the checks that span stages."""

from pydantic import model_validator

from schemas.base import StrictModel
from schemas.configs.corpus import TokenizeConfig
from schemas.configs.evaluation import EvaluateConfig
from schemas.configs.objectives import ScoreConfig
from schemas.configs.sae_concepts import ExtractConfig, LatentDashboardConfig, SAEConfig
from schemas.configs.training import BaseConfig, ReferenceConfig, TargetConfig, TeacherConfig


class PipelineConfig(StrictModel):
    """The whole pipeline: one config per stage."""

    tokenize: TokenizeConfig = TokenizeConfig()
    """Stage tokenize_corpus."""
    base: BaseConfig | None = None
    """Stage train_base: continual pretraining, where the reference and every target start from one base model
    pretrained on `train` (Rho-1 Sec. 3.1). None (the default): both start from random weights."""
    reference: ReferenceConfig = ReferenceConfig()
    """Stage train_reference."""
    teacher: TeacherConfig = TeacherConfig()
    """Stage train_teacher (built only when a variant uses concepts or distillation): the general model the SAE,
    the concept labels and the distillation teacher come from."""
    score: ScoreConfig = ScoreConfig()
    """Stage score_reference."""
    sae: SAEConfig = SAEConfig()
    """Stage train_sae (built only when a target variant uses concepts)."""
    concepts: ExtractConfig = ExtractConfig()
    """Stage extract_concepts (built only when a target variant uses concepts)."""
    dashboards: LatentDashboardConfig = LatentDashboardConfig()
    """Stage latent_dashboards: per-latent views for `lmpipe inspect` (built only when concepts are)."""
    target: TargetConfig = TargetConfig()
    """Stage train_target."""
    evaluate: EvaluateConfig = EvaluateConfig()
    """Stage evaluate."""
    seed_upstream: bool = False
    """With target.seeds > 1: seed run r > 0 of every variant reads its own reference, teacher, scores, SAE and
    labels (nodes `<node>.seed<r>`, trained with seed + r; stages/seeded_upstream.py), so the spread over seeds
    includes the upstream models' luck. False: every seed run reads the same upstream artifacts."""

    @model_validator(mode="after")
    def _check_cross_stage(self) -> "PipelineConfig":
        names = [v.name for v in self.target.variants]
        if self.evaluate.baseline not in names:
            raise ValueError(f"evaluate.baseline: {self.evaluate.baseline!r} is not a target variant (have {names})")
        for variant in self.target.variants:
            for part in (variant.concepts, variant.pause):
                block = part.block if part is not None else None
                trunk = self.target.model.num_layers - variant.num_future_tokens
                if block is not None and block > trunk:
                    raise ValueError(f"target.variants[{variant.name}]: block {block} must be a trunk block input "
                                     f"(1..{trunk} with {variant.num_future_tokens} prediction head(s))")
            if variant.concepts is not None and "train" not in self.concepts.splits:
                raise ValueError("concepts.splits must include 'train' for a concepts variant to train on")
        if self.sae.layer is not None and self.sae.layer >= self.teacher.model.num_layers:
            raise ValueError(f"sae.layer ({self.sae.layer}) must be a teacher block 0..."
                             f"{self.teacher.model.num_layers - 1}")
        if self.base is not None:
            for model_path, model in (("reference.model", self.reference.model), ("target.model", self.target.model)):
                differ = sorted(name for name, value in model if value != getattr(self.base.model, name))
                if differ:
                    raise ValueError(f"{model_path} differs from base.model in {differ}: with a base, both start "
                                     f"from its weights; set {model_path} to base.model or drop base")
        runs = [("reference.train", self.reference.train), ("target.train", self.target.train)]
        for train_path, train in runs + ([("base.train", self.base.train)] if self.base is not None else []):
            window_tokens = train.micro_batch_size * self.tokenize.seq_len
            if train.batch_size_tokens % window_tokens:
                raise ValueError(
                    f"{train_path}.batch_size_tokens ({train.batch_size_tokens}) must be a multiple of "
                    f"micro_batch_size * tokenize.seq_len = {window_tokens}"
                )
            if train.batch_size_tokens % (window_tokens * train.world_size):
                raise ValueError(
                    f"{train_path}: a step's {train.batch_size_tokens // window_tokens} micro-batch(es) cannot be "
                    f"shared evenly by {train.world_size} processes; make batch_size_tokens a multiple of "
                    f"{train.world_size} * micro_batch_size * tokenize.seq_len = {train.world_size * window_tokens} "
                    "or lower micro_batch_size"
                )
        return self
