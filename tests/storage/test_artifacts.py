"""Artifact store: keys, atomic builds, forced rebuilds, locks between processes, verify."""

import multiprocessing as mp
import time
from pathlib import Path

import pytest

from schemas.configs import ScoreConfig
from schemas.manifest import Manifest
from storage.artifacts import (
    SUCCESS,
    MissingArtifactError,
    artifact_key,
    is_built,
    iter_manifests,
    load_manifest,
    materialize,
    require,
    verify,
)


def _write(out: Path, text: str = "hello") -> dict:
    (out / "data.txt").write_text(text)
    return {"chars": len(text)}


def _upstream(key: str) -> Manifest:
    return Manifest(stage="up", key=key, path="/x", code_version="1", config={}, upstream={})


def test_key_changes_with_config_code_and_upstream_only():
    base = artifact_key("s", "1", ScoreConfig(), {"tokens": "a"})
    assert base == artifact_key("s", "1", ScoreConfig(), {"tokens": "a"})
    assert base != artifact_key("s", "2", ScoreConfig(), {"tokens": "a"})
    assert base != artifact_key("s", "1", ScoreConfig(batch_size=7), {"tokens": "a"})
    assert base != artifact_key("s", "1", ScoreConfig(), {"tokens": "b"})
    assert base != artifact_key("t", "1", ScoreConfig(), {"tokens": "a"})


def test_materialize_writes_manifest_and_success(tmp_path):
    manifest = materialize("s", "1", ScoreConfig(), {"tokens": _upstream("a")}, _write, root=tmp_path)
    path = Path(manifest.path)
    assert (path / SUCCESS).exists() and (path / "data.txt").read_text() == "hello"
    assert load_manifest(path) == manifest
    assert manifest.upstream == {"tokens": "a"} and manifest.summary == {"chars": 5}
    assert [f.path for f in manifest.files] == ["data.txt"]
    assert not (tmp_path / "_tmp" / f"s-{manifest.key}").exists()


def test_temp_files_of_a_killed_attempt_are_not_part_of_the_artifact(tmp_path):
    """A build resumed after kill -9 (e.g. scoring shards) finds the killed writer's temporary files in its work
    dir: they are removed, not listed in the manifest (found by the fault suite)."""

    def build(out: Path) -> dict:
        (out / "shards").mkdir()
        (out / "shards" / ".part-000.parquet.4242-0123abcd.tmp").write_bytes(b"half a shard")
        (out / ".keep.tmp").write_text("not ours: kept")
        return _write(out)

    manifest = materialize("s", "1", ScoreConfig(), {}, build, root=tmp_path)
    assert sorted(f.path for f in manifest.files) == [".keep.tmp", "data.txt"]
    assert not (Path(manifest.path) / "shards" / ".part-000.parquet.4242-0123abcd.tmp").exists()


def test_raising_build_leaves_no_artifact(tmp_path):
    def explode(out: Path):
        (out / "half.txt").write_text("partial")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        materialize("s", "1", ScoreConfig(), {}, explode, root=tmp_path)
    key = artifact_key("s", "1", ScoreConfig(), {})
    assert not is_built("s", key, tmp_path)
    assert not (tmp_path / "s" / key).exists()
    assert list(iter_manifests(tmp_path)) == []


def test_cached_build_is_not_rerun_and_deleted_artifact_is_rebuilt(tmp_path):
    calls = []
    build = lambda out: calls.append(1) or _write(out)  # noqa: E731
    first = materialize("s", "1", ScoreConfig(), {}, build, root=tmp_path)
    materialize("s", "1", ScoreConfig(), {}, build, root=tmp_path)
    assert len(calls) == 1
    (Path(first.path) / SUCCESS).unlink()
    materialize("s", "1", ScoreConfig(), {}, build, root=tmp_path)
    assert len(calls) == 2


