"""Prefect flows: `lmpipe` runs the whole DAG; one flow per stage re-runs a single stage on cached upstream.

Target variants and score shards fan out as parallel task runs on the configured task runner (flows/task_runners.py:
a thread pool by default, or a Dask cluster).
"""

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.futures import PrefectFuture

from flows.inspector.serve import publish_link
from flows.run_futures import RunFutures
from flows.task_runners import configured
from flows.tasks import shard_task_for, task_for
from schemas.configs import PipelineConfig
from schemas.manifest import Manifest
from schemas.presets import default
from stages import node_builder
from stages.dag import Node
from stages.registry import stages
from stages.run_plan import RunPlan
from stages.runtime import interrupt
from storage.artifacts import artifact_root, object_store, open_artifact, require

log = logging.getLogger(__name__)


def run_pipeline(config: PipelineConfig, only: list[str] | None = None, force: list[str] | None = None) -> dict:
    """Build the selected nodes (default: all) in DAG order; `only` nodes need their upstream already built.
    The first task run that fails ends the run with its own error (flows/run_futures.py)."""
    interrupt.install_handlers()  # over Prefect's: SIGTERM/Ctrl-C stop stages at a safe point, with a checkpoint
    run = RunPlan.of(config, only, force)
    with _run_stop_file() as stop_file:  # a task-run parameter: workers started elsewhere learn it this way
        futures = RunFutures(stop_file)
        results: dict[str, Manifest | PrefectFuture] = {}
        shard_futures: dict[str, list[PrefectFuture]] = {}
        for name, node in run.nodes.items():
            if name not in run.wanted:
                if name in run.needed:
                    results[name] = require(node.stage, node.key, built_by=f"lmpipe run --only {node.stage} "
                                            "(or a plain `lmpipe run`, which builds every missing stage)")
                continue
            inputs = {role: results[up] for role, up in node.upstream.items()}
            wait_for = []
            if run.builds(name):
                shards = node_builder.shard_ids(node, {role: futures.resolve(value) for role, value in inputs.items()})
                wait_for = [futures.track(shard_task_for(node, shard).submit(node, inputs, shard, stop_file=stop_file),
                                          f"{node.name}.{shard}") for shard in shards]
            shard_futures[name] = wait_for
            results[name] = futures.track(task_for(node).submit(node, inputs, force=name in run.forced,
                                                                stop_file=stop_file, wait_for=wait_for), name)
        manifests = {}
        for name, value in results.items():
            for shard in shard_futures.get(name, []):
                futures.resolve(shard)  # a failed shard raises its own error (not "Run is in PENDING state")
            if name in run.wanted:
                manifests[name] = futures.resolve(value)
    _publish(run.nodes, manifests)
    return {name: m.model_dump(mode="json") for name, m in manifests.items()}


def stop_directory() -> str:
    """Where a run's stop file goes: `_stop` under the object-store root (workers on any machine see it there),
    else under the local root."""
    store = object_store()
    return f"{store.url}/_stop" if store else str(artifact_root() / "_stop")


@contextmanager
def _run_stop_file() -> Iterator[str]:
    """The stop file of this run: the one `lmpipe run` made, else (a flow run started by a deployment or a test) a
    fresh one for the duration of the flow."""
    if stop_file := interrupt.run_stop_file():
        yield stop_file
        return
    with interrupt.stop_file_for_run(stop_directory()) as stop_file:
        yield stop_file


def _embedded_plots(directory: Path) -> str:
    """The evaluation's PNG plots as Markdown images with data URIs (the UI shows them inline)."""
    import base64

    return "".join(f"\n\n### {png.stem}\n\n![{png.stem}](data:image/png;base64,"
                   f"{base64.b64encode(png.read_bytes()).decode()})" for png in sorted(directory.glob("*.png")))


def _publish(nodes: dict[str, Node], manifests: dict[str, Manifest]) -> None:
    """Summary table of the run, and the evaluation report when it was built, as Prefect artifacts."""
    rows = [{"node": name, "key": m.key, "seconds": m.build_seconds, "path": m.path} for name, m in manifests.items()]
    create_table_artifact(key="lmpipe-artifacts", table=rows, description="Artifacts of this run")
    if "evaluate" in manifests:
        evaluated = manifests["evaluate"]
        report = Path(open_artifact(evaluated.stage, evaluated.key).path) / "report.md"
        if report.is_file():
            create_markdown_artifact(key="lmpipe-report", markdown=report.read_text() + _embedded_plots(report.parent),
                                     description="Model comparison")
    publish_link()  # where `lmpipe inspect` serves this run's documents and concepts
    get_run_logger().info("artifacts: %s", ", ".join(f"{r['node']}={r['key']}" for r in rows))


DEFAULT_CONFIG = default()
"""What the UI form starts from."""


@flow(name="lmpipe", task_runner=configured())
def pipeline(config: PipelineConfig = DEFAULT_CONFIG, only: list[str] | None = None,
             force: list[str] | None = None) -> dict:
    """The whole pipeline: tokenize -> reference -> scores -> targets -> evaluate, cached per artifact."""
    return run_pipeline(config, only, force)


def _run_stage(stage: str, config: PipelineConfig, force: bool) -> dict:
    return run_pipeline(config, only=[stage], force=[stage] if force else [])


def stage_flow(stage_name: str, description: str):
    """The flow that re-runs one stage on cached upstream artifacts (force=True rebuilds it)."""

    def run_one_stage(config: PipelineConfig = DEFAULT_CONFIG, force: bool = False) -> dict:
        return _run_stage(stage_name, config, force)

    run_one_stage.__doc__ = f"Re-run {stage_name} on cached upstream artifacts ({description}); force=True rebuilds."
    # served deployments load a flow by entrypoint `flows/pipeline.py:<function name>`: name the function after
    # the stage and bind the flow to that module-level name (below)
    run_one_stage.__name__ = run_one_stage.__qualname__ = stage_name
    return flow(name=stage_name, task_runner=configured())(run_one_stage)


STAGE_FLOWS = {name: stage_flow(name, spec.description) for name, spec in stages().items()}
"""One flow per registered stage, for the UI and schedules: each takes the pipeline config as a form."""
globals().update(STAGE_FLOWS)  # module-level names, so `flows/pipeline.py:<stage>` entrypoints resolve
