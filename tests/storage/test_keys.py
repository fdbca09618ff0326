"""Artifact keys are a hash of the config's JSON data: pinned, so that a library upgrade (pydantic's repr of a
model, say) cannot silently change every key and invalidate every cached artifact."""

import json

import pytest

from schemas.configs import ScoreConfig
from schemas.loading import load_config
from stages.dag import plan
from storage.artifacts import artifact_key, canonical_json

PINNED_TINY_KEYS = {
    "tokenize_corpus": "853f6214f3d975de",
    "train_reference": "df26c20b278be4d0",
    "train_target.slm": "197cfb8c274ae331",
}
"""Keys of the `tiny` preset. They change only with a stage's code_version, the preset's config data or the key
recipe itself; such a change rebuilds every artifact of the preset: update these pins in the same commit and say
why in its message."""


def test_keys_of_the_tiny_preset_are_pinned():
    nodes = plan(load_config("tiny"))
    assert {name: nodes[name].key for name in PINNED_TINY_KEYS} == PINNED_TINY_KEYS


def test_a_nested_model_is_keyed_by_its_json_data_not_its_repr():
    config = ScoreConfig(batch_size=7)
    text = canonical_json({"config": config, "upstream": {"b": "2", "a": "1"}})
    assert json.loads(text) == {"config": config.model_dump(mode="json"), "upstream": {"a": "1", "b": "2"}}
    assert text == json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))  # sorted and compact
    assert "ScoreConfig" not in text and "batch_size=" not in text
    assert artifact_key("s", "1", config, {}) == artifact_key("s", "1", config.model_dump(mode="json"), {})


def test_a_value_that_is_not_json_data_is_refused():
    with pytest.raises(TypeError, match="not JSON data"):
        canonical_json({"config": object()})
