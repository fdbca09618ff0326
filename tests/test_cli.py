"""CLI errors a user meets before anything is built, and what `lmpipe sql` says of damaged or unbuilt views."""

from pathlib import Path


def test_unknown_stage_is_rejected_before_prefect_starts(monkeypatch, capsys, tmp_path):
    from flows.cli import main

    monkeypatch.setenv("LMPIPE_ROOT", str(tmp_path))
    assert main(["run", "--preset", "tiny", "--only", "nosuchstage"]) == 2
    assert "unknown stage 'nosuchstage'" in capsys.readouterr().err
    assert not (tmp_path / "_prefect").exists()  # no Prefect home or server was set up


def test_a_run_with_nothing_to_build_skips_prefect_and_says_cached(monkeypatch, capsys, tmp_path):
    from flows.cli import main
    from schemas.presets import tiny
    from stages.dag import plan

    monkeypatch.setenv("LMPIPE_ROOT", str(tmp_path))
    nodes = plan(tiny())
    _stand_in_artifacts("tiny", [])  # finished-looking artifacts under every key of the plan
    assert all(node.is_built() for node in nodes.values())
    assert main(["run", "--preset", "tiny", "--only", "train_target"]) == 0
    out = capsys.readouterr().out
    assert f"0 built, {sum(n.startswith('train_target.') for n in nodes)} cached" in out
    assert not (tmp_path / "_prefect").exists()


def test_commands_without_a_config_use_the_last_run(monkeypatch, capsys, tmp_path):
    """After `lmpipe run --preset tiny --set ...`, a plain `lmpipe config` (and status, sql, report, ...) shows
    that run's config, not the default preset's; an explicit --preset wins."""
    import json

    from flows.cli import main
    from flows.last_run import last_run_path

    monkeypatch.setenv("LMPIPE_ROOT", str(tmp_path))
    # a failing --only still records nothing: the run is rejected before it is remembered
    assert main(["run", "--preset", "tiny", "--only", "nosuchstage"]) == 2 and not last_run_path().exists()
    _stand_in_artifacts("tiny", ["target.train.lr=0.005"])
    assert main(["run", "--preset", "tiny", "--set", "target.train.lr=0.005", "--only", "tokenize_corpus"]) == 0
    assert json.loads(last_run_path().read_text())["overrides"] == ["target.train.lr=0.005"]
    capsys.readouterr()
    assert main(["config"]) == 0
    config = json.loads(capsys.readouterr().out)
    assert config["target"]["train"]["lr"] == 0.005 and config["tokenize"]["vocab_size"] == 512
    assert main(["config", "--preset", "default"]) == 0
    assert json.loads(capsys.readouterr().out)["target"]["train"]["lr"] == 3e-3


def _stand_in_artifacts(preset: str, overrides: list[str]) -> None:
    """Finished-looking artifacts for every node of a config (so `run` has nothing to build)."""
    from schemas.loading import load_config
    from schemas.manifest import Manifest
    from stages.dag import plan
    from storage.artifacts import MANIFEST, SUCCESS

    for node in plan(load_config(preset, None, overrides)).values():
        node.path().mkdir(parents=True, exist_ok=True)
        manifest = Manifest(stage=node.stage, key=node.key, path=str(node.path()), code_version=node.code_version,
                            config={}, upstream={}, created_at="2026-01-01T00:00:00")
        (node.path() / MANIFEST).write_text(manifest.model_dump_json())
        (node.path() / SUCCESS).write_text(manifest.created_at)


def test_a_yaml_list_config_and_an_unexpected_failure_are_one_line_errors(monkeypatch, capsys, tmp_path):
    from flows import cli

    monkeypatch.setenv("LMPIPE_ROOT", str(tmp_path))
    (tmp_path / "list.yaml").write_text("- tokenize\n- target\n")
    assert cli.main(["config", "--config", str(tmp_path / "list.yaml")]) == 2
    assert "top level is a list, expected a mapping" in capsys.readouterr().err

    def broken(args):
        """Fail like an unexpected bug."""
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(cli, "cmd_config", broken)
    assert cli.main(["config"]) == 1
    err = capsys.readouterr().err
    assert "RuntimeError: disk on fire" in err and "Traceback" not in err and "lmpipe -v" in err


