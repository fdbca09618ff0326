"""Continual pretraining (PipelineConfig.base, Rho-1 Sec. 3.1): the base-to-model weight mapping, the config
checks, the DAG chaining through train_base (keys unchanged without a base), and a tiny build end to end."""

import pytest
import torch
from pydantic import ValidationError

from schemas.configs import (
    BaseConfig,
    DynamicsConfig,
    ModelConfig,
    PipelineConfig,
    ReferenceConfig,
    ScoreConfig,
    TargetConfig,
    TargetRun,
)
from schemas.presets import preset, tiny
from stages import node_builder
from stages.dag import plan
from stages.models.gpt import GPT
from stages.models.saved import load_model
from stages.registry import stages
from stages.training.init_weights import init_from_base, weight_sources
from stages.training.next_token_run import train_next_token
from storage.artifacts import artifact_key, load_manifest
from storage.checkpoints import read_model_meta
from tests.helpers import SEQ_LEN, TINY_MODEL, VOCAB, make_model, make_tokens, tiny_train_config

MODEL = ModelConfig(num_layers=4, num_heads=2, d_model=32)
"""4 blocks, so 2 multi-token heads leave a trunk of 2."""
PAUSE = {1: {"kind": "pause"}}
CONCEPTS = {0: {"kind": "concepts", "num_latents": 16, "num_active": 4, "mixing": "interleave"}}


def _gpt(seed: int, cfg: ModelConfig = MODEL, vocab: int = VOCAB, **kwargs) -> GPT:
    torch.manual_seed(seed)
    return GPT(cfg, vocab, SEQ_LEN, **kwargs)


def _clone_params(model: GPT) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


# --- weight mapping ---------------------------------------------------------------------------------------------

def test_an_ntp_model_from_the_base_is_the_base():
    base, model = _gpt(0), _gpt(1)
    sources = init_from_base(model, base)
    base_state = base.state_dict()
    assert all(sources[name] == name for name in sources)
    for name, param in model.named_parameters():
        assert torch.equal(param, base_state[name]), name
    idx_BT = torch.randint(0, VOCAB, (2, SEQ_LEN))
    with torch.no_grad():
        assert torch.equal(model.eval()(idx_BT), base.eval()(idx_BT))


def test_multi_token_heads_all_start_from_the_block_after_the_trunk():
    base, model = _gpt(0), _gpt(1, num_future_tokens=2)
    init_from_base(model, base)
    for i in range(2):  # trunk blocks 0, 1 <- base blocks 0, 1
        for (name, param), (_, base_param) in zip(model.trunk_blocks[i].named_parameters(),
                                                  base.trunk_blocks[i].named_parameters(), strict=True):
            assert torch.equal(param, base_param), (i, name)
    for head in model.head_blocks:  # both heads <- base block 2 (num_layers - heads), base block 3 unused
        for (name, param), (_, base_param) in zip(head.named_parameters(), base.trunk_blocks[2].named_parameters(),
                                                  strict=True):
            assert torch.equal(param, base_param), name
    for name in ("embed.weight", "norm.weight"):
        assert torch.equal(model.get_parameter(name), base.get_parameter(name))
    sources = weight_sources(model, base)
    assert sources["head_blocks.1.attn.q_proj.weight"] == "trunk_blocks.2.attn.q_proj.weight"
    assert not any(source.startswith("head_blocks.0") for source in sources.values())


def test_every_head_maps_to_the_first_block_when_no_trunk_is_left():
    sources = weight_sources(_gpt(1, num_future_tokens=4), _gpt(0))
    assert {sources[f"head_blocks.{i}.mlp.up_proj.weight"] for i in range(4)} == {"trunk_blocks.0.mlp.up_proj.weight"}


@pytest.mark.parametrize("inserts", [PAUSE, CONCEPTS], ids=["pause", "concepts"])
def test_inserts_keep_their_fresh_init_and_the_rest_is_copied(inserts):
    base, model = _gpt(0), _gpt(1, inserts=inserts)
    fresh = _clone_params(model)
    sources = init_from_base(model, base)
    base_state = base.state_dict()
    inserted = [name for name in sources if name.startswith("inserts.")]
    assert inserted and all(sources[name] is None for name in inserted)
    for name, param in model.named_parameters():
        expected = fresh[name] if sources[name] is None else base_state[name]
        assert torch.equal(param, expected), name


