"""Named PipelineConfig presets: `tiny` (tests), `default` (the README main job), `compare` (default x 3 seeds),
`full` (every variant, twice the tokens), `continual` (default from a shared base model), `gpt2_small` (GPU)."""

from collections.abc import Callable

from schemas.configs import (
    BaseConfig,
    ConceptsConfig,
    DistillConfig,
    EvaluateConfig,
    ExtractConfig,
    ModelConfig,
    PauseConfig,
    PipelineConfig,
    ReferenceConfig,
    SAEConfig,
    ScoreConfig,
    SelectionConfig,
    TargetConfig,
    TargetVariant,
    TokenizeConfig,
    TrainConfig,
)

RHO1_VARIANTS = [
    TargetVariant(name="ntp"),
    TargetVariant(name="slm", selection=SelectionConfig(kind="top_k", score="excess_loss", keep_ratio=0.6)),
]
"""The Rho-1 comparison: plain next-token training against selective LM (top 60% by excess loss)."""

COCOMIX_VARIANTS = [
    TargetVariant(name="cocomix", concepts=ConceptsConfig()),
    TargetVariant(name="kd", distill=DistillConfig()),
    TargetVariant(name="pause", pause=PauseConfig()),
]
"""The CoCoMix comparison (arXiv 2502.08524): concept prediction + interleaved mixing (lambda 0.1, the middle
block), against knowledge distillation from the same reference and the pause-vector compute control."""

MTP_VARIANTS = [
    TargetVariant(name="mtp2", num_future_tokens=2),
    TargetVariant(name="mtp4", num_future_tokens=4),
]
"""Multi-token prediction (arXiv 2404.19737), compute-matched: n one-block heads taken from the model's layers."""

ALL_VARIANTS = RHO1_VARIANTS + COCOMIX_VARIANTS + MTP_VARIANTS
"""Every objective of the three papers with its controls (the `full` preset)."""

DEFAULT_VARIANTS = RHO1_VARIANTS + COCOMIX_VARIANTS[:2] + MTP_VARIANTS[:1]
"""The main job's comparison: ntp, slm, cocomix, kd, mtp2 (the pause and mtp4 controls, which did not learn or
lost clearly at this size, run in `full`)."""


def tiny() -> PipelineConfig:
    """Seconds-scale pipeline for tests: the addresses since 2014, a 4-layer d=32 model, a few thousand tokens."""
    model = ModelConfig(num_layers=4, num_heads=2, d_model=32)
    train = TrainConfig(max_tokens=6144, batch_size_tokens=512, micro_batch_size=8, lr=1e-2, warmup_steps=2,
                        eval_every_steps=4, eval_max_windows=16, log_every_steps=4, checkpoint_every_steps=4)
    return PipelineConfig(
        tokenize=TokenizeConfig(documents_where="year >= 2014", reference_where="year >= 2019", vocab_size=512,
                                seq_len=64, val_fraction=0.25),
        reference=ReferenceConfig(model=model, train=train),
        score=ScoreConfig(batch_size=32, num_shards=2),
        sae=SAEConfig(max_tokens=16_384, batch_rows=1024, eval_every_steps=8, eval_windows=8, dead_tokens=4096),
        concepts=ExtractConfig(num_shards=2),
        target=TargetConfig(model=model, train=train, variants=ALL_VARIANTS),
        evaluate=EvaluateConfig(max_windows=32, speculative_prompts=4, speculative_new_tokens=24),
    )


