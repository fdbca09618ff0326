"""Artifacts in object storage (a real S3 API: moto's server): the commit protocol, mirrors checked against the
manifest, verify in the bucket, leases, listing and SQL over the bucket's Parquet files."""

import json
import socket
import threading

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas.configs import ScoreConfig
from storage.artifacts import (
    SUCCESS,
    CorruptArtifactError,
    artifact_key,
    artifact_root,
    is_built,
    iter_manifests,
    materialize,
    open_artifact,
    read_manifest,
    require,
    verify,
)
from storage.catalog import TableSpec, connect
from storage.object_store import LeaseHeldError, ObjectStore
from storage.store import is_url, local_path


def _write(out, rows: int = 3) -> dict:
    pq.write_table(pa.table({"x": list(range(rows))}), out / "t.parquet")
    (out / "notes.txt").write_text("hello")
    return {"rows": rows}


def _build(rows: int = 3, force: bool = False):
    return materialize("toy", "1", ScoreConfig(), {}, lambda out: _write(out, rows), force=force)


def _s3():
    return fsspec.filesystem("s3")


def test_url_roots_are_remote_and_file_urls_local(tmp_path):
    assert is_url("s3://bucket/prefix") and is_url("memory://x") and not is_url("/data/artifacts")
    assert not is_url("file:///data/artifacts") and local_path("file:///data/artifacts").as_posix() == "/data/artifacts"


def test_a_build_lands_in_the_bucket_with_success_written_last(s3_root, tmp_path):
    manifest = _build()
    base = s3_root.removeprefix("s3://") + f"/toy/{manifest.key}"
    objects = _s3().find(base)
    assert sorted(o.rsplit("/", 1)[1] for o in objects) == [SUCCESS, "manifest.json", "notes.txt", "t.parquet"]
    # the commit marker is the newest object: nothing of the artifact is written after it
    stamps = {o.rsplit("/", 1)[1]: _s3().info(o)["LastModified"] for o in objects}
    assert stamps[SUCCESS] == max(stamps.values())
    assert is_built("toy", manifest.key) and artifact_root() == (tmp_path / "mirror").resolve()
    assert read_manifest("toy", manifest.key).path == f"{s3_root}/toy/{manifest.key}"
    assert [m.key for m in iter_manifests()] == [manifest.key] and verify(read_manifest("toy", manifest.key)) == []


def test_a_second_machine_reuses_the_bucket_and_fetches_a_checked_mirror(s3_root, tmp_path, monkeypatch):
    built = _build()
    monkeypatch.setenv("LMPIPE_CACHE", str(tmp_path / "other-machine"))
    calls = []
    again = materialize("toy", "1", ScoreConfig(), {}, lambda out: calls.append(out))
    assert not calls and again.key == built.key  # cached in the bucket: nothing rebuilt
    assert not (tmp_path / "other-machine" / "toy").exists()  # a cached run downloads nothing
    local = open_artifact("toy", built.key)
    assert local.path == str(tmp_path / "other-machine" / "toy" / built.key)
    assert pq.read_table(f"{local.path}/t.parquet")["x"].to_pylist() == [0, 1, 2]
    assert require("toy", built.key, built_by="x").key == built.key


def test_a_flipped_byte_in_the_bucket_is_caught_by_verify_and_by_a_fetch(s3_root, tmp_path, monkeypatch):
    manifest = _build()
    path = s3_root.removeprefix("s3://") + f"/toy/{manifest.key}/notes.txt"
    _s3().pipe_file(path, b"hellp")
    problems = verify(read_manifest("toy", manifest.key))
    assert len(problems) == 1 and "notes.txt: sha256 differs" in problems[0] and problems[0].startswith("s3://")
    monkeypatch.setenv("LMPIPE_CACHE", str(tmp_path / "fresh"))
    with pytest.raises(CorruptArtifactError, match="notes.txt: size or sha256 differs.*--force toy"):
        open_artifact("toy", manifest.key)
    assert not (tmp_path / "fresh" / "toy" / manifest.key).exists()  # nothing half-fetched is left as a mirror


