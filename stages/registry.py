"""The stage registry: one declaration per stage (`STAGE = Stage(...)` at the bottom of its module).

Everything that lists stages is derived from it: the DAG plan (stages/dag.py), the builder dispatch
(stages/node_builder.py), the DuckDB catalog's tables and join views (storage/catalog.py via flows/status.py), the
per-stage Prefect flows and the shard fan-out (flows/). Adding a stage = one stage module with `run` and a
`STAGE` entry, its config in schemas/configs/ (re-exported by its __init__), and its module name in STAGE_MODULES below.
"""

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel

from schemas.configs import PipelineConfig
from schemas.manifest import Manifest
from storage.catalog import JoinView, TableSpec

STAGE_MODULES = ("tokenize_corpus", "train_base", "train_teacher", "train_reference", "score_reference", "train_sae",
                 "extract_concepts", "latent_dashboards", "train_target", "evaluate")
"""Stage modules under stages/, in DAG order (a stage's upstream stages come before it)."""


@dataclass(frozen=True)
class NodeDecl:
    """One artifact a stage contributes to a pipeline: node name, its config, upstream node by role."""

    name: str
    config: BaseModel
    upstream: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Shards:
    """How a stage fans out into independently cached shard task runs, each written into its build dir."""

    list: Callable[[BaseModel, dict[str, Manifest]], list[str]]
    """(config, upstream manifests) -> shard ids, e.g. `train-000`."""
    file: Callable[[str], str]
    """shard id -> the file the shard writes (present = done)."""
    build: Callable[[BaseModel, dict[str, Manifest], str, Path], Path]
    """(config, upstream manifests, shard id, build dir) -> the written file."""


def shard_id(split: str, index: int) -> str:
    """The id `<split>-<index:03d>` of one window-range shard."""
    return f"{split}-{index:03d}"


def part_file(shard: str) -> str:
    """File name of one shard's per-token rows: `part-<shard id>.parquet`."""
    return f"part-{shard}.parquet"


def split_parts(manifest: Manifest, split: str) -> list[Path]:
    """The part files of one split in an artifact (the per-token table of a sharded stage)."""
    return sorted(Path(manifest.path).glob(f"part-{split}-*.parquet"))


def window_shard_ids(num_windows: dict[str, int], splits, num_shards: int) -> list[str]:
    """Shard ids of the given splits (shards that would get no window are left out)."""
    return [shard_id(split, shard) for split in splits
            for shard, (start, stop) in enumerate(shard_ranges(num_windows[split], num_shards)) if stop > start]


def parse_shard_id(shard: str) -> tuple[str, int]:
    """(split, shard index) of a `<split>-<shard:03d>` id."""
    split, _, index = shard.rpartition("-")
    if not split or not index.isdigit():
        raise ValueError(f"bad shard id {shard!r}: expected <split>-<3 digits>")
    return split, int(index)


def shard_ranges(num_windows: int, num_shards: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) window ranges of near-equal size, one per shard (empty when windows run out)."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    bounds = [shard * max(num_windows, 0) // num_shards for shard in range(num_shards + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


@dataclass(frozen=True)
class TokenTable:
    """A per-token table keyed by (split, token_index) that objectives can read as dense columns."""

    files: Callable[[Manifest, str], list[Path]]
    """(artifact manifest, split) -> its Parquet files of that split."""


@dataclass(frozen=True)
class Stage:
    """A stage's declaration: identity, config, planning, how to run it, what it writes."""

    name: str
    code_version: str
    """Bump when the code changes what the stage writes: its key and every downstream key change."""
    config_type: type[BaseModel]
    nodes: Callable[[PipelineConfig], list[NodeDecl]]
    """The nodes of this stage in a pipeline config (usually one)."""
    run: Callable[[BaseModel, dict[str, Manifest], Path], dict]
    """run(config, upstream manifests by role, build dir) -> summary numbers."""
    tables: dict[str, TableSpec] = field(default_factory=dict)
    """Catalog views over the stage's Parquet files (view name -> spec)."""
    views: dict[str, JoinView] = field(default_factory=dict)
    """Catalog join views that need this stage's tables (and maybe upstream ones)."""
    shards: Shards | None = None
    token_table: TokenTable | None = None
    on_demand: bool = False
    """True: planned only when another node depends on it (e.g. the SAE when a variant uses concepts)."""
    description: str = ""
    """One line for the UI and the CLI."""


_EXTRA: dict[str, Stage] = {}
"""Stages registered at run time (plugins, tests), planned after the built-in ones."""


def register(stage: Stage) -> None:
    """Add a stage defined outside stages/ (e.g. a plugin or a test); its upstream stages must be registered."""
    if stage.name in STAGE_MODULES:
        raise ValueError(f"stage {stage.name!r} is built in; pick another name")
    _EXTRA[stage.name] = stage


def unregister(name: str) -> None:
    """Remove a stage added with register()."""
    _EXTRA.pop(name, None)


def stages() -> dict[str, Stage]:
    """Every registered stage by name, in DAG order (imports the stage modules)."""
    found = {}
    for module_name in STAGE_MODULES:
        stage = importlib.import_module(f"stages.{module_name}").STAGE
        if stage.name != module_name:
            raise AssertionError(f"stages/{module_name}.py declares STAGE.name={stage.name!r}")
        found[stage.name] = stage
    return found | _EXTRA


def stage(name: str) -> Stage:
    """One stage's declaration; ValueError listing the stages."""
    known = stages()
    if name not in known:
        raise ValueError(f"unknown stage {name!r}; choose from {list(known)}")
    return known[name]