def default() -> PipelineConfig:
    """The README main job on 2 CPU cores: ~1.3M-parameter models; the reference trains 600k tokens (about 2
    epochs of its ~270k-token `ref_train`), the SAE 600k activation rows, and ntp, slm, cocomix, kd and mtp2
    600k tokens each (0.87 epochs of the targets' ~690k-token `train`), once (seed 0).

    Sized from measurements here: ntp trains at 5-7k tokens/s on a 2-core machine with a 120 GFLOP/s matmul
    peak (15.8k tokens/s on one with 415 GFLOP/s).
    """
    model = ModelConfig(num_layers=4, num_heads=4, d_model=128)
    train = TrainConfig(max_tokens=600_000, batch_size_tokens=4096, micro_batch_size=16, lr=3e-3,
                        warmup_steps=20, eval_every_steps=25, eval_max_windows=48, log_every_steps=10,
                        checkpoint_every_steps=50)
    return PipelineConfig(
        tokenize=TokenizeConfig(documents_where="year >= 1913", vocab_size=4096, seq_len=128),
        reference=ReferenceConfig(model=model, train=train),
        score=ScoreConfig(batch_size=32, num_shards=4),
        sae=SAEConfig(max_tokens=600_000, batch_rows=4096),
        concepts=ExtractConfig(num_shards=2),
        target=TargetConfig(model=model, train=train, variants=DEFAULT_VARIANTS),
        evaluate=EvaluateConfig(max_windows=None),
    )


def full() -> PipelineConfig:
    """`default` with every variant (adds the pause and mtp4 controls) at twice the tokens: targets 1.2M tokens,
    the SAE 1M rows (the previous main job's sizes, now with disjoint reference data and full evaluation)."""
    cfg = default()
    train = cfg.target.train.model_copy(update={"max_tokens": 1_200_000})
    return cfg.model_copy(update={
        "sae": cfg.sae.model_copy(update={"max_tokens": 1_000_000}),
        "target": cfg.target.model_copy(update={"train": train, "variants": ALL_VARIANTS}),
    })


def gpt2_small() -> PipelineConfig:
    """GPU scale: a GPT-2-small-sized model (12 x 768, ctx 1024, GPT-2 BPE), 0.5M-token batches.

    Meant for one modern GPU and a user corpus (set tokenize.source/paths); not run on CPU or in tests.
    """
    model = ModelConfig(num_layers=12, num_heads=12, d_model=768)
    train = TrainConfig(max_tokens=2_000_000_000, batch_size_tokens=524_288, micro_batch_size=32, lr=6e-4,
                        warmup_steps=700, eval_every_steps=250, eval_max_windows=100, log_every_steps=10,
                        checkpoint_every_steps=1000, compile=True)
    return PipelineConfig(
        tokenize=TokenizeConfig(tokenizer="gpt2", seq_len=1024),
        reference=ReferenceConfig(model=model, train=train.model_copy(update={"max_tokens": 500_000_000})),
        score=ScoreConfig(batch_size=64, num_shards=16),
        target=TargetConfig(model=model, train=train, variants=RHO1_VARIANTS),
        evaluate=EvaluateConfig(max_windows=2048),
    )


def compare() -> PipelineConfig:
    """`default` with 3 seed runs per target variant: the README's comparison with its spread. Its seed-0 runs
    are the default run's artifacts (same keys), so after `lmpipe run` only the seed 1 and 2 runs are trained."""
    cfg = default()
    return cfg.model_copy(update={"target": cfg.target.model_copy(update={"seeds": 3})})


def continual() -> PipelineConfig:
    """`default` as continual pretraining (Rho-1 Sec. 3.1): a base model pretrained on `train` for 1.2M tokens,
    the reference fine-tuned from it on `ref_train` for 300k tokens at a third of the learning rate, and every
    target continuing from it for the default's 600k tokens."""
    cfg = default()
    reference_train = cfg.reference.train.model_copy(update={"max_tokens": 300_000, "lr": 1e-3, "warmup_steps": 5})
    continual_cfg = cfg.model_copy(update={
        "base": BaseConfig(model=cfg.target.model, train=cfg.target.train.model_copy(update={"max_tokens": 1_200_000})),
        "reference": cfg.reference.model_copy(update={"train": reference_train}),
    })
    return PipelineConfig.model_validate(continual_cfg.model_dump())  # model_copy skips the cross-stage checks


PRESETS: dict[str, Callable[[], PipelineConfig]] = {"tiny": tiny, "default": default, "compare": compare,
                                                    "full": full, "continual": continual, "gpt2_small": gpt2_small}


def preset(name: str) -> PipelineConfig:
    """The named preset, or a ValueError listing the known names."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()
