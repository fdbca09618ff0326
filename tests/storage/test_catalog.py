"""The DuckDB catalog: read-only SQL, and a damaged file breaks only the views that read it."""

from pathlib import Path

import pyarrow as pa
import pytest

from storage.artifacts import SUCCESS
from storage.catalog import TableSpec, check_read_only, connect
from storage.parquet import write_table

SCHEMA = pa.schema([("x", pa.int64())])
TABLES = {"a": TableSpec("stage_a", "a.parquet"), "b": TableSpec("stage_b", "b.parquet")}


def artifact(root: Path, stage: str, key: str, name: str, rows: int) -> Path:
    directory = root / stage / key
    directory.mkdir(parents=True)
    write_table(directory / name, {"x": list(range(rows))}, SCHEMA)
    (directory / SUCCESS).write_text("done\n")
    return directory


def test_a_damaged_file_breaks_only_its_views(tmp_path):
    a = artifact(tmp_path, "stage_a", "k1", "a.parquet", 3)
    b = artifact(tmp_path, "stage_b", "k2", "b.parquet", 4)
    (a / "a.parquet").write_bytes(b"not parquet at all")
    con = connect(TABLES, {}, {"stage_a": a, "stage_b": b}, root=tmp_path)
    assert con.execute("SELECT count(*) FROM b").fetchone()[0] == 4
    assert con.execute("SELECT count(*) FROM b_all").fetchone()[0] == 4
    for view in ("a", "a_all"):
        with pytest.raises(Exception, match="a.parquet, which is not readable Parquet"):
            con.execute(f"SELECT * FROM {view}").fetchall()


def test_statements_that_write_files_are_refused(tmp_path):
    b = artifact(tmp_path, "stage_b", "k2", "b.parquet", 4)
    con = connect(TABLES, {}, {"stage_b": b}, root=tmp_path)
    for sql in (f"COPY (SELECT 1 AS x) TO '{b / 'b.parquet'}' (FORMAT parquet)", "EXPORT DATABASE '/tmp/x'",
                "ATTACH '/tmp/other.db'", "SELECT 1; COPY b TO '/tmp/y.csv'"):
        with pytest.raises(ValueError, match="read-only"):
            check_read_only(con, sql)
    check_read_only(con, "SELECT count(*) FROM b")
    check_read_only(con, "CREATE TEMP TABLE t AS SELECT * FROM b")  # in memory: allowed


def test_cli_sql_refuses_copy_and_reports_bad_sql(tmp_path, monkeypatch, capsys):
    from flows.cli import main

    monkeypatch.setenv("LMPIPE_ROOT", str(tmp_path))
    target = tmp_path / "victim.parquet"
    write_table(target, {"x": [1, 2]}, SCHEMA)
    before = target.read_bytes()
    assert main(["sql", "--preset", "tiny", f"COPY (SELECT 42 AS x) TO '{target}' (FORMAT parquet)"]) == 2
    assert "read-only" in capsys.readouterr().err and target.read_bytes() == before
    assert main(["sql", "--preset", "tiny", "SELEC nonsense"]) == 2
    assert "SQL error" in capsys.readouterr().err