def test_a_dead_prefect_api_fails_the_run_within_seconds(monkeypatch, capsys, tmp_path):
    import time

    from flows.cli import main

    monkeypatch.setenv("LMPIPE_ROOT", str(tmp_path))
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # nothing listens on the discard port
    started = time.perf_counter()
    assert main(["run", "--preset", "tiny", "--only", "tokenize_corpus"]) == 2
    assert time.perf_counter() - started < 10
    err = capsys.readouterr().err
    assert "PREFECT_API_URL=http://127.0.0.1:9/api does not answer" in err and "lmpipe server" in err


def test_doctor_prints_versions_devices_root_and_prefect_api(monkeypatch, capsys, tmp_path):
    from flows.cli import main

    monkeypatch.setenv("LMPIPE_ROOT", str(tmp_path / "artifacts"))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    for name in ("python", "torch", "prefect", "cuda", "artifact root", "GiB free", "prefect api", "last run"):
        assert name in out, name
    assert "not created yet" in out


def _built_with_table(node, name: str) -> Path:
    """A finished artifact of a plan node holding one small Parquet table (manifest with sizes and sha256s)."""
    import pyarrow as pa

    from schemas.manifest import Manifest
    from storage.artifacts import MANIFEST, SUCCESS, list_files
    from storage.parquet import write_table

    path = node.path()
    path.mkdir(parents=True)
    write_table(path / name, {"x": list(range(50))}, pa.schema([("x", pa.int64())]))
    manifest = Manifest(stage=node.stage, key=node.key, path=str(path), code_version=node.code_version, config={},
                        upstream={}, files=list_files(path), created_at="2026-01-01T00:00:00")
    (path / MANIFEST).write_text(manifest.model_dump_json())
    (path / SUCCESS).write_text(manifest.created_at)
    return path / name


def test_sql_refuses_a_damaged_artifact_with_a_warning_and_serves_the_rest(monkeypatch, capsys, tmp_path):
    from flows.cli import main
    from schemas.presets import tiny
    from stages.dag import plan

    monkeypatch.setenv("LMPIPE_ROOT", str(tmp_path))
    nodes = plan(tiny())
    vocab = _built_with_table(nodes["tokenize_corpus"], "vocab.parquet")
    _built_with_table(nodes["train_reference"], "metrics.parquet")
    data = bytearray(vocab.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size: only the sha256 tells
    vocab.write_bytes(bytes(data))
    assert main(["sql", "--preset", "tiny", "select count(*) as n from reference_metrics"]) == 0
    captured = capsys.readouterr()
    assert "50" in captured.out
    assert captured.err.startswith("lmpipe sql: warning: views vocab_all, vocab unavailable:")
    assert f"{vocab}: sha256 differs" in captured.err
    assert main(["sql", "--preset", "tiny", "select count(*) from vocab"]) == 2
    warning, error = capsys.readouterr().err.strip().splitlines()
    assert error.startswith("lmpipe: error: view vocab is refused:") and str(vocab) in error
    assert "lmpipe run --force tokenize_corpus" in error


def test_sql_before_any_run_says_what_to_run(monkeypatch, capsys, tmp_path):
    from flows.cli import main

    monkeypatch.setenv("LMPIPE_ROOT", str(tmp_path / "fresh"))
    assert main(["sql", "--preset", "tiny", "select count(*) from tokens"]) == 2
    err = capsys.readouterr().err
    assert f"nothing is built yet under {tmp_path / 'fresh'}" in err and "`lmpipe run --preset tiny`" in err
    assert "pg_constraint" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "fresh").exists()  # a query creates no root


