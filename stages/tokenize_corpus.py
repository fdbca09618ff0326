"""Stage tokenize_corpus: read a corpus, split it by document, tokenize it and pack one token stream per split.

Output files in `out`:
    documents.parquet   schemas.tables.documents_schema(source metadata): one row per kept document, doc_id
                        0..n-1 in corpus order, split (train/ref_train/val), is_reference, num_chars, num_tokens, text
    vocab.parquet       schemas.tables.VOCAB
    tokenizer.json      the Hugging Face tokenizer (trained, GPT-2's, or copied from a file)
    stream-<split>.npy  int32 token stream of each split in schemas.tables.SPLITS (storage.windows.stream_file):
                        the split's documents in doc_id order, each followed by <|endoftext|>; with
                        tokenize.general_where also stream-general.npy (GENERAL_SPLIT)
    tokens.parquet      schemas.tables.TOKENS: one row per stream token, sorted by (split, token_index)
Documents: val (a val_fraction hash), ref_train (tokenize.reference_share of the reference subset's other
documents: they train the reference model and nothing else) and train (the rest: the target's data). The
reference never trains on a document whose tokens it scores for selection. Streams: train, val, ref_train,
and ref_val = the reference subset (tokenize.reference_where) of val. With tokenize.general_where, the documents
documents_where leaves out and general_where selects form the `general` split: general text for the teacher and
the continual base, in no other split and not used to train the tokenizer (so the other splits are unchanged).

Streaming, with memory bounded by tokenize.batch_bytes and the largest input file or document, not the corpus:
1. read: the source is read once, in batches, into Parquet files under out/_staging (stages.corpus.staging);
2. select: documents_where per batch (row-level clauses), then the split hashes of the kept documents' source ids;
3. splits: val and ref_train assigned over the whole corpus's hash arrays; reference_where per batch (it may read
   `split`, train or val at that point);
4. BPE training (tokenizer=bpe) from an iterator over the staged non-validation texts;
5. encode: per batch, the documents' tokens + <|endoftext|> are appended to their split streams
   (storage.token_stream) and their rows to documents.parquet; then tokens.parquet is written in record
   batches from the memory-mapped streams and the per-document token counts. out/_staging is deleted.
"""

import hashlib
import logging
import time
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
from tokenizers import Tokenizer

from schemas.configs import TokenizeConfig
from schemas.manifest import Manifest
from schemas.tables import SPLITS, TOKENS, VOCAB, documents_schema
from stages.corpus.packing import pack_stream
from stages.corpus.progress import Progress
from stages.corpus.sources import corpus_batches, default_reference_where
from stages.corpus.staging import StagedCorpus, text_bytes
from stages.corpus.tokenizers import EOT, build_tokenizer, encode_documents, vocab_table
from stages.registry import NodeDecl, Stage
from storage.catalog import TableSpec
from storage.parquet import write_batches, write_table
from storage.token_stream import TokenStreamWriter, read_chunks
from storage.windows import stream_file

log = logging.getLogger(__name__)

GENERAL_SPLIT = "general"
"""The split of tokenize.general_where's documents (only in artifacts configured with it)."""
BATCH_ROWS = 1 << 20
"""Rows per record batch written to tokens.parquet (bounds the Arrow copies held at once)."""
STAGING_DIR = "_staging"
"""Directory inside the build dir holding the corpus read from its source (deleted when the stage ends)."""