@pytest.mark.parametrize("make_pair, match", [
    (lambda: (_gpt(1), _gpt(0, MODEL.model_copy(update={"d_model": 64, "num_heads": 2}))), r"\['d_model'\]"),
    (lambda: (_gpt(1), _gpt(0, vocab=VOCAB + 1)), "vocabulary"),
    (lambda: (_gpt(1), _gpt(0, num_future_tokens=2)), "plain next-token GPT"),
    (lambda: (_gpt(1), _gpt(0, inserts=PAUSE)), "plain next-token GPT"),
], ids=["width", "vocab", "base_heads", "base_inserts"])
def test_models_that_do_not_fit_the_base_are_rejected(make_pair, match):
    model, base = make_pair()
    fresh = _clone_params(model)
    with pytest.raises(ValueError, match=match):
        init_from_base(model, base)
    assert all(torch.equal(p, fresh[name]) for name, p in model.named_parameters())  # nothing half-copied


def test_the_train_loop_starts_from_the_init_model(tmp_path):
    tokens, base = make_tokens(tmp_path), make_model(tmp_path, "base", seed=3)
    still = tiny_train_config(max_tokens=128, lr=1e-12, weight_decay=0.0)  # one step that moves nothing visibly
    train_next_token(TINY_MODEL, still, {"tokens": tokens, "init": base}, tmp_path / "run", stage="test",
                     name="reference", train_split="ref_train", eval_splits=("ref_val",))
    trained, base_model = load_model(tmp_path / "run"), load_model(base.path)
    for (name, param), (_, base_param) in zip(trained.named_parameters(), base_model.named_parameters(), strict=True):
        torch.testing.assert_close(param, base_param, rtol=0, atol=1e-9, msg=name)
    assert read_model_meta(tmp_path / "run")["init_key"] == base.key


# --- config and DAG ---------------------------------------------------------------------------------------------

def _with_base(cfg: PipelineConfig, base: BaseConfig, **updates) -> PipelineConfig:
    """cfg with a base (validated: model_copy alone skips the cross-stage checks)."""
    return PipelineConfig.model_validate(cfg.model_copy(update={"base": base} | updates).model_dump())


def _tiny_base(max_tokens: int = 4096) -> BaseConfig:
    cfg = tiny()
    return BaseConfig(model=cfg.target.model, train=cfg.target.train.model_copy(update={"max_tokens": max_tokens}))


def test_base_fields_have_help_text():
    assert all(field.description for field in BaseConfig.model_fields.values())
    assert PipelineConfig.model_fields["base"].description


def test_a_base_of_another_shape_is_rejected_naming_the_fields():
    base = _tiny_base().model_copy(update={"model": ModelConfig(num_layers=2, num_heads=2, d_model=32)})
    with pytest.raises(ValidationError, match=r"reference.model differs from base.model in \['num_layers'\].*"
                                              r"set reference.model to base.model"):
        _with_base(tiny(), base)


def test_base_train_batch_must_fit_the_windows():
    base = _tiny_base().model_copy(update={"train": tiny().target.train.model_copy(update={"batch_size_tokens": 100})})
    with pytest.raises(ValidationError, match="base.train.batch_size_tokens"):
        _with_base(tiny(), base)


def test_without_a_base_the_keys_are_those_computed_without_it():
    cfg = tiny()
    assert cfg.base is None
    nodes = plan(cfg)
    registry = {name: s for name, s in stages().items() if name != "train_base"}
    assert {n: node.key for n, node in plan(cfg, registry).items()} == {n: node.key for n, node in nodes.items()}
    assert "train_base" not in nodes and not any("init" in node.upstream for node in nodes.values())
    tokens_key = nodes["tokenize_corpus"].key  # the keys as they were computed before the base existed
    assert nodes["train_reference"].key == artifact_key("train_reference", nodes["train_reference"].code_version,
                                                        cfg.reference, {"tokens": tokens_key})
    ntp = next(v for v in cfg.target.variants if v.name == "ntp")
    assert nodes["train_target.ntp"].key == artifact_key("train_target", nodes["train_target.ntp"].code_version,
                                                         TargetRun.of(cfg.target, ntp), {"tokens": tokens_key})


