"""Stage tokenize_corpus: read a corpus, split it by document, tokenize it and pack one token stream per split.

Output files in `out`:
    documents.parquet   schemas.tables.documents_schema(source metadata): one row per kept document, doc_id
                        0..n-1 in corpus order, split (train/ref_train/val), is_reference, num_chars, num_tokens, text
    vocab.parquet       schemas.tables.VOCAB
    tokenizer.json      the Hugging Face tokenizer (trained, GPT-2's, or copied from a file)
    stream-<split>.npy  int32 token stream of each split in schemas.tables.SPLITS (storage.windows.stream_file):
                        the split's documents in doc_id order, each followed by <|endoftext|>
    tokens.parquet      schemas.tables.TOKENS: one row per stream token, sorted by (split, token_index)
Documents: val (a val_fraction hash), ref_train (tokenize.reference_share of the reference subset's other
documents: they train the reference model and nothing else) and train (the rest: the target's data). The
reference never trains on a document whose tokens it scores for selection. Streams: train, val, ref_train,
and ref_val = the reference subset (tokenize.reference_where) of val.
"""

import hashlib
import logging
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas.configs import TokenizeConfig
from schemas.manifest import Manifest
from schemas.tables import SPLITS, TOKENS, VOCAB, documents_schema
from stages.corpus.packing import pack_stream
from stages.corpus.sources import Corpus, default_reference_where, read_corpus
from stages.corpus.tokenizers import EOT, build_tokenizer, encode_documents, vocab_table
from stages.registry import NodeDecl, Stage
from storage.catalog import TableSpec
from storage.parquet import write_batches, write_table
from storage.windows import stream_file

log = logging.getLogger(__name__)

BATCH_ROWS = 1 << 20
"""Rows per record batch written to tokens.parquet (bounds the Arrow copies held at once)."""