def test_failed_forced_rebuild_keeps_the_finished_artifact(tmp_path):
    first = materialize("s", "1", ScoreConfig(), {}, _write, root=tmp_path)

    def explode(out: Path):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        materialize("s", "1", ScoreConfig(), {}, explode, root=tmp_path, force=True)
    assert load_manifest(Path(first.path)) == first
    assert verify(first) == []
    rebuilt = materialize("s", "1", ScoreConfig(), {}, lambda out: _write(out, "new"), root=tmp_path, force=True)
    assert (Path(rebuilt.path) / "data.txt").read_text() == "new"


def test_verify_catches_a_flipped_byte(tmp_path):
    manifest = materialize("s", "1", ScoreConfig(), {}, _write, root=tmp_path)
    data = Path(manifest.path) / "data.txt"
    data.write_bytes(b"jello")
    problems = verify(manifest)
    assert len(problems) == 1 and "sha256" in problems[0]


def test_require_names_the_command(tmp_path):
    with pytest.raises(MissingArtifactError, match="lmpipe run --only tokenize_corpus"):
        require("tokenize_corpus", "abc", built_by="lmpipe run --only tokenize_corpus", root=tmp_path)


def _slow_builder(root: str, log_path: str) -> None:
    def build(out: Path):
        with open(log_path, "a") as log:
            log.write("start\n")
        time.sleep(0.5)
        with open(log_path, "a") as log:
            log.write("end\n")
        return _write(out)

    materialize("s", "1", ScoreConfig(), {}, build, root=Path(root))


