"""Named PipelineConfig presets: `tiny` (tests), `default` (the README main job), `compare` (default x 3 seeds),
`full` (every variant, twice the tokens), `continual` (default from a base
pretrained on the general split), `gpt2_small` (GPU); bring your own model (GPU, docs/byom.md): `continual_hf`
(Rho-1 from a Llama checkpoint) and `cocomix_gpt2` (CoCoMix with GPT-2 and a pretrained SAE as concept source)."""

from collections.abc import Callable

from schemas.configs import (
    BaseConfig,
    ConceptsConfig,
    DistillConfig,
    EvaluateConfig,
    ExtractConfig,
    LatentDashboardConfig,
    ModelConfig,
    PauseConfig,
    PipelineConfig,
    ReferenceConfig,
    SAEConfig,
    ScoreConfig,
    SelectionConfig,
    TargetConfig,
    TargetVariant,
    TeacherConfig,
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
block), against knowledge distillation from the same teacher and the pause-vector compute control."""

DEFAULT_MODEL = ModelConfig(num_layers=4, num_heads=4, d_model=128)
"""The default targets' shape (~1.32M parameters with the 4,096-token vocabulary)."""

MATCHED_CONTROLS = [
    TargetVariant(name="ntp_wide", model=DEFAULT_MODEL.model_copy(update={"d_model": 144})),
    TargetVariant(name="ntp_l3", model=DEFAULT_MODEL.model_copy(update={"num_layers": 3})),
]
"""Matched controls of the default: `ntp_wide` has cocomix's parameter count (d 144: 1.586M against cocomix's
1.579M with the default SAE's 1,024 latents; the paper widens its NTP baselines the same way, same depth and
heads); `ntp_l3` has mtp2's next-token depth (3 blocks: mtp2's 2 trunk blocks + its head-1 block), so mtp2 against
ntp_l3 measures the objective and ntp_l3 against ntp the depth it costs. (The other control, mtp2 with 5 layers,
would add a block to the multi-token model instead; ntp_l3 answers the same question at 0.75x ntp's cost.)"""

MTP_VARIANTS = [
    TargetVariant(name="mtp2", num_future_tokens=2),
    TargetVariant(name="mtp4", num_future_tokens=4),
]
"""Multi-token prediction (arXiv 2404.19737), compute-matched: n one-block heads taken from the model's layers."""

ALL_VARIANTS = RHO1_VARIANTS + COCOMIX_VARIANTS + MTP_VARIANTS + MATCHED_CONTROLS
"""Every objective of the three papers with its controls (the `full` preset)."""

DEFAULT_VARIANTS = [v for v in RHO1_VARIANTS + COCOMIX_VARIANTS + MTP_VARIANTS[:1] + MATCHED_CONTROLS
                    if v.name != "kd"]
"""The main job's comparison: ntp, slm, cocomix, pause, mtp2 and the matched controls ntp_wide and ntp_l3. kd runs
in `compare` (with 3 seeds) and `full`, mtp4 in `full`: the default's time (stages/evaluation/flops.py totals,
scaled by the 12.5-minute default of 2026-11 with ntp, slm, cocomix, kd and mtp2: ~18 minutes on 2 quiet cores)
keeps every matched control instead."""

PAUSE_TOKEN = TargetVariant(name="pause_token", pause=PauseConfig(readout="token"))
"""`pause` read from the token's own slot: the same compute as cocomix and pause, without routing the token's state
into a slot that starts as a constant vector (with the default's 2 blocks after the insert `pause` pays about a
nat for that; docs/results.md)."""

ATTRIBUTION_VARIANTS = [
    TargetVariant(name="cocomix_token", concepts=ConceptsConfig(attribution="token")),
    TargetVariant(name="cocomix_act", concepts=ConceptsConfig(attribution="activation")),
]
"""CoCoMix with other labelling rules (Fig. 6(a)'s ablation; the default rule is the window-mean gradient):
labels from the position's own next-token loss, and labels ranked by activation. Each reads its own
extract_concepts.<rule> node."""



def tiny() -> PipelineConfig:
    """Seconds-scale pipeline for tests: the addresses since 2014, a 4-layer d=32 model, a few thousand tokens."""
    model = ModelConfig(num_layers=4, num_heads=2, d_model=32)
    train = TrainConfig(max_tokens=6144, batch_size_tokens=512, micro_batch_size=8, lr=1e-2, warmup_steps=2,
                        eval_every_steps=4, eval_max_windows=16, log_every_steps=4, checkpoint_every_steps=4)
    return PipelineConfig(
        tokenize=TokenizeConfig(documents_where="year >= 2014", reference_where="year >= 2019", vocab_size=512,
                                seq_len=64, val_fraction=0.25, general_where="year >= 2008"),
        teacher=TeacherConfig(model=model, train=train.model_copy(update={"max_tokens": 12_288}),
                              splits=["general", "train"]),
        reference=ReferenceConfig(model=model, train=train),
        score=ScoreConfig(batch_size=32, num_shards=2),
        sae=SAEConfig(max_tokens=16_384, batch_rows=1024, eval_every_steps=8, eval_windows=8, dead_tokens=4096),
        concepts=ExtractConfig(num_shards=2),
        target=TargetConfig(model=model, train=train, variants=[
            v if v.model is None else v.model_copy(update={"model": _scaled(v.model, model)}) for v in ALL_VARIANTS]),
        evaluate=EvaluateConfig(max_windows=32, speculative_prompts=4, speculative_new_tokens=24),
    )