def run(cfg: TokenizeConfig, inputs: dict[str, Manifest], out: Path) -> dict:
    """Build the tokenize_corpus artifact files in `out`; returns summary numbers for the manifest."""
    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = None if cfg.tokenizer == "bpe" else build_tokenizer(cfg, [])  # fail fast on a bad tokenizer file
    corpus = read_corpus(cfg)
    docs = documents_table(corpus, cfg.documents_where)

    is_val = assign_splits(docs["source"].to_pylist(), cfg.split_seed, cfg.val_fraction)
    docs = docs.append_column("split", pa.array(np.where(is_val, "val", "train"), pa.string()))
    reference_where = cfg.reference_where or default_reference_where(cfg.source)
    is_reference = select_where(docs, reference_where, "tokenize.reference_where")  # may read split train/val
    for side, side_mask in (("train", ~is_val), ("val", is_val)):
        if not (is_reference & side_mask).any():
            raise ValueError(
                f"tokenize.reference_where: {reference_where!r} selects no {side} document "
                f"({int(side_mask.sum())} {side} documents); broaden it or change tokenize.split_seed"
            )
    reference_only = assign_reference_training(docs["source"].to_pylist(), is_reference & ~is_val,
                                               cfg.split_seed, cfg.reference_share)
    if not (~is_val & ~reference_only).any():
        raise ValueError(
            f"tokenize.reference_share: {cfg.reference_share} gives every non-validation document to the reference "
            f"(reference_where {reference_where!r} selects all of them), so the targets have nothing to train on; "
            "lower tokenize.reference_share or narrow tokenize.reference_where")
    split_column = np.where(is_val, "val", np.where(reference_only, "ref_train", "train"))
    docs = docs.set_column(docs.column_names.index("split"), "split", pa.array(split_column, pa.string()))
    docs = docs.append_column("is_reference", pa.array(is_reference))

    texts = docs["text"].to_pylist()
    tokenizer = tokenizer or build_tokenizer(cfg, [t for t, v in zip(texts, is_val, strict=True) if not v])
    tokenizer.save(str(out / "tokenizer.json"))
    eot_id = tokenizer.token_to_id(EOT)
    flat_ids, lengths, tokens_per_s = encode_documents(tokenizer, texts)
    docs = docs.append_column("num_tokens", pa.array(lengths))

    split_docs = {
        "train": split_column == "train", "val": is_val, "ref_train": reference_only, "ref_val": is_reference & is_val,
    }
    offsets = np.cumsum(lengths) - lengths
    streams = {}
    for split in SPLITS:
        doc_ids = np.flatnonzero(split_docs[split])
        streams[split] = pack_stream(flat_ids, offsets, lengths, doc_ids, eot_id)
        num_tokens = len(streams[split][0])
        if num_tokens < cfg.seq_len + 1:
            raise ValueError(
                f"split {split!r} has only {num_tokens} tokens, fewer than tokenize.seq_len + 1 = {cfg.seq_len + 1}; "
                "use a smaller tokenize.seq_len or a broader tokenize.documents_where / reference_where"
            )
        np.save(out / stream_file(split), streams[split][0])

    schema = documents_schema(list(corpus.metadata.schema))
    write_table(out / "documents.parquet", docs.select(schema.names), schema)
    write_table(out / "vocab.parquet", vocab_table(tokenizer), VOCAB)
    num_rows = write_batches(out / "tokens.parquet", _token_batches(streams), TOKENS)
    summary = {
        "num_documents": docs.num_rows,
        "num_documents_per_split": {split: int(mask.sum()) for split, mask in split_docs.items()},
        "num_tokens": {split: len(s[0]) for split, s in streams.items()},
        "num_windows": {split: (len(s[0]) - 1) // cfg.seq_len for split, s in streams.items()},
        "vocab_size": tokenizer.get_vocab_size(with_added_tokens=True),
        "eot_id": eot_id,
        "tokenizer": cfg.tokenizer,
        "reference_where": reference_where,
        "tokens_per_s": round(tokens_per_s, 1),
    }
    assert num_rows == sum(summary["num_tokens"].values())
    log.info("tokenize_corpus done in %.1fs: %s", time.perf_counter() - started, summary)
    return summary


def documents_table(corpus: Corpus, documents_where: str | None) -> pa.Table:
    """doc_id (0..n-1 after filtering), source, text, num_chars and metadata of the documents to keep."""
    docs = pa.table({
        "doc_id": pa.array(np.arange(len(corpus.texts), dtype=np.int64)),
        "source": pa.array(corpus.sources, pa.string()),
        "text": pa.array(corpus.texts, pa.string()),
    })
    docs = docs.append_column("num_chars", pc.utf8_length(docs["text"]).cast(pa.int64()))
    for field in corpus.metadata.schema:
        docs = docs.append_column(field, corpus.metadata[field.name])
    if documents_where:
        docs = docs.filter(pa.array(select_where(docs, documents_where, "tokenize.documents_where")))
        if docs.num_rows == 0:
            raise ValueError(f"tokenize.documents_where: {documents_where!r} keeps no document; loosen the clause")
        docs = docs.set_column(0, "doc_id", pa.array(np.arange(docs.num_rows, dtype=np.int64)))
        log.info("documents_where %r kept %d of %d documents", documents_where, docs.num_rows, len(corpus.texts))
    return docs


def select_where(docs: pa.Table, clause: str, setting: str) -> np.ndarray:
    """Boolean mask of the rows of docs (which has a doc_id column) matching a SQL WHERE clause."""
    con = duckdb.connect()
    try:
        con.register("docs", docs)
        selected = con.execute(f"SELECT doc_id FROM docs WHERE ({clause})").fetchnumpy()["doc_id"]
    except duckdb.Error as err:
        raise ValueError(
            f"{setting}: cannot apply {clause!r}: {str(err).splitlines()[0]}; "
            f"available columns: {docs.column_names}"
        ) from err
    finally:
        con.close()
    return np.isin(docs["doc_id"].to_numpy(), np.asarray(selected))


def split_hash(seed: int, source: str) -> float:
    """Deterministic uniform [0, 1) value of a document's source string (blake2b, not Python's hash)."""
    digest = hashlib.blake2b(f"{seed}:{source}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def assign_splits(sources: list[str], seed: int, val_fraction: float) -> np.ndarray:
    """is_val per document: hash below val_fraction, adjusted so that both train and val are non-empty."""
    if len(sources) < 2:
        raise ValueError(f"tokenize: {len(sources)} document(s) after filtering; train and val need at least 2")
    hashes = np.array([split_hash(seed, source) for source in sources])
    is_val = hashes < val_fraction
    if not is_val.any():
        is_val[np.argmin(hashes)] = True
    if is_val.all():
        is_val[np.argmax(hashes)] = False
    return is_val


def assign_reference_training(sources: list[str], candidates: np.ndarray, seed: int, share: float) -> np.ndarray:
    """Which candidate documents (reference subset, not validation) train the reference only: a hash below
    `share` (salted apart from the val split), at least one; with share < 1 at least one candidate stays."""
    hashes = np.array([split_hash(seed, f"reference:{source}") for source in sources])
    chosen = candidates & (hashes < share)
    if candidates.any() and not chosen.any():
        chosen[np.flatnonzero(candidates)[np.argmin(hashes[candidates])]] = True
    return chosen


def _token_batches(streams: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]):
    """Record batches of tokens.parquet in (split, token_index) order."""
    for split in sorted(streams):
        stream, doc_id, position = streams[split]
        for start in range(0, len(stream), BATCH_ROWS):
            stop = min(start + BATCH_ROWS, len(stream))
            yield pa.RecordBatch.from_arrays([
                pa.repeat(pa.scalar(split, pa.string()), stop - start),
                pa.array(np.arange(start, stop, dtype=np.int64)),
                pa.array(doc_id[start:stop]),
                pa.array(position[start:stop]),
                pa.array(stream[start:stop]),
            ], schema=TOKENS)


STAGE = Stage(
    name="tokenize_corpus", code_version="2", config_type=TokenizeConfig,
    nodes=lambda cfg: [NodeDecl("tokenize_corpus", cfg.tokenize)],
    run=run,
    tables={"documents": TableSpec("tokenize_corpus", "documents.parquet"),
            "vocab": TableSpec("tokenize_corpus", "vocab.parquet"),
            "tokens": TableSpec("tokenize_corpus", "tokens.parquet")},
    description="corpus -> documents, tokenizer, packed token streams",
)
