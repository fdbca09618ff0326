"""Documents as a source reads them, batched: the form every corpus source (stages/corpus/sources.py) and the
file reader (stages/corpus/files.py) hand their documents on in.

Every source is read as `DocumentBatches`: an iterator of `Corpus` batches of at most `batch_bytes` of UTF-8
text each (a longer document is a batch of its own), so memory is bounded by the batch and by the largest single
input unit, not by the corpus. A batch holds the texts, a unique `source` string per document (the train/val
split hashes it, so it must be stable across runs) and a pyarrow table of the source's metadata columns
(stages/corpus/metadata.py); after the iteration `DocumentBatches.metadata_fields()` is the final schema of the
whole corpus. `concat_batches` joins the batches into one `Corpus`. Documents whose text is empty or
whitespace-only are dropped (unless drop_empty=False); a corpus without text is a ValueError.
"""

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import pyarrow as pa

from stages.corpus.metadata import MetadataColumns, conform

log = logging.getLogger(__name__)


@dataclass
class Corpus:
    """Documents of one source (or one batch of them): texts, unique source ids and a metadata table (one row
    per document)."""

    texts: list[str]
    sources: list[str]
    metadata: pa.Table


class SourceDocument(NamedTuple):
    """One document as its source reads it, before batching."""

    text: str
    source: str
    fields: tuple
    """Values of the source's fixed metadata fields (FILES_FIELDS, SOTU_FIELDS or HF_FIELDS), in order."""
    record: dict
    """Files only: the record's own fields (the JSON object / Parquet row without its text); {} otherwise."""
    location: str
    """Where the record is (path:line or `path row k`), for error messages about its fields."""


def utf8_size(text: str) -> int:
    """Bytes of a text in UTF-8 (without encoding it when it is ASCII)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


class DocumentBatches:
    """A source's documents as `Corpus` batches of at most batch_bytes of UTF-8 text, in order (a document longer
    than that is a batch of its own). Iterate once; then `metadata_fields()` is the schema of the whole corpus's
    metadata."""

    def __init__(self, documents: Iterable[SourceDocument], fields: list[pa.Field], batch_bytes: int, *,
                 what: str, fix: str, paths_field: str = "tokenize.paths", drop_empty: bool = True):
        self.documents = documents
        self.fields = fields
        """The source's fixed metadata fields (before the records' own fields)."""
        self.batch_bytes = batch_bytes
        self.what, self.fix = what, fix
        """The source and the remedy, named by the error for a corpus without text."""
        self.drop_empty = drop_empty
        self.records = MetadataColumns(paths_field)
        self.num_read = 0
        """Documents read so far, empty ones included."""

    def __iter__(self) -> Iterator[Corpus]:
        batch: list[SourceDocument] = []
        num_kept = num_bytes = 0
        for document in self.documents:
            self.num_read += 1
            self.records.add(document.record, document.location)  # every record, an empty document's too
            if self.drop_empty and (not document.text or document.text.isspace()):
                continue
            size = utf8_size(document.text)
            if batch and num_bytes + size > self.batch_bytes:
                yield self._corpus(batch)
                num_kept += len(batch)
                batch, num_bytes = [], 0
            batch.append(document)
            num_bytes += size
        if batch:
            yield self._corpus(batch)
            num_kept += len(batch)
        self._check_nonempty(num_kept)

    def _corpus(self, batch: list[SourceDocument]) -> Corpus:
        """One batch: its texts, sources and metadata (fixed fields, then the records' fields seen so far)."""
        values = list(zip(*(document.fields for document in batch), strict=True))
        table = pa.table({field.name: pa.array(column, field.type) for field, column in zip(self.fields, values,
                                                                                           strict=True)})
        for field, column in self.records.columns([document.record for document in batch]):
            table = table.append_column(field, column)
        return Corpus(texts=[d.text for d in batch], sources=[d.source for d in batch], metadata=table)

    def _check_nonempty(self, num_kept: int) -> None:
        """Log the count of documents kept; ValueError naming the source and the remedy if none has text."""
        if not self.drop_empty:
            return
        log.info("read %d documents from %s (%d empty dropped)", num_kept, self.what, self.num_read - num_kept)
        if not num_kept:
            raise ValueError(f"{self.what} has no non-empty document (read {self.num_read}); {self.fix}")

    def metadata_fields(self) -> list[pa.Field]:
        """The metadata schema of every document read: fixed fields, then the records' fields (final types)."""
        return self.fields + self.records.fields()


def concat_batches(batches: DocumentBatches) -> Corpus:
    """The whole corpus of `batches` as one Corpus (metadata in the final schema)."""
    parts = list(batches)
    schema = pa.schema(batches.metadata_fields())
    return Corpus(
        texts=[text for part in parts for text in part.texts],
        sources=[source for part in parts for source in part.sources],
        metadata=pa.concat_tables([conform(part.metadata, schema) for part in parts]) if parts
        else schema.empty_table(),
    )
