"""CLI errors a user meets before anything is built."""


def test_unknown_stage_is_rejected_before_prefect_starts(monkeypatch, capsys, tmp_path):
    from flows.cli import main

    monkeypatch.setenv("LMPIPE_ROOT", str(tmp_path))
    assert main(["run", "--preset", "tiny", "--only", "nosuchstage"]) == 2
    assert "unknown stage 'nosuchstage'" in capsys.readouterr().err
    assert not (tmp_path / "_prefect").exists()  # no Prefect home or server was set up