def test_sql_sandbox_reads_the_artifacts_only(monkeypatch, capsys, tmp_path):
    from flows.cli import main
    from schemas.presets import tiny
    from stages.dag import plan

    monkeypatch.setenv("LMPIPE_ROOT", str(tmp_path))
    _built_with_table(plan(tiny())["train_reference"], "metrics.parquet")
    assert main(["sql", "--preset", "tiny", "--sandbox", "--csv", "select count(*) as n from reference_metrics"]) == 0
    assert capsys.readouterr().out.splitlines() == ["n", "50"]
    assert main(["sql", "--preset", "tiny", "--sandbox", "select * from read_csv('/etc/passwd')"]) == 2
    assert "Permission Error" in capsys.readouterr().err
    assert main(["sql", "--preset", "tiny", "select count(*) > 0 from read_csv('/etc/passwd')"]) == 0


def test_a_corpus_glob_that_matches_nothing_is_named_before_prefect_starts(monkeypatch, capsys, tmp_path):
    from flows.cli import main

    monkeypatch.setenv("LMPIPE_ROOT", str(tmp_path / "artifacts"))
    monkeypatch.chdir(tmp_path)
    args = ["run", "--preset", "tiny", "--set", "tokenize.source=files", "--set", 'tokenize.paths=["corpus/*.txt"]']
    assert main(args) == 2
    assert "tokenize.paths: 'corpus/*.txt': glob pattern matches no file" in capsys.readouterr().err
    assert not (tmp_path / "artifacts" / "_prefect").exists()
    (tmp_path / "extra.txt").write_text("held out\n")
    assert main(["run", "--preset", "tiny", "--set", 'evaluate.extra_files=["extra.txt", "missing.txt"]']) == 2
    assert "evaluate.extra_files: 'missing.txt': file does not exist" in capsys.readouterr().err
    assert not (tmp_path / "artifacts" / "_prefect").exists()


def test_files_of_stages_that_are_built_already_are_not_needed(monkeypatch, tmp_path):
    """A cached tokenize_corpus does not read its corpus again: its files may be gone."""
    from schemas.loading import load_config
    from stages.run_plan import RunPlan

    monkeypatch.setenv("LMPIPE_ROOT", str(tmp_path))
    overrides = ["tokenize.source=files", 'tokenize.paths=["gone/*.txt"]']
    _stand_in_artifacts("tiny", overrides)
    RunPlan.of(load_config("tiny", None, overrides)).check_input_files()


def test_a_missing_bucket_is_named_before_prefect_starts(s3_server, monkeypatch, capsys, tmp_path):
    from flows.cli import main

    monkeypatch.setenv("LMPIPE_ROOT", "s3://no-such-bucket/lmpipe")
    monkeypatch.setenv("LMPIPE_CACHE", str(tmp_path / "mirror"))
    for command in (["run", "--preset", "tiny"], ["status", "--preset", "tiny"]):
        assert main(command) == 2
        assert "LMPIPE_ROOT=s3://no-such-bucket/lmpipe: bucket 'no-such-bucket' does not exist" in \
            capsys.readouterr().err
    assert not (tmp_path / "mirror" / "_prefect").exists()
    monkeypatch.setenv("LMPIPE_ROOT", "s3://lmpipe-test/fresh-prefix")  # the fixture's bucket: an empty root is fine
    assert main(["status", "--preset", "tiny"]) == 0


def test_parallel_tasks_must_be_at_least_one(monkeypatch, capsys):
    import pytest

    from flows.cli import main
    from flows.task_runners import configured

    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--preset", "tiny", "--parallel-tasks", "0"])
    assert exit_info.value.code == 2
    assert "--parallel-tasks: must be >= 1 (task runs at once), got 0" in capsys.readouterr().err
    monkeypatch.setenv("LMPIPE_PARALLEL_TASKS", "0")
    with pytest.raises(ValueError, match="LMPIPE_PARALLEL_TASKS must be a whole number >= 1, got '0'"):
        configured()
