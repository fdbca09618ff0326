"""End to end: the tiny preset through Prefect. First run builds, second is all cached, --only/--force
rebuilds one stage, a missing upstream names the command that builds it, SQL answers over the catalog."""

import json
import os
from pathlib import Path

import pytest
from pyarrow import types as pa_types

from schemas.presets import tiny
from stages.dag import plan
from storage.artifacts import SUCCESS, load_manifest, verify

pytestmark = pytest.mark.flow


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("artifacts")
    old = os.environ.get("LMPIPE_ROOT")
    os.environ["LMPIPE_ROOT"] = str(root)
    yield root
    if old is None:
        os.environ.pop("LMPIPE_ROOT")
    else:
        os.environ["LMPIPE_ROOT"] = old


@pytest.fixture(scope="module")
def first_run(root, prefect_harness):
    from flows.pipeline import pipeline

    return pipeline(config=tiny())


def test_first_run_builds_every_node(first_run, root):
    nodes = plan(tiny())
    assert set(first_run) == set(nodes)
    for name, node in nodes.items():
        assert (node.path() / SUCCESS).exists(), name
        assert verify(load_manifest(node.path())) == []
    report = (nodes["evaluate"].path() / "report.md").read_text()
    assert all(f"| {name} |" in report for name in ("ntp", "slm", "cocomix", "kd", "pause"))
    assert {"train_sae", "extract_concepts"} <= set(nodes)


def test_second_run_is_all_cached(first_run, root):
    from flows.pipeline import pipeline

    again = pipeline(config=tiny())
    assert {n: m["created_at"] for n, m in again.items()} == {n: m["created_at"] for n, m in first_run.items()}


def test_only_force_rebuilds_only_that_stage(first_run, root):
    from flows.pipeline import pipeline

    marker = plan(tiny())["tokenize_corpus"].path() / SUCCESS
    before_ns = marker.stat().st_mtime_ns
    result = pipeline(config=tiny(), only=["tokenize_corpus"], force=["tokenize_corpus"])
    assert set(result) == {"tokenize_corpus"}
    assert marker.stat().st_mtime_ns > before_ns  # rebuilt: a new _SUCCESS marker (fails if it was reused)
    assert result["tokenize_corpus"]["key"] == first_run["tokenize_corpus"]["key"]
    nodes = plan(tiny())
    assert load_manifest(nodes["train_reference"].path()).created_at == first_run["train_reference"]["created_at"]


def test_only_with_missing_upstream_names_the_command(first_run, root):
    from flows.pipeline import pipeline
    from schemas.loading import load_config
    from storage.artifacts import MissingArtifactError

    cfg = load_config("tiny", overrides=["reference.model.d_model=64"])  # a reference that was never trained
    with pytest.raises(MissingArtifactError, match="lmpipe run --only train_reference"):
        pipeline(config=cfg, only=["score_reference"])


def test_cli_sql_status_and_verify(first_run, root, capsys):
    from flows.cli import main

    query = "select split, count(*) as n from tokens group by 1 order by 1"
    assert main(["sql", "--preset", "tiny", "--json", query]) == 0
    rows = json.loads(capsys.readouterr().out)
    splits = {"train", "val", "ref_train", "ref_val", "general"}  # general: the tiny teacher's own split
    assert {r["split"] for r in rows} == splits and all(r["n"] > 0 for r in rows)
    assert main(["status", "--preset", "tiny"]) == 0
    assert "True" in capsys.readouterr().out
    assert main(["verify"]) == 0
    assert Path(first_run["evaluate"]["path"]).is_dir()


def test_every_readme_query_runs_and_returns_rows(first_run, root):
    import re

    from flows.status import catalog_for

    cookbook = (Path(__file__).parents[2] / "docs" / "sql.md").read_text()
    queries = re.findall(r"```sql\n(.*?)```", cookbook, re.S)
    assert len(queries) >= 5
    con = catalog_for(tiny())
    for query in queries:
        assert con.execute(query).fetchall(), f"no rows from docs/sql.md query:\n{query}"


def test_one_module_level_flow_per_stage():
    """Served deployments import flows by entrypoint, so each stage flow must be a module attribute."""
    import flows.pipeline as pipeline_module
    from stages.registry import STAGE_MODULES

    assert set(pipeline_module.STAGE_FLOWS) == set(STAGE_MODULES)
    for name, stage_flow in pipeline_module.STAGE_FLOWS.items():
        assert getattr(pipeline_module, stage_flow.fn.__name__) is stage_flow, name


