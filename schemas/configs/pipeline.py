"""The PipelineConfig that bundles one config per stage, and the checks that span stages."""

from pydantic import model_validator

from schemas.base import StrictModel
from schemas.configs.corpus import TokenizeConfig
from schemas.configs.evaluation import EvaluateConfig
from schemas.configs.objectives import ScoreConfig, TargetVariant
from schemas.configs.sae_concepts import ExtractConfig, LatentDashboardConfig, SAEConfig
from schemas.configs.training import BaseConfig, ReferenceConfig, TargetConfig, TeacherConfig

REFERENCE_NAME = "reference"
"""The reference model's name in the evaluation (stages/evaluation/report.py: REFERENCE): no variant may take it."""


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
        if REFERENCE_NAME in names:
            raise ValueError(f"target.variants: {REFERENCE_NAME!r} names the reference model in the report and the "
                             "comparison tables; give the variant another name")
        self._check_checkpoint_roles()
        if not _unresolved(self.target):  # a checkpoint's depth is known once planned (stages/byom.py checks it)
            for variant in self.target.variants:
                self._check_variant_fits(variant)
        if self.sae.layer is not None and not _unresolved(self.teacher) and \
                self.sae.layer >= self.teacher.model.num_layers:
            raise ValueError(f"sae.layer ({self.sae.layer}) must be a teacher block 0..."
                             f"{self.teacher.model.num_layers - 1}")
        if any(variant.concepts is not None for variant in self.target.variants) and not _unresolved(self.teacher):
            self._check_concepts()
        self._check_base()
        self._check_batches()
        return self

    def _check_variant_fits(self, variant: TargetVariant) -> None:
        """A variant's heads and inserts fit target.model and tokenize.seq_len (each head is one block)."""
        where, heads, num_layers = f"target.variants[{variant.name}]", variant.num_future_tokens, \
            self.target.model.num_layers
        if heads > num_layers:
            raise ValueError(f"{where}.num_future_tokens ({heads}) must be at most target.model.num_layers "
                             f"({num_layers}): each prediction head is one of the model's blocks; lower "
                             "num_future_tokens or raise target.model.num_layers")
        if heads >= self.tokenize.seq_len:
            raise ValueError(f"{where}.num_future_tokens ({heads}) needs tokenize.seq_len > num_future_tokens "
                             f"(seq_len={self.tokenize.seq_len})")
        # from a checkpoint of L layers, n heads are its layers plus n - 1 blocks: the trunk is L - 1
        trunk = num_layers - (1 if self.target.init_from else heads)
        for part_name, part in (("concepts", variant.concepts), ("pause", variant.pause)):
            if part is None:
                continue
            if trunk < 1:
                raise ValueError(f"{where}.{part_name}: an insert needs a trunk block, but all {num_layers} blocks "
                                 "of target.model are prediction heads; lower num_future_tokens or raise "
                                 "target.model.num_layers")
            if part.block is not None and part.block > trunk:
                raise ValueError(f"target.variants[{variant.name}]: block {part.block} must be a trunk block input "
                                 f"(1..{trunk} with {heads} prediction head(s))")
        if variant.concepts is not None and "train" not in self.concepts.splits:
            raise ValueError("concepts.splits must include 'train' for a concepts variant to train on")

    def _check_concepts(self) -> None:
        """The SAE's k fits its latents, and the concept labels and heads fit the SAE (a concepts variant)."""
        d_model = self.teacher.model.d_model  # the SAE reads the teacher's residual
        num_latents, k = self.sae.shape(d_model)
        if k > num_latents:
            raise ValueError(f"sae.k ({k}) must be at most the SAE's latents, sae.expansion * teacher.model.d_model "
                             f"= {num_latents}; lower sae.k or raise sae.expansion")
        k_is = "sae.k" if self.sae.k is not None else f"the default sae.k for teacher.model.d_model={d_model}"
        if self.concepts.top > k:
            raise ValueError(f"concepts.top ({self.concepts.top}) must be at most the SAE's active latents per token, "
                             f"k = {k} ({k_is}): labels are chosen among them; lower concepts.top or set sae.k")
        for variant in self.target.variants:
            active = variant.concepts.num_active if variant.concepts is not None else None
            if active is not None and active > num_latents:
                raise ValueError(f"target.variants[{variant.name}].concepts.num_active ({active}) must be at most "
                                 f"the SAE's latents, sae.expansion * teacher.model.d_model = {num_latents}")

    def _check_base(self) -> None:
        """With a base, reference and target start from its weights: the same model shape."""
        if self.base is None or _unresolved(self.base):
            return
        for model_path, model in (("reference.model", self.reference.model), ("target.model", self.target.model)):
            differ = sorted(name for name, value in model if value != getattr(self.base.model, name))
            if differ:
                raise ValueError(f"{model_path} differs from base.model in {differ}: with a base, both start "
                                 f"from its weights; set {model_path} to base.model or drop base")

    def _check_batches(self) -> None:
        """Every training run's step is whole micro-batches, shared evenly by its processes."""
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
