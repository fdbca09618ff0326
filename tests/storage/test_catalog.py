"""The DuckDB catalog: read-only SQL; a damaged file is refused and breaks only the views that read it; the
verification cache; what a query on an unbuilt view says; the sandbox; a full spill disk."""

import subprocess
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest
from pydantic import BaseModel

import storage.checked_files
from storage.artifacts import materialize
from storage.catalog import JoinView, TableSpec, UnavailableViewError, check_read_only, connect
from storage.checked_files import CACHE
from storage.parquet import write_table

SCHEMA = pa.schema([("x", pa.int64())])
TABLES = {"a": TableSpec("stage_a", "a.parquet"), "b": TableSpec("stage_b", "b.parquet")}
VIEWS = {"ab": JoinView(frozenset({"a", "b"}), "SELECT * FROM a JOIN b USING (x)"),
         "b_doubled": JoinView(frozenset({"b"}), "SELECT 2 * x AS x FROM b")}


class Rows(BaseModel):
    """The config of a test artifact: how many rows its table has."""

    rows: int


def artifact(root: Path, stage: str, name: str, rows: int) -> Path:
    """A finished artifact (manifest with sizes and sha256s, _SUCCESS) holding one Parquet table; its dir."""
    def build(out: Path) -> None:
        write_table(out / name, {"x": list(range(rows))}, SCHEMA)

    return Path(materialize(stage, "1", Rows(rows=rows), {}, build, root=root).path)


def both(root: Path) -> tuple[Path, Path, dict[str, Path]]:
    a, b = artifact(root, "stage_a", "a.parquet", 300), artifact(root, "stage_b", "b.parquet", 4)
    return a, b, {"stage_a": a, "stage_b": b}


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def assert_the_rest_works(con) -> None:
    assert con.execute("SELECT count(*) FROM b").fetchone()[0] == 4
    assert con.execute("SELECT count(*) FROM b_all").fetchone()[0] == 4
    assert con.execute("SELECT sum(x) FROM b_doubled").fetchone()[0] == 12


def test_a_flipped_byte_is_refused_naming_the_artifact_the_file_and_the_fix(tmp_path):
    a, b, current = both(tmp_path)
    flip_a_byte(a / "a.parquet")  # same size: only the sha256 tells
    con = connect(TABLES, VIEWS, current, root=tmp_path)
    for view in ("a", "a_all", "ab"):
        with pytest.raises(UnavailableViewError) as caught:
            con.execute(f"SELECT split, count(*) FROM {view} GROUP BY 1")
        message = str(caught.value)
        assert f"view {view} is refused" in message and f"stage_a/{a.name}" in message
        assert f"{a / 'a.parquet'}: sha256 differs" in message and "lmpipe run --force stage_a" in message
        assert "\n" not in message
    assert_the_rest_works(con)
    [warning] = con.warnings()
    assert warning.startswith("views a_all, a, ab unavailable:") and "a.parquet" in warning


def test_a_truncated_file_breaks_only_the_views_that_read_it(tmp_path):
    a, b, current = both(tmp_path)
    (a / "a.parquet").write_bytes((a / "a.parquet").read_bytes()[:100])
    con = connect(TABLES, VIEWS, current, root=tmp_path)
    assert_the_rest_works(con)
    for view in ("a", "a_all", "ab"):
        with pytest.raises(UnavailableViewError, match=r"a\.parquet has 100 bytes, its manifest says \d+"):
            con.execute(f"SELECT x FROM {view}")


def test_a_file_missing_from_the_manifest_or_a_lost_manifest_is_refused(tmp_path):
    a, b, current = both(tmp_path)
    write_table(b / "b-extra.parquet", {"x": [1]}, SCHEMA)
    (a / "manifest.json").unlink()
    tables = TABLES | {"b": TableSpec("stage_b", "b*.parquet")}
    con = connect(tables, {}, current, root=tmp_path)
    with pytest.raises(UnavailableViewError, match="b-extra.parquet is not listed in its manifest"):
        con.execute("SELECT * FROM b")
    with pytest.raises(UnavailableViewError, match="manifest.json is missing or unreadable"):
        con.execute("SELECT * FROM a")


def test_the_verification_cache_spares_a_second_hash(tmp_path, monkeypatch):
    a, b, current = both(tmp_path)
    hashed = []
    verify = storage.checked_files.verify
    monkeypatch.setattr(storage.checked_files, "verify", lambda m: hashed.extend(f.path for f in m.files) or verify(m))
    connect(TABLES, VIEWS, current, root=tmp_path)
    assert sorted(hashed) == ["a.parquet", "b.parquet"]  # once each, though two views read each
    assert (tmp_path / CACHE).is_file()
    connect(TABLES, VIEWS, current, root=tmp_path).execute("SELECT * FROM ab").fetchall()
    assert len(hashed) == 2  # unchanged files: sizes checked, nothing re-hashed
    (b / "b.parquet").touch()  # a new mtime: hashed again
    connect(TABLES, VIEWS, current, root=tmp_path)
    assert hashed[2:] == ["b.parquet"]


