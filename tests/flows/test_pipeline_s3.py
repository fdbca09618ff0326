"""End to end on object storage: the tiny preset built into s3:// (a real S3 API: moto's server), then used
from a second "machine" (an empty local mirror): the run is cached, status, SQL, export and verify work against
the bucket, a flipped byte in the bucket is caught, and score shards one machine finished are reused by another."""

import json
import os
import uuid

import fsspec
import pytest

from schemas.presets import tiny
from stages.dag import plan

pytestmark = pytest.mark.flow


@pytest.fixture(scope="module")
def built(s3_server, prefect_harness, tmp_path_factory):
    """The tiny preset built into a fresh prefix of the test bucket; yields (root URL, first run's result)."""
    from flows.pipeline import pipeline

    url = f"s3://lmpipe-test/{uuid.uuid4().hex[:8]}"
    saved = {name: os.environ.get(name) for name in ("LMPIPE_ROOT", "LMPIPE_CACHE")}
    os.environ.update(LMPIPE_ROOT=url, LMPIPE_CACHE=str(tmp_path_factory.mktemp("first-machine")))
    yield url, pipeline(config=tiny())
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def test_every_node_is_in_the_bucket(built):
    url, _ = built
    bucket = fsspec.filesystem("s3")
    for node in plan(tiny()).values():
        assert bucket.exists(f"{url}/{node.stage}/{node.key}/_SUCCESS"), node.name
    assert not bucket.exists(f"{url}/_tmp") and not bucket.exists(f"{url}/_leases")  # staging and leases cleaned


def test_another_machine_finds_it_cached_queryable_exportable_and_verified(built, tmp_path, monkeypatch, capsys):
    from flows.cli import main

    url, first = built
    monkeypatch.setenv("LMPIPE_CACHE", str(tmp_path / "second-machine"))
    assert main(["run", "--preset", "tiny"]) == 0  # everything cached in the bucket: nothing runs
    assert capsys.readouterr().out.count("cached") >= len(plan(tiny()))
    assert main(["sql", "--preset", "tiny", "--json", "select split, count(*) as n from tokens group by 1"]) == 0
    splits = {"train", "val", "ref_train", "ref_val", "general"}  # general: the tiny teacher's own split
    assert {row["split"] for row in json.loads(capsys.readouterr().out)} == splits
    assert main(["status", "--preset", "tiny"]) == 0
    assert not (tmp_path / "second-machine" / "train_target").exists()  # nothing downloaded so far
    assert main(["export", "--preset", "tiny", "ntp", str(tmp_path / "hf")]) == 0  # fetches the model
    assert (tmp_path / "hf" / "config.json").is_file()
    assert main(["verify"]) == 0
    capsys.readouterr()
    assert main(["doctor"]) == 0
    assert f"{url} (reachable; {len(plan(tiny()))} finished artifacts)" in capsys.readouterr().out


def test_shards_finished_on_one_machine_are_reused_by_another(built, tmp_path, monkeypatch):
    from flows.pipeline import pipeline
    from schemas.loading import load_config
    from stages import node_builder
    from storage.artifacts import open_artifact

    url, _ = built
    cfg = load_config("tiny", overrides=["score.num_shards=3"])
    nodes = plan(cfg)
    node = nodes["score_reference"]
    monkeypatch.setenv("LMPIPE_CACHE", str(tmp_path / "machine-a"))  # a worker that finished one shard, then died
    inputs = {role: open_artifact(nodes[up].stage, nodes[up].key) for role, up in node.upstream.items()}
    done = node_builder.build_shard(node, inputs, "val-001")
    stats = (tmp_path / "machine-a" / "_tmp" / f"{node.stage}-{node.key}" / "part-val-001.json").read_bytes()
    monkeypatch.setenv("LMPIPE_CACHE", str(tmp_path / "machine-b"))
    assert node_builder.shard_done(node, "val-001") and not node_builder.shard_done(node, "val-002")
    result = pipeline(config=cfg, only=["score_reference"])
    final = open_artifact("score_reference", result["score_reference"]["key"])
    assert (tmp_path / "machine-b" / "score_reference" / node.key / "part-val-001.json").read_bytes() == stats
    assert done.endswith("part-val-001.parquet") and len([f for f in final.files if f.path.startswith("part-")]) == 24
    assert not fsspec.filesystem("s3").exists(f"{url}/_tmp/{node.stage}-{node.key}")


def test_a_flipped_byte_in_the_bucket_is_reported(built, capsys):
    from flows.cli import main

    url, first = built
    bucket = fsspec.filesystem("s3")
    vocab = f"{url}/tokenize_corpus/{first['tokenize_corpus']['key']}/vocab.parquet"
    data = bytearray(bucket.cat_file(vocab))
    data[len(data) // 2] ^= 0xFF
    bucket.pipe_file(vocab, bytes(data))
    assert main(["verify"]) == 1
    out = capsys.readouterr().out
    assert f"CORRUPT tokenize_corpus/{first['tokenize_corpus']['key']}" in out and f"{vocab}: sha256 differs" in out
