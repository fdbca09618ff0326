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

    @model_validator(mode="after")
    def _check_cross_stage(self) -> "PipelineConfig":
        names = [v.name for v in self.target.variants]
        if self.evaluate.baseline not in names:
            raise ValueError(f"evaluate.baseline: {self.evaluate.baseline!r} is not a target variant (have {names})")
        self._check_checkpoint_roles()
        for variant in self.target.variants:
            for part in (variant.concepts, variant.pause):
                block = part.block if part is not None else None
                if _unresolved(self.target):
                    break  # the checkpoint's depth is known once planned (stages/byom.py checks it then)
                # from a checkpoint of L layers, n heads are its layers plus n - 1 blocks: the trunk is L - 1
                heads = 1 if self.target.init_from else variant.num_future_tokens
                trunk = self.target.model.num_layers - heads
                if block is not None and block > trunk:
                    raise ValueError(f"target.variants[{variant.name}]: block {block} must be a trunk block input "
                                     f"(1..{trunk} with {variant.num_future_tokens} prediction head(s))")
            if variant.concepts is not None and "train" not in self.concepts.splits:
                raise ValueError("concepts.splits must include 'train' for a concepts variant to train on")
        if self.sae.layer is not None and self.teacher.init_from is None and \
                self.sae.layer >= self.teacher.model.num_layers:
            raise ValueError(f"sae.layer ({self.sae.layer}) must be a teacher block 0..."
                             f"{self.teacher.model.num_layers - 1}")
        if self.base is not None and not _unresolved(self.base):
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

    def _check_checkpoint_roles(self) -> None:
        """init_from with a base (a missing or bad checkpoint folder is reported before a run: stages/byom.py)."""
        if self.base is not None:
            for role in (self.reference, self.target):
                if role.init_from is not None:
                    raise ValueError(f"{role.ROLE}.init_from: with a base, the {role.ROLE} starts from the base's "
                                     f"weights; set base.init_from instead (or drop base)")


def _unresolved(role) -> bool:
    """True for a role whose model shape will come from its checkpoint but has not been read yet (the planner
    fills the shape and init_digest together)."""
    return role.init_from is not None and role.init_digest is None