def _scaled(control: ModelConfig, model: ModelConfig) -> ModelConfig:
    """A matched control's shape carried over to another preset's model: the same width ratio and depth change."""
    return model.model_copy(update={
        "d_model": model.d_model * control.d_model // DEFAULT_MODEL.d_model // (2 * model.num_heads)
        * (2 * model.num_heads),
        "num_layers": model.num_layers + control.num_layers - DEFAULT_MODEL.num_layers})


def default() -> PipelineConfig:
    """The README main job on 2 CPU cores: ~1.3M-parameter models; the reference trains 600k tokens (about 2
    epochs of its ~270k-token `ref_train`); the teacher (concept source and distillation teacher) 1.2M tokens of
    the general split (the addresses before 1913, which no target trains or is evaluated on) and `train` joined,
    2x a target's training FLOPs; the SAE 1.2M activation rows of the teacher; concept labels for `train` (what
    the concept loss reads); and ntp, slm, cocomix, pause, mtp2 and the matched controls ntp_wide and ntp_l3 600k
    tokens each (0.87 epochs of the targets' ~690k-token `train`), once (seed 0), evaluated every 7 steps (22
    points per curve: tokens-to-reach resolves to 4.8% of the budget); the final evaluation reads 512 windows
    spread over each validation split, the latent dashboards 300k tokens. About 18 minutes by FLOPs (kd moved to
    `compare`; docs/results.md).

    Sized from measurements here: ntp trains at 5-7k tokens/s on a 2-core machine with a 120 GFLOP/s matmul
    peak (15.8k tokens/s on one with 415 GFLOP/s).
    """
    model = DEFAULT_MODEL
    train = TrainConfig(max_tokens=600_000, batch_size_tokens=4096, micro_batch_size=16, lr=3e-3,
                        warmup_steps=20, eval_every_steps=7, eval_max_windows=32, log_every_steps=10,
                        checkpoint_every_steps=50)
    return PipelineConfig(
        tokenize=TokenizeConfig(documents_where="year >= 1913", general_where="year < 1913", vocab_size=4096,
                                seq_len=128),
        teacher=TeacherConfig(model=model, train=train.model_copy(update={"max_tokens": 1_200_000,
                                                                           "eval_every_steps": 25}),
                              splits=["general", "train"]),
        reference=ReferenceConfig(model=model, train=train.model_copy(update={"eval_every_steps": 25})),
        score=ScoreConfig(batch_size=32, num_shards=4),
        sae=SAEConfig(max_tokens=1_200_000, batch_rows=4096, expansion=8, dead_tokens=100_000),
        concepts=ExtractConfig(num_shards=2, splits=["train"]),
        dashboards=LatentDashboardConfig(max_tokens=300_000),
        target=TargetConfig(model=model, train=train, variants=DEFAULT_VARIANTS),
        evaluate=EvaluateConfig(max_windows=512),
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
    """`default` with 3 seed runs per target variant, plus kd, pause_token and the attribution ablations
    (cocomix_token, cocomix_act): the README's comparison with its spread. Seed run r > 0 reads its own
    reference, teacher, scores, SAE and labels trained with seed + r (seed_upstream), so the spread includes the
    upstream models' luck. Its seed-0 runs of the default's variants are the default run's artifacts (same
    keys)."""
    cfg = default()
    kd = [v for v in COCOMIX_VARIANTS if v.name == "kd"]
    variants = cfg.target.variants + kd + [PAUSE_TOKEN] + ATTRIBUTION_VARIANTS
    return cfg.model_copy(update={"seed_upstream": True,
                                  "target": cfg.target.model_copy(update={"seeds": 3, "variants": variants})})


CONTINUAL_LR_RATIO = 8e-5 / 3e-4
"""Rho-1's continual-pretraining peak lr (8e-5, TinyLlama-1.1B math) over a 3e-4-scale pretraining peak."""


def continual() -> PipelineConfig:
    """`default` as continual pretraining (Rho-1 Sec. 3.1): a base model pretrained for 1.2M tokens on the
    `general` split (the addresses before 1913: disjoint from `ref_train`, `val`, `ref_val` and from the targets'
    `train`), the reference fine-tuned from it on `ref_train` for 300k tokens, and every target continuing from it
    on `train` for the default's 600k tokens. Both continue at the default's peak lr times Rho-1's ratio
    8e-5 / 3e-4 (3e-3 -> 8e-4), with a short warmup. The matched-width and matched-depth controls are left out
    (their shapes differ from the base's)."""
    cfg = default()
    lr = cfg.target.train.lr * CONTINUAL_LR_RATIO
    reference_train = cfg.reference.train.model_copy(update={"max_tokens": 300_000, "lr": lr, "warmup_steps": 5})
    target_train = cfg.target.train.model_copy(update={"lr": lr, "warmup_steps": 5})
    variants = [v for v in cfg.target.variants if v.model is None]
    continual_cfg = cfg.model_copy(update={
        "base": BaseConfig(model=cfg.target.model, split="general", train=cfg.target.train.model_copy(
            update={"max_tokens": 1_200_000, "eval_every_steps": 25})),
        "reference": cfg.reference.model_copy(update={"train": reference_train}),
        "target": cfg.target.model_copy(update={"train": target_train, "variants": variants}),
    })
    return PipelineConfig.model_validate(continual_cfg.model_dump())  # model_copy skips the cross-stage checks


RHO1_CONTINUAL_LR = 8e-5
"""Rho-1's continual-pretraining peak lr for TinyLlama-1.1B (Sec. 3.1)."""


def _gpu_train(seq_len: int, max_tokens: int, lr: float) -> TrainConfig:
    """A GPU run of 0.5M-token batches (micro-batches of 8 windows), compiled, evaluated every 250 steps."""
    return TrainConfig(max_tokens=max_tokens, batch_size_tokens=524_288 // seq_len * seq_len, micro_batch_size=8,
                       lr=lr, warmup_steps=100, eval_every_steps=250, eval_max_windows=100, log_every_steps=10,
                       checkpoint_every_steps=1000, compile=True)


def continual_hf() -> PipelineConfig:
    """Rho-1's real setup (Sec. 3.1) from your own Llama-family checkpoint (TinyLlama-1.1B in the paper), on a GPU:
    the base is the checkpoint as it is (base.train.max_tokens = 0: give it with --set base.init_from=<folder>),
    the reference is it fine-tuned on `ref_train` for 100M tokens, and ntp and slm (top 60% by excess loss)
    continue from it on `train` for 1B tokens, all at Rho-1's continual peak lr 8e-5 with the checkpoint's own
    tokenizer and 2048-token windows. Set the corpus with tokenize.source/paths and tokenize.reference_where."""
    seq_len = 2048
    train = _gpu_train(seq_len, 1_000_000_000, RHO1_CONTINUAL_LR)
    return PipelineConfig(
        tokenize=TokenizeConfig(tokenizer="model", seq_len=seq_len, documents_where="year >= 1913"),
        base=BaseConfig(train=train.model_copy(update={"max_tokens": 0})),
        reference=ReferenceConfig(train=train.model_copy(update={"max_tokens": 100_000_000})),
        score=ScoreConfig(batch_size=16, num_shards=16),
        target=TargetConfig(train=train, variants=RHO1_VARIANTS),
        evaluate=EvaluateConfig(max_windows=2048),
    )


def cocomix_gpt2() -> PipelineConfig:
    """CoCoMix (arXiv 2502.08524) with the paper's concept source, on a GPU: pretrained GPT-2 124M as the teacher
    (--set teacher.init_from=<folder>, used as it is) and a pretrained SAE of its residual stream (--set
    sae.init_from=<folder>, sae-lens or sparsify layout; its hook sets the layer), GPT-2's tokenizer, 1024-token
    windows; 12 x 512 targets (~64M parameters) trained from scratch for 2B tokens: ntp, cocomix, kd (from the
    same GPT-2) and the pause control."""
    seq_len = 1024
    model = ModelConfig(num_layers=12, num_heads=8, d_model=512)
    train = _gpu_train(seq_len, 2_000_000_000, 6e-4)
    return PipelineConfig(
        tokenize=TokenizeConfig(tokenizer="gpt2", seq_len=seq_len, documents_where="year >= 1913"),
        teacher=TeacherConfig(train=train.model_copy(update={"max_tokens": 0})),
        reference=ReferenceConfig(model=model, train=train.model_copy(update={"max_tokens": 200_000_000})),
        sae=SAEConfig(max_tokens=0, eval_windows=64),
        concepts=ExtractConfig(batch_size=16, num_shards=16),
        target=TargetConfig(model=model, train=train, variants=[TargetVariant(name="ntp"), *COCOMIX_VARIANTS]),
        evaluate=EvaluateConfig(max_windows=2048),
    )


PRESETS: dict[str, Callable[[], PipelineConfig]] = {"tiny": tiny, "default": default, "compare": compare,
                                                    "full": full, "continual": continual, "gpt2_small": gpt2_small,
                                                    "continual_hf": continual_hf, "cocomix_gpt2": cocomix_gpt2}


def preset(name: str) -> PipelineConfig:
    """The named preset, or a ValueError listing the known names."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()