def run(cfg: TokenizeConfig, inputs: dict[str, Manifest], out: Path) -> dict:
    """Build the tokenize_corpus artifact files in `out`; returns summary numbers for the manifest."""
    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = None if cfg.tokenizer == "bpe" else build_tokenizer(cfg, [])  # fail fast on a bad tokenizer file
    staged = StagedCorpus(out / STAGING_DIR)
    try:
        staged.write(corpus_batches(cfg))
        keep = select_documents(staged, cfg.documents_where)
        splits = assign_document_splits(staged, keep, cfg)
        general = select_general(staged, keep, cfg.general_where)
        if general.any():  # appended as kept documents of their own split (doc_ids follow corpus order)
            keep, splits = keep | general, splits.with_general(general[keep | general])
        tokenizer = tokenizer or build_tokenizer(cfg, StagedTexts(staged, keep, ~splits.is_val & ~splits.is_general))
        tokenizer.save(str(out / "tokenizer.json"))
        encoded = encode_corpus(staged, keep, splits, tokenizer, out)
    finally:
        staged.remove()
    num_tokens = {split: encoded.num_tokens(split, splits) for split in splits.names}
    for split in splits.names:
        if num_tokens[split] < cfg.seq_len + 1:
            raise ValueError(
                f"split {split!r} has only {num_tokens[split]} tokens, fewer than tokenize.seq_len + 1 = "
                f"{cfg.seq_len + 1}; use a smaller tokenize.seq_len or a broader tokenize.documents_where / "
                "reference_where"
            )
    write_table(out / "vocab.parquet", vocab_table(tokenizer), VOCAB)
    num_rows = write_batches(out / "tokens.parquet", _token_batches(out, encoded.doc_tokens, splits), TOKENS)
    summary = {
        "num_documents": len(splits.is_val),
        "num_documents_per_split": {split: int(splits.members(split).sum()) for split in splits.names},
        "num_tokens": num_tokens,
        "num_windows": {split: (count - 1) // cfg.seq_len for split, count in num_tokens.items()},
        "vocab_size": tokenizer.get_vocab_size(with_added_tokens=True),
        "eot_id": tokenizer.token_to_id(EOT),
        "tokenizer": cfg.tokenizer,
        "reference_where": splits.reference_where,
        "tokens_per_s": round(encoded.tokens_per_s, 1),
        "num_batches": len(staged.batch_rows),
        "peak_batch_bytes": max(staged.batch_bytes),
    }
    assert num_rows == sum(num_tokens.values())
    log.info("tokenize_corpus done in %.1fs: %s", time.perf_counter() - started, summary)
    return summary


def select_documents(staged: StagedCorpus, documents_where: str | None) -> np.ndarray:
    """Which documents read (a mask over all of them) documents_where keeps, evaluated batch by batch."""
    if not documents_where:
        return np.ones(staged.num_documents, dtype=bool)
    keep = np.concatenate([select_where(table, documents_where, "tokenize.documents_where")
                           for table in staged.tables()])
    if not keep.any():
        raise ValueError(f"tokenize.documents_where: {documents_where!r} keeps no document; loosen the clause")
    log.info("documents_where %r kept %d of %d documents", documents_where, keep.sum(), len(keep))
    return keep


@dataclass
class DocumentSplits:
    """Per kept document (index = doc_id): which splits it belongs to."""

    is_val: np.ndarray
    is_reference: np.ndarray
    """In the reference subset (tokenize.reference_where)."""
    reference_only: np.ndarray
    """Trains the reference only (split ref_train)."""
    reference_where: str
    is_general: np.ndarray | None = None
    """In the `general` split (tokenize.general_where); None: no general split."""

    def __post_init__(self):
        if self.is_general is None:
            self.is_general = np.zeros_like(self.is_val)

    @property
    def names(self) -> tuple[str, ...]:
        """The artifact's splits: schemas.tables.SPLITS, and GENERAL_SPLIT when it has general documents."""
        return SPLITS + ((GENERAL_SPLIT,) if self.is_general.any() else ())

    def with_general(self, is_general: np.ndarray) -> "DocumentSplits":
        """These splits over the kept documents plus the general ones (is_general over the union, in corpus
        order): general documents are in no other split."""
        def spread(mask: np.ndarray) -> np.ndarray:
            full = np.zeros(len(is_general), bool)
            full[~is_general] = mask
            return full
        return DocumentSplits(spread(self.is_val), spread(self.is_reference), spread(self.reference_only),
                              self.reference_where, is_general)

    def split_column(self) -> np.ndarray:
        """The documents table's split per document: val, ref_train, general or train."""
        return np.where(self.is_val, "val", np.where(self.reference_only, "ref_train",
                                                     np.where(self.is_general, GENERAL_SPLIT, "train")))

    def members(self, split: str) -> np.ndarray:
        """Mask of the documents in a stream (ref_val: the reference subset of val, also in val)."""
        return {"train": ~self.is_val & ~self.reference_only & ~self.is_general, "val": self.is_val,
                "ref_train": self.reference_only, "ref_val": self.is_reference & self.is_val,
                GENERAL_SPLIT: self.is_general}[split]


def assign_document_splits(staged: StagedCorpus, keep: np.ndarray, cfg: TokenizeConfig) -> DocumentSplits:
    """val by hash, the reference subset by reference_where (which may read split = train/val) and ref_train
    by another hash, with the checks that every split gets documents."""
    is_val = assign_splits(staged.values("source", keep), cfg.split_seed, cfg.val_fraction)
    reference_where = cfg.reference_where or default_reference_where(cfg.source)
    is_reference = select_reference(staged, keep, is_val, reference_where)
    for side, side_mask in (("train", ~is_val), ("val", is_val)):
        if not (is_reference & side_mask).any():
            raise ValueError(
                f"tokenize.reference_where: {reference_where!r} selects no {side} document "
                f"({int(side_mask.sum())} {side} documents); broaden it or change tokenize.split_seed"
            )
    reference_only = assign_reference_training(staged.values("source", keep), is_reference & ~is_val,
                                               cfg.split_seed, cfg.reference_share)
    if not (~is_val & ~reference_only).any():
        raise ValueError(
            f"tokenize.reference_share: {cfg.reference_share} gives every non-validation document to the reference "
            f"(reference_where {reference_where!r} selects all of them), so the targets have nothing to train on; "
            "lower tokenize.reference_share or narrow tokenize.reference_where")
    return DocumentSplits(is_val, is_reference, reference_only, reference_where)


def select_general(staged: StagedCorpus, keep: np.ndarray, general_where: str | None) -> np.ndarray:
    """Which of the documents documents_where left out general_where selects (the `general` split)."""
    if not general_where:
        return np.zeros_like(keep)
    outside = ~keep
    if not outside.any():
        raise ValueError("tokenize.general_where: documents_where keeps every document, so none is left for the "
                         "general split; narrow documents_where")
    general = np.zeros_like(keep)
    general[outside] = np.concatenate([select_where(table, general_where, "tokenize.general_where")
                                       for table in staged.tables(outside)])
    if not general.any():
        raise ValueError(f"tokenize.general_where: {general_where!r} selects none of the {int(outside.sum())} "
                         "documents documents_where leaves out")
    log.info("general_where %r: %d documents in the general split", general_where, general.sum())
    return general


def select_reference(staged: StagedCorpus, keep: np.ndarray, is_val: np.ndarray, clause: str) -> np.ndarray:
    """reference_where per kept document, evaluated batch by batch with the split column (train or val)."""
    masks, first = [], 0
    for table in staged.tables(keep):
        batch_is_val = is_val[first:first + table.num_rows]
        first += table.num_rows
        table = table.append_column("split", pa.array(np.where(batch_is_val, "val", "train"), pa.string()))
        masks.append(select_where(table, clause, "tokenize.reference_where"))
    return np.concatenate(masks)


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


def split_hashes(sources: Iterable[str], seed: int, salt: str = "") -> np.ndarray:
    """split_hash of salt + source for every source, as a float64 array."""
    return np.fromiter((split_hash(seed, salt + source) for source in sources), dtype=np.float64)


def assign_splits(sources: Iterable[str], seed: int, val_fraction: float) -> np.ndarray:
    """is_val per document: hash below val_fraction, adjusted so that both train and val are non-empty."""
    hashes = split_hashes(sources, seed)
    if len(hashes) < 2:
        raise ValueError(f"tokenize: {len(hashes)} document(s) after filtering; train and val need at least 2")
    is_val = hashes < val_fraction
    if not is_val.any():
        is_val[np.argmin(hashes)] = True
    if is_val.all():
        is_val[np.argmax(hashes)] = False
    return is_val


def assign_reference_training(sources: Iterable[str], candidates: np.ndarray, seed: int, share: float) -> np.ndarray:
    """Which candidate documents (reference subset, not validation) train the reference only: a hash below
    `share` (salted apart from the val split), at least one; with share < 1 at least one candidate stays."""
    hashes = split_hashes(sources, seed, salt="reference:")
    chosen = candidates & (hashes < share)
    members = np.flatnonzero(candidates)
    if len(members) and not chosen.any():
        chosen[members[np.argmin(hashes[members])]] = True
    if share < 1 and len(members) > 1 and chosen[members].all():
        chosen[members[np.argmax(hashes[members])]] = False
    return chosen


class StagedTexts:
    """The texts of the chosen kept documents, in doc_id order, read batch by batch (sized, re-iterable; an
    iteration logs its progress as the `bpe` pass)."""

    def __init__(self, staged: StagedCorpus, keep: np.ndarray, chosen: np.ndarray):
        self.staged, self.keep, self.chosen = staged, keep, chosen

    def __len__(self) -> int:
        return int(self.chosen.sum())

    def __iter__(self) -> Iterator[str]:
        progress = Progress("bpe")
        first = 0
        for table in self.staged.tables(self.keep, ["text"]):
            texts = table.filter(pa.array(self.chosen[first:first + table.num_rows]))
            first += table.num_rows
            progress.add(texts.num_rows, text_bytes(texts))
            yield from texts["text"].to_pylist()
        progress.done()


@dataclass
class EncodedCorpus:
    """What the encode pass leaves for the summary and tokens.parquet."""

    doc_tokens: np.ndarray
    """Tokens per kept document (without its <|endoftext|>)."""
    tokens_per_s: float
    """Tokens encoded per second of encoding calls."""

    def num_tokens(self, split: str, splits: DocumentSplits) -> int:
        """Length of a split's stream: its documents' tokens plus one <|endoftext|> each."""
        members = splits.members(split)
        return int(self.doc_tokens[members].sum() + members.sum())


def encode_corpus(staged: StagedCorpus, keep: np.ndarray, splits: DocumentSplits, tokenizer: Tokenizer,
                  out: Path) -> EncodedCorpus:
    """Encode the kept documents batch by batch: their tokens + <|endoftext|> go to the stream of every split
    they belong to (doc_id order) and their rows to documents.parquet."""
    eot_id = tokenizer.token_to_id(EOT)
    schema = documents_schema(staged.metadata_fields)
    members = {split: splits.members(split) for split in splits.names}
    split_column = splits.split_column()
    doc_tokens: list[np.ndarray] = []
    progress = Progress("encode")
    encode_seconds = 0.0

    def document_batches(writers: dict[str, TokenStreamWriter]) -> Iterator[pa.Table]:
        nonlocal encode_seconds
        first = 0
        for table in staged.tables(keep):
            rows = slice(first, first + table.num_rows)
            first += table.num_rows
            encode_started = time.perf_counter()
            flat_ids, lengths = encode_documents(tokenizer, table["text"].to_pylist())
            encode_seconds += time.perf_counter() - encode_started
            offsets = np.cumsum(lengths) - lengths
            for split, writer in writers.items():
                writer.append(pack_stream(flat_ids, offsets, lengths, np.flatnonzero(members[split][rows]), eot_id)[0])
            doc_tokens.append(lengths)
            progress.add(table.num_rows, text_bytes(table), len(flat_ids))
            table = table.append_column("split", pa.array(split_column[rows], pa.string()))
            table = table.append_column("is_reference", pa.array(splits.is_reference[rows]))
            table = table.append_column("num_tokens", pa.array(lengths))
            yield table.select(schema.names).cast(schema)

    with ExitStack() as stack:
        writers = {split: stack.enter_context(TokenStreamWriter(out / stream_file(split))) for split in splits.names}
        write_batches(out / "documents.parquet", document_batches(writers), schema)
    progress.done()
    return EncodedCorpus(np.concatenate(doc_tokens), progress.tokens / max(encode_seconds, 1e-9))


def _token_batches(out: Path, doc_tokens: np.ndarray, splits: DocumentSplits) -> Iterator[pa.RecordBatch]:
    """Record batches of tokens.parquet in (split, token_index) order, read from the stream files in chunks; each
    token's doc_id and position come from its split's documents' token counts."""
    progress = Progress("tokens.parquet")
    for split in sorted(splits.names):
        doc_ids = np.flatnonzero(splits.members(split))
        sizes = doc_tokens[doc_ids] + 1
        ends = np.cumsum(sizes)
        start = 0
        for tokens in read_chunks(out / stream_file(split), BATCH_ROWS):
            token_index = np.arange(start, start + len(tokens), dtype=np.int64)
            start += len(tokens)
            document = np.searchsorted(ends, token_index, side="right")
            position = token_index - (ends[document] - sizes[document])
            progress.add(0, 0, len(tokens))
            yield pa.RecordBatch.from_arrays([
                pa.repeat(pa.scalar(split, pa.string()), len(tokens)),
                pa.array(token_index),
                pa.array(doc_ids[document]),
                pa.array(position.astype(np.int32)),
                pa.array(tokens),
            ], schema=TOKENS)
    progress.done()


STAGE = Stage(
    name="tokenize_corpus", code_version="3", config_type=TokenizeConfig,
    nodes=lambda cfg: [NodeDecl("tokenize_corpus", cfg.tokenize)],
    run=run,
    tables={"documents": TableSpec("tokenize_corpus", "documents.parquet"),
            "vocab": TableSpec("tokenize_corpus", "vocab.parquet"),
            "tokens": TableSpec("tokenize_corpus", "tokens.parquet")},
    description="corpus -> documents, tokenizer, packed token streams",
)
