"""Tests of reading users' files (stages/corpus/files.py, metadata.py): text units, metadata columns, README example."""

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas.loading import load_config
from stages import tokenize_corpus
from stages.corpus.documents import concat_batches
from stages.corpus.files import FileSettings, MissingFileError, file_batches, read_documents, read_files, split_text
from stages.corpus.metadata import conform

README = Path(__file__).resolve().parents[3] / "README.md"
WORDS = "the people of the union congress budget freedom war peace nation economy schools roads liberty".split()

TEXT = "First para, line one.\n  still first.\n\n \t\nSecond para.\r\n\r\n\r\nThird.\n\n"
"""Three paragraphs (separated by an empty line, by whitespace-only lines and by CRLF blank lines)."""


def _words(seed: int, num_words: int = 50) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(WORDS[j] for j in rng.integers(0, len(WORDS), num_words)) + "."


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_split_text_units():
    assert split_text(TEXT, "file") == [(None, TEXT)]
    assert split_text(TEXT, "paragraph") == [(0, "First para, line one.\n  still first."), (1, "Second para."),
                                             (2, "Third.")]
    assert split_text(TEXT, "line") == [(0, "First para, line one."), (1, "  still first."), (4, "Second para."),
                                        (7, "Third.")]
    assert split_text("\n \n", "paragraph") == [] and split_text("\n \n", "line") == []


@pytest.mark.parametrize(("unit", "sources", "rows"), [
    ("file", ["files:{p}"], [None]),
    ("paragraph", ["files:{p}:p0", "files:{p}:p1", "files:{p}:p2"], [0, 1, 2]),
    ("line", ["files:{p}:l0", "files:{p}:l1", "files:{p}:l4", "files:{p}:l7"], [0, 1, 4, 7]),
])
def test_txt_documents_have_stable_source_ids_and_rows(tmp_path: Path, unit, sources, rows):
    path = tmp_path / "notes.txt"
    path.write_bytes(TEXT.encode())
    corpus = read_documents([str(path)], FileSettings(text_unit=unit))
    assert corpus.texts == [text for _, text in split_text(TEXT, unit)]
    assert corpus.sources == [s.format(p="notes.txt") for s in sources]
    assert corpus.metadata.column_names == ["path", "row"] and corpus.metadata["row"].to_pylist() == rows


def test_jsonl_and_parquet_fields_become_columns_union_with_nulls(tmp_path: Path):
    _jsonl(tmp_path / "a.jsonl", [{"text": "a0", "quality": "high", "year": 2001},
                                  {"text": "a1", "year": 2002.5, "ok": True},
                                  {"text": "a2", "quality": None, "tags": ["x", 1], "info": {"k": [1, 2]}}])
    pq.write_table(pa.table({"score": [0.5, None], "text": ["b0", "b1"], "quality": ["low", "high"]}),
                   tmp_path / "b.parquet")
    (tmp_path / "c.txt").write_text("c0")
    corpus = read_files([str(tmp_path / "a.jsonl"), str(tmp_path / "b.parquet"), str(tmp_path / "c.txt")])
    meta = corpus.metadata
    assert meta.column_names == ["path", "row", "quality", "year", "ok", "tags", "info", "score"]
    assert [meta.schema.field(n).type for n in meta.column_names[2:]] == [
        pa.string(), pa.float64(), pa.bool_(), pa.string(), pa.string(), pa.float64()]  # int + float -> float
    rows = meta.to_pylist()
    assert [r["quality"] for r in rows] == ["high", None, None, "low", "high", None]
    assert [r["year"] for r in rows] == [2001.0, 2002.5, None, None, None, None]
    assert [r["ok"] for r in rows] == [None, True, None, None, None, None]
    assert rows[2]["tags"] == '["x", 1]' and json.loads(rows[2]["info"]) == {"k": [1, 2]}  # nested -> JSON text
    assert [r["score"] for r in rows] == [None, None, None, 0.5, None, None]
    assert corpus.texts == ["a0", "a1", "a2", "b0", "b1", "c0"]


def test_field_type_conflict_names_file_line_and_field(tmp_path: Path):
    _jsonl(tmp_path / "a.jsonl", [{"text": "a", "year": 2001}])
    _jsonl(tmp_path / "b.jsonl", [{"text": "b", "year": 2002}, {"text": "c", "year": "2003"}])
    pattern = re.escape(f"tokenize.paths: {tmp_path / 'b.jsonl'}:2: field 'year' is str ('2003') but int at "
                        f"{tmp_path / 'a.jsonl'}:1; give the field one type")
    with pytest.raises(ValueError, match=pattern):
        read_files([str(tmp_path / "*.jsonl")])
    pq.write_table(pa.table({"text": ["d"], "year": [True]}), tmp_path / "d.parquet")
    with pytest.raises(ValueError, match=r"d\.parquet row 0: field 'year' is bool \(True\) but int"):
        read_files([str(tmp_path / "a.jsonl"), str(tmp_path / "d.parquet")])


def test_fields_named_like_documents_columns_are_renamed(tmp_path: Path):
    _jsonl(tmp_path / "a.jsonl", [{"text": "a", "split": "dev", "Source": "web", "row": 7, "num_tokens": 3}])
    meta = read_files([str(tmp_path / "a.jsonl")]).metadata
    assert meta.column_names == ["path", "row", "meta_split", "meta_Source", "meta_row", "meta_num_tokens"]
    assert meta.to_pylist()[0] == {"path": str(tmp_path / "a.jsonl"), "row": 0, "meta_split": "dev",
                                   "meta_Source": "web", "meta_row": 7, "meta_num_tokens": 3}
    _jsonl(tmp_path / "b.jsonl", [{"text": "b", "split": "dev", "meta_split": "x"}])
    with pytest.raises(ValueError, match="field 'split' is a documents column, so it is renamed 'meta_split', but "
                                         "the files also have a field 'meta_split'; rename one"):
        read_files([str(tmp_path / "b.jsonl")])