def test_a_forced_rebuild_replaces_the_objects_and_refreshes_stale_mirrors(s3_root, tmp_path):
    first = _build(rows=3)
    open_artifact("toy", first.key)  # mirrored
    second = _build(rows=5, force=True)
    assert second.key == first.key and verify(read_manifest("toy", first.key)) == []
    local = open_artifact("toy", first.key)
    assert pq.read_table(f"{local.path}/t.parquet").num_rows == 5


def test_a_lease_held_by_another_host_refuses_the_build(s3_root):
    lease = s3_root.removeprefix("s3://") + "/_leases/toy-"
    key = artifact_key("toy", "1", ScoreConfig(), {})
    _s3().pipe_file(lease + f"{key}.json", json.dumps({"host": "other-box", "pid": 7, "started": "now"}).encode())
    with pytest.raises(LeaseHeldError, match="being built on host other-box.*delete s3://"):
        _build()
    assert not is_built("toy", key)
    _s3().pipe_file(lease + f"{key}.json", json.dumps({"host": socket.gethostname(), "pid": 7}).encode())
    _build()  # a lease of this host is a dead build of it (this host's lock is free): taken over
    assert is_built("toy", key) and not _s3().exists(lease + f"{key}.json")


def test_of_machines_racing_for_one_key_exactly_one_gets_the_lease(s3_root):
    """The lease is an exclusive create in the bucket (S3's conditional PUT), not a check and then a write."""
    key = artifact_key("toy", "1", ScoreConfig(), {})
    racers = 6
    start, holding = threading.Barrier(racers), threading.Barrier(racers, timeout=30)
    outcomes = []

    def race(host: str) -> None:
        store = ObjectStore(s3_root)
        store.host = host
        start.wait()
        try:
            with store.lease("toy", key):
                outcomes.append(host)
                holding.wait()  # everyone has tried while the winner still holds it
        except LeaseHeldError:
            outcomes.append(None)
            holding.wait()

    threads = [threading.Thread(target=race, args=(f"box-{i}",)) for i in range(racers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(outcomes) == racers and sum(o is not None for o in outcomes) == 1
    assert not _s3().exists(s3_root.removeprefix("s3://") + f"/_leases/toy-{key}.json")  # released


def test_a_listing_does_not_hide_what_another_machine_publishes_later(s3_root):
    _build()
    store = ObjectStore(s3_root)
    assert [stage for stage, _ in store.finished()] == ["toy"]  # a listing of the bucket
    other_machine = fsspec.filesystem("s3", skip_instance_cache=True)
    other_machine.pipe_file(store.path("toy", "0123456789abcdef", SUCCESS), b"later")
    assert store.is_finished("toy", "0123456789abcdef") and len(store.finished()) == 2


def test_sql_reads_the_parquet_files_in_the_bucket(s3_root, tmp_path, monkeypatch):
    manifest = _build(rows=4)
    monkeypatch.setenv("LMPIPE_CACHE", str(tmp_path / "reader"))  # another machine: no local copy
    con = connect({"t": TableSpec("toy", "t.parquet")}, {}, {"toy": artifact_root() / "toy" / manifest.key})
    assert con.execute("SELECT count(*), sum(x) FROM t").fetchone() == (4, 6)
    assert con.execute("SELECT DISTINCT artifact_key FROM t_all").fetchall() == [(manifest.key,)]
    assert not (artifact_root() / "toy").exists()  # read in the bucket, not through a mirror


def test_an_upload_cut_short_is_finished_without_rebuilding(s3_root):
    manifest = _build()
    base = s3_root.removeprefix("s3://") + f"/toy/{manifest.key}"
    _s3().rm([f"{base}/{SUCCESS}", f"{base}/manifest.json", f"{base}/t.parquet"])  # killed mid-upload
    assert not is_built("toy", manifest.key)
    calls = []
    again = materialize("toy", "1", ScoreConfig(), {}, lambda out: calls.append(out))
    assert not calls and again.created_at == manifest.created_at  # the local copy was uploaded, not rebuilt
    assert is_built("toy", manifest.key) and verify(read_manifest("toy", manifest.key)) == []