def test_concurrent_builders_do_not_clobber(tmp_path):
    log_path = tmp_path / "log.txt"
    ctx = mp.get_context("spawn")  # fork is unsafe once prefect threads run in the process
    procs = [ctx.Process(target=_slow_builder, args=(str(tmp_path), str(log_path))) for _ in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(30)
        assert proc.exitcode == 0
    # the lock serialises builders and the second one finds the finished artifact: one build in all
    assert log_path.read_text() == "start\nend\n"
    (manifest,) = list(iter_manifests(tmp_path))
    assert verify(manifest) == []


def test_a_copied_or_moved_root_keeps_working(tmp_path):
    import shutil

    manifest = materialize("s", "1", ScoreConfig(), {}, _write, root=tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "copy")
    (tmp_path / "copy" / "s" / manifest.key / "data.txt").write_text("HELLO")  # edit only the copy
    copied = load_manifest(tmp_path / "copy" / "s" / manifest.key)
    assert copied.path == str((tmp_path / "copy" / "s" / manifest.key).resolve())
    assert verify(copied) and not verify(load_manifest(Path(manifest.path)))  # each checks its own files
    shutil.move(tmp_path / "a", tmp_path / "moved")
    moved = next(iter_manifests(tmp_path / "moved"))
    assert verify(moved) == [] and Path(moved.path).parent.parent == (tmp_path / "moved").resolve()


def test_a_missing_manifest_is_reported_and_the_rest_still_checked(tmp_path):
    from storage.artifacts import CorruptArtifactError

    first = materialize("s", "1", ScoreConfig(), {}, _write, root=tmp_path)
    materialize("s", "2", ScoreConfig(), {}, _write, root=tmp_path)
    (Path(first.path) / "manifest.json").unlink()
    found = list(iter_manifests(tmp_path))
    assert len(found) == 2 and sum(isinstance(f, CorruptArtifactError) for f in found) == 1
    with pytest.raises(MissingArtifactError, match="does not exist"):
        list(iter_manifests(tmp_path / "nope"))


def test_verify_and_export_cli_errors(tmp_path, monkeypatch, capsys):
    from flows.cli import main

    monkeypatch.setenv("LMPIPE_ROOT", str(tmp_path / "nope"))
    assert main(["verify"]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("keep")
    model = materialize("train_target", "1", ScoreConfig(), {}, _write, root=tmp_path / "nope")
    assert main(["export", model.path, str(tmp_path / "full")]) == 2
    assert "not empty" in capsys.readouterr().err and (tmp_path / "full" / "mine.txt").read_text() == "keep"


def test_a_failed_build_with_nothing_written_leaves_no_build_dir(tmp_path):
    def fail(out: Path):
        raise ValueError("bad input")

    with pytest.raises(ValueError):
        materialize("s", "1", ScoreConfig(), {}, fail, root=tmp_path)
    assert list((tmp_path / "_tmp").iterdir()) == []


def test_a_corrupt_upstream_is_refused_before_a_build_uses_it(tmp_path):
    from storage.artifacts import CorruptArtifactError

    up = materialize("up", "1", ScoreConfig(), {}, _write, root=tmp_path)
    data = Path(up.path) / "data.txt"
    data.write_text("jello")  # same size, different bytes
    used = []
    with pytest.raises(CorruptArtifactError, match=r"upstream tokens \(up/.*sha256.*lmpipe run --force up"):
        materialize("down", "1", ScoreConfig(), {"tokens": up}, lambda out: used.append(out), root=tmp_path)
    assert not used and list((tmp_path / "_tmp").iterdir()) == []
    data.write_text("hello")
    materialize("down", "1", ScoreConfig(), {"tokens": up}, _write, root=tmp_path)  # intact again: builds


def test_generate_refuses_a_corrupt_model(tmp_path, monkeypatch, capsys):
    from flows.cli import main
    from schemas.configs import ModelConfig
    from stages.models.gpt import GPT
    from storage.checkpoints import save_model

    def build(out: Path):
        save_model(out, GPT(ModelConfig(num_layers=1, num_heads=2, d_model=16), 32, 8), {})
        return {}

    model = materialize("train_target", "1", ScoreConfig(), {}, build, root=tmp_path)
    weights = Path(model.path) / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0xFF
    weights.write_bytes(bytes(raw))
    monkeypatch.setenv("LMPIPE_ROOT", str(tmp_path))
    assert main(["generate", "--model", model.path, "--prompt", "x"]) == 2
    assert "is corrupt" in capsys.readouterr().err


def test_a_downstream_built_from_since_changed_upstream_content_is_stale_and_rebuilt(tmp_path, monkeypatch, capsys):
    """--force on an upstream that then writes other bytes makes its downstream stale: verify says so, the next
    build of the downstream rebuilds it; a byte-identical rebuild of the upstream changes nothing."""
    from flows.cli import main
    from storage.artifacts import chain_problems, content_digest

    up = materialize("up", "1", ScoreConfig(), {}, _write, root=tmp_path)
    builds = []

    def down_build(out: Path) -> dict:
        builds.append(out)
        return _write(out, (Path(up_now.path) / "data.txt").read_text() + "!")

    up_now = up
    down = materialize("down", "1", ScoreConfig(), {"tokens": up}, down_build, root=tmp_path)
    assert down.upstream_refs["tokens"].digest == content_digest(up) and len(builds) == 1
    same = materialize("up", "1", ScoreConfig(), {}, _write, root=tmp_path, force=True)  # identical bytes
    assert content_digest(same) == content_digest(up) and chain_problems(down, tmp_path) == []
    assert materialize("down", "1", ScoreConfig(), {"tokens": same}, down_build, root=tmp_path).key == down.key
    assert len(builds) == 1  # not stale: nothing rebuilt

    up_now = materialize("up", "1", ScoreConfig(), {}, lambda out: _write(out, "other"), root=tmp_path, force=True)
    assert chain_problems(down, tmp_path)[0].startswith("stale: upstream tokens (up/")
    monkeypatch.setenv("LMPIPE_ROOT", str(tmp_path))
    assert main(["verify"]) == 1 and "STALE" in capsys.readouterr().out
    rebuilt = materialize("down", "1", ScoreConfig(), {"tokens": up_now}, down_build, root=tmp_path)
    assert len(builds) == 2 and (Path(rebuilt.path) / "data.txt").read_text() == "other!"
    assert chain_problems(rebuilt, tmp_path) == [] and main(["verify"]) == 0