def test_with_a_base_reference_and_targets_chain_through_it():
    plain, cfg = plan(tiny()), _with_base(tiny(), _tiny_base())
    nodes = plan(cfg)
    assert nodes["train_base"].upstream == {"tokens": "tokenize_corpus"}
    runs = ["train_reference"] + [f"train_target.{v.name}" for v in cfg.target.variants]
    assert all(nodes[name].upstream["init"] == "train_base" for name in runs)
    assert all(nodes[name].key != plain[name].key for name in runs)
    longer = plan(_with_base(tiny(), _tiny_base(max_tokens=8192)))
    assert nodes["tokenize_corpus"].key == longer["tokenize_corpus"].key
    assert all(nodes[name].key != longer[name].key for name in ["train_base", *runs, "score_reference", "evaluate"])


def test_continual_preset():
    cfg, default = preset("continual"), preset("default")
    assert cfg.base.model == cfg.reference.model == cfg.target.model
    assert cfg.base.train.max_tokens == 1_200_000 and cfg.base.split == "general"
    # targets continue at a continual-pretraining lr (Rho-1's 8e-5 after a 3e-4-scale peak), else as the default
    assert cfg.target.train == default.target.train.model_copy(update={"lr": cfg.target.train.lr, "warmup_steps": 5})
    assert cfg.target.train.lr < default.target.train.lr
    assert cfg.reference.train.max_tokens == 300_000 and cfg.reference.train.lr < default.reference.train.lr
    assert plan(cfg)["train_target.ntp"].upstream["init"] == "train_base"


# --- end to end -------------------------------------------------------------------------------------------------

def _tiny_continual(base_tokens: int) -> PipelineConfig:
    """A tiny config with a base: the 2-block test model on 16-token windows, the ntp and slm variants only."""
    cfg, train = tiny(), tiny_train_config(max_tokens=4 * 128)
    target = TargetConfig(model=TINY_MODEL, train=train, dynamics=DynamicsConfig(probe_windows=2),
                          variants=[v for v in cfg.target.variants if v.name in ("ntp", "slm")])
    base = BaseConfig(model=TINY_MODEL, train=train.model_copy(update={"max_tokens": base_tokens}))
    return _with_base(cfg, base, tokenize=cfg.tokenize.model_copy(update={"seq_len": SEQ_LEN}),
                      reference=ReferenceConfig(model=TINY_MODEL, train=train),
                      score=ScoreConfig(batch_size=8, num_shards=1), target=target)


def test_tiny_continual_pipeline_builds_through_the_base(tmp_path):
    cfg = _tiny_continual(base_tokens=2 * 128)
    nodes, root = plan(cfg), tmp_path / "root"
    built = {"tokenize_corpus": make_tokens(tmp_path)}  # a fake tokens artifact stands in for the corpus
    for name in ["train_base", "train_reference", "score_reference", "train_target.ntp", "train_target.slm"]:
        node = nodes[name]
        built[name] = node_builder.build_node(node, {role: built[up] for role, up in node.upstream.items()}, root=root)
    base = built["train_base"]
    assert base.summary["steps"] == 2 and load_model(base.path).num_future_tokens == 1
    assert set(base.summary["val_loss"]) == {"val", "ref_val"}
    for name in ["train_reference", "train_target.ntp", "train_target.slm"]:
        assert load_manifest(built[name].path).upstream["init"] == base.key, name
    assert load_manifest(built["train_target.slm"].path).upstream["scores"] == built["score_reference"].key

    longer = plan(_tiny_continual(base_tokens=4 * 128))
    for name in ["train_base", "train_reference", "train_target.ntp", "train_target.slm"]:
        assert longer[name].key != nodes[name].key, name