def test_metadata_columns_reach_the_documents_table(tmp_path: Path):
    _jsonl(tmp_path / "a.jsonl", [{"text": _words(i), "quality": ["high", "low"][i % 2], "split": "x"}
                                  for i in range(24)])
    cfg = load_config("tiny", overrides=["tokenize.source=files", f'tokenize.paths=["{tmp_path}/a.jsonl"]',
                                         "tokenize.seq_len=8", "tokenize.documents_where=quality = 'high'",
                                         "tokenize.reference_where=meta_split = 'x' AND (doc_id % 2 = 0 OR "
                                         "split = 'val')"]).tokenize
    tokenize_corpus.run(cfg, {}, tmp_path / "out")
    docs = pq.read_table(tmp_path / "out" / "documents.parquet").to_pylist()
    assert len(docs) == 12 and {d["quality"] for d in docs} == {"high"} and {d["meta_split"] for d in docs} == {"x"}
    assert [d["is_reference"] for d in docs] == [d["doc_id"] % 2 == 0 or d["split"] == "val" for d in docs]


def test_missing_empty_and_unsupported_files_are_clear_value_errors(tmp_path: Path):
    with pytest.raises(MissingFileError, match=r"tokenize\.paths: '.*nope\.txt': file does not exist"):
        read_documents([str(tmp_path / "nope.txt")])
    assert issubclass(MissingFileError, ValueError) and issubclass(MissingFileError, FileNotFoundError)
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match=r"blank\.txt'\] has no non-empty document"):
        read_documents([str(tmp_path / "blank.txt")], FileSettings(text_unit="paragraph"))


def readme_config_block() -> str:
    """The README's example config file (the ```toml block with source = "files")."""
    blocks = re.findall(r"```toml\n(.*?)```", README.read_text(), flags=re.S)
    return next(block for block in blocks if 'source = "files"' in block)


def test_readme_config_example_runs_on_the_tiny_preset(tmp_path: Path, monkeypatch):
    """The README's config file, as written (relative data/*.jsonl), on top of `tiny`: the preset's sotu
    filters are dropped, `quality` is a documents column and selects the reference subset."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    qualities = ["high", "low", None]
    _jsonl(tmp_path / "data" / "corpus.jsonl",
           [{"text": _words(i, 80)} | ({} if qualities[i % 3] is None else {"quality": qualities[i % 3]})
            for i in range(36)])
    (tmp_path / "my.toml").write_text(readme_config_block())
    cfg = load_config(preset_name="tiny", path=tmp_path / "my.toml")
    assert cfg.tokenize.documents_where is None and cfg.tokenize.reference_where == "quality = 'high'"
    summary = tokenize_corpus.run(cfg.tokenize, {}, tmp_path / "out")
    docs = pq.read_table(tmp_path / "out" / "documents.parquet").to_pylist()
    assert summary["num_documents"] == len(docs) == 36
    assert [d["quality"] for d in docs] == [qualities[i % 3] for i in range(36)]
    assert [d["is_reference"] for d in docs] == [d["quality"] == "high" for d in docs]
    assert all(summary["num_documents_per_split"][split] > 0 for split in ("train", "val", "ref_train", "ref_val"))


def test_field_type_conflict_across_batches_names_both_locations(tmp_path: Path):
    """The type of a field is remembered across batches: the conflict in the third document names the record of
    the first one-document batch, already read and passed on."""
    _jsonl(tmp_path / "a.jsonl", [{"text": "a", "year": 2001}, {"text": "b"}])
    _jsonl(tmp_path / "b.jsonl", [{"text": "c", "year": "2003"}])
    batches = []
    pattern = re.escape(f"tokenize.paths: {tmp_path / 'b.jsonl'}:1: field 'year' is str ('2003') but int at "
                        f"{tmp_path / 'a.jsonl'}:1; give the field one type")
    with pytest.raises(ValueError, match=pattern):
        for batch in file_batches([str(tmp_path / "*.jsonl")], batch_bytes=1):
            batches.append(batch)
    assert [batch.texts for batch in batches] == [["a"]]


def test_batches_give_the_whole_corpus_metadata(tmp_path: Path):
    """Fields typed only in later batches (null-only at first, int before float) get the whole corpus's types
    once the batches are conformed, and empty documents are dropped in any batch."""
    _jsonl(tmp_path / "a.jsonl", [{"text": "a0", "score": 1, "tag": None}, {"text": " "}, {"text": "a2", "score": 2}])
    _jsonl(tmp_path / "b.jsonl", [{"text": "b0", "score": 0.5, "tag": "x"}, {"text": "b1", "extra": True}])
    patterns = [str(tmp_path / "*.jsonl")]
    batches = file_batches(patterns, batch_bytes=1)
    parts = list(batches)
    assert parts[0].metadata.schema.field("tag").type == pa.null() and "extra" not in parts[0].metadata.column_names
    schema = pa.schema(batches.metadata_fields())
    assert schema.names == ["path", "row", "score", "tag", "extra"]
    assert [schema.field(name).type for name in schema.names[2:]] == [pa.float64(), pa.string(), pa.bool_()]
    whole = read_documents(patterns)
    assert concat_batches(file_batches(patterns, batch_bytes=1)).metadata.equals(whole.metadata)
    assert whole.texts == ["a0", "a2", "b0", "b1"] and whole.metadata["score"].to_pylist() == [1.0, 2.0, 0.5, None]
    assert [conform(part.metadata, schema).num_rows for part in parts] == [1, 1, 1, 1]
