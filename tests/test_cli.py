"""CLI errors a user meets before anything is built."""


def test_unknown_stage_is_rejected_before_prefect_starts(monkeypatch, capsys, tmp_path):
    from flows.cli import main

    monkeypatch.setenv("LMPIPE_ROOT", str(tmp_path))
    assert main(["run", "--preset", "tiny", "--only", "nosuchstage"]) == 2
    assert "unknown stage 'nosuchstage'" in capsys.readouterr().err
    assert not (tmp_path / "_prefect").exists()  # no Prefect home or server was set up


def test_a_run_with_nothing_to_build_skips_prefect_and_says_cached(monkeypatch, capsys, tmp_path):
    from flows.cli import main
    from schemas.manifest import Manifest
    from schemas.presets import tiny
    from stages.dag import plan
    from storage.artifacts import MANIFEST, SUCCESS

    monkeypatch.setenv("LMPIPE_ROOT", str(tmp_path))
    nodes = plan(tiny())
    for node in nodes.values():  # stand-in finished artifacts under every key of the plan
        node.path().mkdir(parents=True)
        manifest = Manifest(stage=node.stage, key=node.key, path=str(node.path()), code_version=node.code_version,
                            config={}, upstream={}, created_at="2026-01-01T00:00:00")
        (node.path() / MANIFEST).write_text(manifest.model_dump_json())
        (node.path() / SUCCESS).write_text(manifest.created_at)
    assert all(node.is_built() for node in nodes.values())
    assert main(["run", "--preset", "tiny", "--only", "train_target"]) == 0
    out = capsys.readouterr().out
    assert f"0 built, {sum(n.startswith('train_target.') for n in nodes)} cached" in out
    assert not (tmp_path / "_prefect").exists()