def test_views_that_are_not_built_name_what_to_run(tmp_path):
    nothing = connect(TABLES, VIEWS, {"stage_a": tmp_path / "none" / "stage_a" / "k"}, root=tmp_path / "none")
    for view in ("a", "a_all", "ab"):
        with pytest.raises(UnavailableViewError, match="nothing is built yet under .*none: run `lmpipe run --preset "
                           "tiny`"):
            nothing.execute(f"SELECT * FROM {view}")
    assert nothing.execute("SELECT 42").fetchone() == (42,)
    b = artifact(tmp_path, "stage_b", "b.parquet", 4)
    con = connect(TABLES, VIEWS, {"stage_a": tmp_path / "stage_a" / "0123456789abcdef", "stage_b": b}, root=tmp_path)
    with pytest.raises(UnavailableViewError, match="stage stage_a is not built for this config yet: run `lmpipe run`"):
        con.execute("SELECT * FROM a")
    with pytest.raises(UnavailableViewError, match="view ab reads a; view a: stage stage_a is not built"):
        con.execute("SELECT * FROM ab")
    with pytest.raises(UnavailableViewError, match="no stage_a artifact is built under"):
        con.execute("SELECT * FROM a_all")
    assert con.execute("SELECT count(*) FROM b").fetchone()[0] == 4 and con.warnings() == []


def test_sandbox_reads_the_artifacts_and_nothing_else(tmp_path):
    a, b, current = both(tmp_path)
    assert connect(TABLES, {}, current, root=tmp_path).execute("SELECT count(*) FROM read_csv('/etc/passwd')")
    con = connect(TABLES, VIEWS, current, root=tmp_path, sandbox=True)
    assert con.execute("SELECT count(*) FROM ab").fetchone()[0] == 4
    assert con.execute(f"SELECT count(*) FROM read_parquet('{b}/*.parquet')").fetchone()[0] == 4
    for sql in ("SELECT * FROM read_csv('/etc/passwd')", f"SELECT * FROM read_text('{tmp_path / CACHE}')",
                f"SELECT * FROM read_text('{b}/../../_cache/verified.json')", "INSTALL httpfs", "LOAD httpfs",
                "SELECT * FROM read_parquet('https://example.com/x.parquet')", "SET enable_external_access = true",
                "CREATE PERSISTENT SECRET s (TYPE s3, KEY_ID 'k', SECRET 's')"):
        with pytest.raises(duckdb.Error):
            con.execute(sql)


def test_a_full_spill_disk_is_one_line_naming_it(tmp_path):
    spill_disk = tmp_path / "_tmp"
    spill_disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(spill_disk)],
                             capture_output=True).returncode == 0
    try:
        con = connect(TABLES, {}, root=tmp_path)
        con.execute("SET memory_limit = '8MB'")
        con.execute("SET threads = 1")
        if not mounted:  # no permission to mount: the same condition through DuckDB's own cap
            con.execute("SET max_temp_directory_size = '1MB'")
        with pytest.raises(ValueError) as caught:
            con.rows("SELECT count(*) FROM (SELECT md5(i::VARCHAR) AS m FROM range(400000) t(i) ORDER BY m)")
        message = str(caught.value)
        assert "the query ran out of memory (" in message and f"spills to {spill_disk}" in message
        assert "\n" not in message
        con.close()
    finally:
        if mounted:
            subprocess.run(["umount", str(spill_disk)], check=True)


def test_an_object_store_root_gets_size_checks_and_a_sandbox_over_the_bucket(tmp_path, monkeypatch):
    import uuid

    import fsspec

    from storage.artifacts import artifact_root, artifact_store

    monkeypatch.setenv("LMPIPE_ROOT", f"memory://catalog-{uuid.uuid4().hex[:8]}")
    monkeypatch.setenv("LMPIPE_CACHE", str(tmp_path / "mirror"))
    key = artifact(artifact_root(), "stage_a", "a.parquet", 30).name
    current = {"stage_a": artifact_root() / "stage_a" / key}
    con = connect(TABLES, {}, current, sandbox=True)
    assert con.execute("SELECT count(*) FROM a").fetchone()[0] == 30
    with pytest.raises(duckdb.Error):
        con.execute("SELECT * FROM read_csv('/etc/passwd')")
    bucket, name = fsspec.filesystem("memory"), artifact_store().path("stage_a", key, "a.parquet")
    bucket.pipe_file(name, bucket.cat_file(name)[:50])
    with pytest.raises(UnavailableViewError, match=r"memory://.*/a\.parquet has 50 bytes"):
        connect(TABLES, {}, current).execute("SELECT * FROM a")


def test_statements_that_write_files_are_refused(tmp_path):
    b = artifact(tmp_path, "stage_b", "b.parquet", 4)
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
