"""Prefect flows: `lmpipe` runs the whole DAG; one flow per stage re-runs a single stage on cached upstream.

Target variants and score shards fan out as parallel task runs (thread pool: torch releases the GIL).
"""

import logging
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.futures import PrefectFuture
from prefect.task_runners import ThreadPoolTaskRunner

from flows.tasks import score_shard, shard_list, task_for
from schemas.configs import PipelineConfig
from schemas.manifest import Manifest
from schemas.presets import default
from stages.dag import Node, plan, select_nodes, upstream_closure
from storage.artifacts import require

log = logging.getLogger(__name__)

MAX_PARALLEL_TASKS = 2
"""Task runs at once (variants, shards). Two matches 2-core CPUs; raise it on a GPU box with spare memory."""


def run_pipeline(config: PipelineConfig, only: list[str] | None = None, force: list[str] | None = None) -> dict:
    """Build the selected nodes (default: all) in DAG order; `only` nodes need their upstream already built."""
    nodes = plan(config)
    forced = {name for stage in (force or []) for name in select_nodes(nodes, stage)}
    wanted = {name for stage in only for name in select_nodes(nodes, stage)} if only else set(nodes)
    needed = upstream_closure(nodes, wanted)
    results: dict[str, Manifest | PrefectFuture] = {}
    for name, node in nodes.items():
        if name not in wanted:
            if name in needed:
                results[name] = require(node.stage, node.key, built_by=f"lmpipe run --only {node.stage} "
                                        "(or a plain `lmpipe run`, which builds every missing stage)")
            continue
        inputs = {role: results[up] for role, up in node.upstream.items()}
        wait_for = []
        if node.stage == "score_reference" and not node.is_built():
            tokens = _resolve(inputs["tokens"])
            wait_for = [score_shard.with_options(task_run_name=f"score_reference.{split}.{shard}")
                        .submit(node, inputs, split, shard) for split, shard in shard_list(node, tokens)]
        results[name] = task_for(node).submit(node, inputs, force=name in forced, wait_for=wait_for)
    manifests = {name: _resolve(value) for name, value in results.items() if name in wanted}
    _publish(nodes, manifests)
    return {name: m.model_dump(mode="json") for name, m in manifests.items()}


def _resolve(value: Manifest | PrefectFuture) -> Manifest:
    return value.result() if isinstance(value, PrefectFuture) else value


def _publish(nodes: dict[str, Node], manifests: dict[str, Manifest]) -> None:
    """Summary table of the run, and the evaluation report when it was built, as Prefect artifacts."""
    rows = [{"node": name, "key": m.key, "seconds": m.build_seconds, "path": m.path} for name, m in manifests.items()]
    create_table_artifact(key="lmpipe-artifacts", table=rows, description="Artifacts of this run")
    if "evaluate" in manifests:
        report = Path(manifests["evaluate"].path) / "report.md"
        if report.is_file():
            create_markdown_artifact(key="lmpipe-report", markdown=report.read_text(), description="Model comparison")
    get_run_logger().info("artifacts: %s", ", ".join(f"{r['node']}={r['key']}" for r in rows))


DEFAULT_CONFIG = default()
"""What the UI form starts from."""


@flow(name="lmpipe", task_runner=ThreadPoolTaskRunner(max_workers=MAX_PARALLEL_TASKS))
def pipeline(config: PipelineConfig = DEFAULT_CONFIG, only: list[str] | None = None,
             force: list[str] | None = None) -> dict:
    """The whole pipeline: tokenize -> reference -> scores -> targets -> evaluate, cached per artifact."""
    return run_pipeline(config, only, force)


def _run_stage(stage: str, config: PipelineConfig, force: bool) -> dict:
    return run_pipeline(config, only=[stage], force=[stage] if force else [])


# One module-level flow per stage (served deployments load flows by entrypoint, so no factory functions).
@flow(name="tokenize_corpus", task_runner=ThreadPoolTaskRunner(max_workers=MAX_PARALLEL_TASKS))
def tokenize_corpus(config: PipelineConfig = DEFAULT_CONFIG, force: bool = False) -> dict:
    """Re-run tokenize_corpus (force=True rebuilds it even if cached)."""
    return _run_stage("tokenize_corpus", config, force)


@flow(name="train_reference", task_runner=ThreadPoolTaskRunner(max_workers=MAX_PARALLEL_TASKS))
def train_reference(config: PipelineConfig = DEFAULT_CONFIG, force: bool = False) -> dict:
    """Re-run train_reference on the cached tokens (force=True rebuilds it even if cached)."""
    return _run_stage("train_reference", config, force)


@flow(name="score_reference", task_runner=ThreadPoolTaskRunner(max_workers=MAX_PARALLEL_TASKS))
def score_reference(config: PipelineConfig = DEFAULT_CONFIG, force: bool = False) -> dict:
    """Re-run score_reference on the cached tokens and reference (force=True rebuilds it even if cached)."""
    return _run_stage("score_reference", config, force)


@flow(name="train_target", task_runner=ThreadPoolTaskRunner(max_workers=MAX_PARALLEL_TASKS))
def train_target(config: PipelineConfig = DEFAULT_CONFIG, force: bool = False) -> dict:
    """Re-run every target variant on cached upstream artifacts (force=True retrains them)."""
    return _run_stage("train_target", config, force)


@flow(name="evaluate", task_runner=ThreadPoolTaskRunner(max_workers=MAX_PARALLEL_TASKS))
def evaluate(config: PipelineConfig = DEFAULT_CONFIG, force: bool = False) -> dict:
    """Re-run the evaluation on cached models (force=True rebuilds the report)."""
    return _run_stage("evaluate", config, force)


STAGE_FLOWS = {f.name: f for f in (tokenize_corpus, train_reference, score_reference, train_target, evaluate)}
"""One flow per stage, for the UI and schedules: each takes the pipeline config as a form."""