def test_cli_report_generate_export_and_sql_prompt(first_run, root, capsys, monkeypatch, tmp_path):
    import io

    from flows.cli import main

    assert main(["report", "--preset", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "| slm |" in out and "val_loss.png" in out
    generate = ["generate", "--preset", "tiny", "--model", "slm", "--prompt", "My fellow", "--max-new-tokens", "5"]
    assert main(generate) == 0
    assert capsys.readouterr().out.startswith("My fellow")
    assert main(["export", "--preset", "tiny", "ntp", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file() and (tmp_path / "hf" / "tokenizer.json").is_file()
    monkeypatch.setattr("sys.stdin", io.StringIO("select count(*) as n\nfrom vocab;\n"))
    assert main(["sql", "--preset", "tiny"]) == 0
    assert "512" in capsys.readouterr().out
    assert main(["generate", "--preset", "tiny", "--model", "nope", "--prompt", "x"]) == 2
    speculative = ["generate", "--preset", "tiny", "--model", "mtp4", "--prompt", "My fellow", "--speculative",
                   "--draft", "2", "--max-new-tokens", "12"]
    assert main(speculative) == 0
    out = capsys.readouterr().out
    assert "tokens per forward" in out and "identical output" in out
    assert main(["generate", "--preset", "tiny", "--model", "ntp", "--prompt", "x", "--speculative"]) == 2
    assert "one prediction head" in capsys.readouterr().err


def test_cli_steer_and_concept_export_refusal(first_run, root, capsys, tmp_path):
    from flows.cli import main

    steer = ["steer", "--preset", "tiny", "--model", "cocomix", "--concept", "3", "--scale", "4", "--prompt",
             "The state of the union", "--max-new-tokens", "8"]
    assert main(steer) == 0
    out = capsys.readouterr().out
    assert "concept 3:" in out and "scale 0" in out and "scale 4" in out
    assert main(["steer", "--preset", "tiny", "--model", "ntp", "--concept", "3", "--prompt", "x"]) == 2
    assert "no concept insert" in capsys.readouterr().err
    assert main(["export", "--preset", "tiny", "cocomix", str(tmp_path / "hf")]) == 2
    assert "cannot express" in capsys.readouterr().err


def test_interrupted_scoring_redoes_only_unfinished_shards(first_run, root):
    """A shard finished before an interruption is reused (its part file untouched); the rest are scored."""
    from flows.pipeline import pipeline
    from schemas.loading import load_config
    from stages import node_builder
    from storage.artifacts import build_dir

    cfg = load_config("tiny", overrides=["score.num_shards=3"])  # a new score key over the cached reference
    node = plan(cfg)["score_reference"]
    inputs = {role: load_manifest(plan(cfg)[up].path()) for role, up in node.upstream.items()}
    done = Path(node_builder.build_shard(node, inputs, "val-001"))  # as if the run was killed after this shard
    assert done.parent == build_dir(node.stage, node.key)
    finished_ns = done.stat().st_mtime_ns
    result = pipeline(config=cfg, only=["score_reference"])
    final = Path(result["score_reference"]["path"])
    assert (final / done.name).stat().st_mtime_ns == finished_ns
    assert len(list(final.glob("part-*.parquet"))) == 4 * 3


def test_targets_trained_on_two_processes_match_one(first_run, root):
    """target.train.num_processes=2 through Prefect (each target launches its own 2 gloo workers): the same models
    as the first run's one-process ones, to float tolerance (a step's windows are split into two micro-batches
    of half the size, one per process: the same mean loss; 12 steps at lr 1e-2 grow the float differences)."""
    import torch
    from safetensors.torch import load_file

    from flows.pipeline import pipeline
    from schemas.configs import PipelineConfig

    data = tiny().model_dump()
    train = data["target"]["train"]
    train |= {"num_processes": 2, "micro_batch_size": train["micro_batch_size"] // 2}
    data["target"]["variants"] = [v for v in data["target"]["variants"] if v["name"] in ("ntp", "mtp2")]
    config = PipelineConfig.model_validate(data)
    pipeline(config=config, only=["train_target"])
    one, two = plan(tiny()), plan(config)
    for name in ("train_target.ntp", "train_target.mtp2"):
        assert two[name].key != one[name].key and verify(load_manifest(two[name].path())) == []
        a, b = (load_file(nodes[name].path() / "model.safetensors") for nodes in (one, two))
        for tensor in a:
            torch.testing.assert_close(b[tensor], a[tensor], rtol=1e-3, atol=1e-4)


@pytest.mark.cluster
@pytest.mark.parametrize("kind", ["dask", "ray"])
def test_a_local_cluster_builds_the_same_artifacts(first_run, root, kind, tmp_path):
    """The targets and score shards rebuilt as task runs on a local cluster with 2 worker processes (a Dask
    cluster through prefect-dask, a Ray instance through prefect-ray): the same keys, the same files, integer and
    text content identical, floats (weights, losses) equal to float tolerance. Not bitwise: the workers run torch
    on one thread each (both engines set OMP_NUM_THREADS=1), the thread pool on every core, and on some CPUs a
    kernel's reduction order depends on the thread count (seen: train_target.cocomix differed in its last bits on
    two machines and matched on a third)."""
    import shutil

    pytest.importorskip(f"prefect_{kind}")
    from flows.pipeline import pipeline
    from flows.task_runners import task_runner

    nodes = plan(tiny())
    rebuilt = [name for name in nodes if name.startswith(("score_reference", "train_target"))]
    before = {name: load_manifest(nodes[name].path()) for name in rebuilt}
    for name in rebuilt:  # the rebuild replaces the files in place: keep the thread pool's to compare with
        shutil.copytree(nodes[name].path(), tmp_path / name)
    on_cluster = pipeline.with_options(task_runner=task_runner(kind, 2))
    result = on_cluster(config=tiny(), only=["score_reference", "train_target"],
                        force=["score_reference", "train_target"])
    assert set(result) == set(rebuilt)
    for name in rebuilt:
        after = load_manifest(nodes[name].path())
        assert after.key == before[name].key and after.created_at != before[name].created_at  # rebuilt, same key
        old, new = _content(before[name]), _content(after)
        assert old.keys() == new.keys(), name
        for file in sorted(old):
            if file.endswith((".safetensors", ".parquet")):
                assert_close_files(tmp_path / name / file, nodes[name].path() / file)
            else:
                assert old[file] == new[file], f"{name}/{file}"


def assert_close_files(expected: Path, actual: Path) -> None:
    """Two .safetensors or .parquet files: float tensors and columns equal to float tolerance, the rest exactly."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch
    from safetensors.torch import load_file

    if expected.suffix == ".safetensors":
        a, b = load_file(expected), load_file(actual)
        assert a.keys() == b.keys(), actual
        for tensor in a:
            torch.testing.assert_close(b[tensor], a[tensor], rtol=1e-3, atol=1e-4, msg=f"{actual}: {tensor}")
        return
    a, b = pq.read_table(expected), pq.read_table(actual)
    assert a.schema == b.schema and a.num_rows == b.num_rows, actual
    for column in a.column_names:
        if pa_types.is_floating(a.schema.field(column).type):
            np.testing.assert_allclose(b[column].to_numpy(), a[column].to_numpy(), rtol=1e-3, atol=1e-4,
                                       err_msg=f"{actual}: {column}")
        else:
            assert a[column].equals(b[column]), f"{actual}: {column}"


def _content(manifest) -> dict[str, str]:
    """path -> sha256 of an artifact's files, without those that record timings (tokens/s, seconds)."""
    def timing(name: str) -> bool:
        return name == "metrics.parquet" or (name.startswith("part-") and name.endswith(".json"))

    return {f.path: f.sha256 for f in manifest.files if not timing(Path(f.path).name)}


@pytest.mark.cluster
def test_an_interrupted_run_on_dask_redoes_only_unfinished_shards(first_run, root):
    """As the thread-pool test above, on a local Dask cluster of 2 worker processes: the shard finished before
    the interruption is kept (its file untouched), the others are scored by the workers."""
    pytest.importorskip("prefect_dask")
    from flows.pipeline import pipeline
    from flows.task_runners import task_runner
    from schemas.loading import load_config
    from stages import node_builder

    cfg = load_config("tiny", overrides=["score.num_shards=5"])
    node = plan(cfg)["score_reference"]
    inputs = {role: load_manifest(plan(cfg)[up].path()) for role, up in node.upstream.items()}
    done = Path(node_builder.build_shard(node, inputs, "train-003"))
    finished_ns = done.stat().st_mtime_ns
    result = pipeline.with_options(task_runner=task_runner("dask", 2))(config=cfg, only=["score_reference"])
    final = Path(result["score_reference"]["path"])
    assert (final / done.name).stat().st_mtime_ns == finished_ns
    assert len(list(final.glob("part-*.parquet"))) == 4 * 5
