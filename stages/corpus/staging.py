"""The corpus as read once from its source, kept in batch Parquet files while the tokenize stage works on it.

Reading a source can be slow (a streamed dataset) or only possible once, and the stage needs the documents
several times (filter, splits, BPE training, encoding), so the first pass writes every batch of
documents.DocumentBatches to `<directory>/batch-<k>.parquet` (the documents table before filtering: doc_id,
source, text, num_chars, then the batch's metadata columns) and every later pass reads them back one batch at a
time, in the final metadata schema. Only small per-document numpy arrays (masks, hashes, lengths) are kept in
memory across batches.
"""

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from stages.corpus.documents import Corpus, DocumentBatches
from stages.corpus.metadata import conform
from stages.corpus.progress import Progress

BASE_FIELDS = [
    pa.field("doc_id", pa.int64()),
    pa.field("source", pa.string()),
    pa.field("text", pa.string()),
    pa.field("num_chars", pa.int64()),
]
"""Columns of a staged batch before the source's metadata (doc_id 0..n-1 over the corpus, before filtering)."""


def text_bytes(table: pa.Table) -> int:
    """UTF-8 bytes of a table's text column."""
    return int(pc.sum(pc.binary_length(table["text"])).as_py() or 0)


class StagedCorpus:
    """Batch files of one corpus under `directory` (created by `write`, deleted by `remove`)."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.batch_rows: list[int] = []
        """Documents of each batch file."""
        self.batch_bytes: list[int] = []
        """UTF-8 bytes of text of each batch file."""
        self.metadata_fields: list[pa.Field] = []
        """The source's metadata columns over the whole corpus (final types), set by `write`."""

    @property
    def num_documents(self) -> int:
        """Documents read, before filtering."""
        return sum(self.batch_rows)

    def _file(self, index: int) -> Path:
        return self.directory / f"batch-{index:06d}.parquet"

    def write(self, batches: DocumentBatches) -> None:
        """Read the source once, writing each batch as a documents table (doc_id counting over batches)."""
        shutil.rmtree(self.directory, ignore_errors=True)
        self.directory.mkdir(parents=True)
        progress = Progress("read")
        for batch in batches:
            table = _documents_table(batch, first_doc_id=self.num_documents)
            pq.write_table(table, self._file(len(self.batch_rows)))
            self.batch_rows.append(table.num_rows)
            self.batch_bytes.append(text_bytes(table))
            progress.add(table.num_rows, self.batch_bytes[-1])
        progress.done()
        self.metadata_fields = batches.metadata_fields()

    @property
    def schema(self) -> pa.Schema:
        """A staged batch's documents table, metadata in the final types (once `write` is done)."""
        return pa.schema(BASE_FIELDS + self.metadata_fields)

    def tables(self, keep: np.ndarray | None = None, columns: list[str] | None = None) -> Iterator[pa.Table]:
        """Every batch in corpus order, in the final schema (or only `columns`, base columns only); with `keep`
        (a mask over every document read) only the kept rows, doc_id renumbered 0..n-1 over the kept documents."""
        first_row = next_doc_id = 0
        schema = self.schema if columns is None else pa.schema([self.schema.field(name) for name in columns])
        for index, num_rows in enumerate(self.batch_rows):
            table = conform(pq.read_table(self._file(index), columns=columns), schema)
            if keep is not None:
                table = table.filter(pa.array(keep[first_row:first_row + num_rows]))
                if "doc_id" in table.column_names:
                    doc_ids = np.arange(next_doc_id, next_doc_id + table.num_rows, dtype=np.int64)
                    table = table.set_column(table.column_names.index("doc_id"), "doc_id", pa.array(doc_ids))
                next_doc_id += table.num_rows
            first_row += num_rows
            yield table

    def values(self, column: str, keep: np.ndarray | None = None) -> Iterator:
        """The values of one column, document by document (only the kept ones with `keep`)."""
        for table in self.tables(keep, [column]):
            yield from table[column].to_pylist()

    def remove(self) -> None:
        """Delete the batch files."""
        shutil.rmtree(self.directory, ignore_errors=True)


def _documents_table(batch: Corpus, first_doc_id: int) -> pa.Table:
    """doc_id, source, text, num_chars and metadata of one batch of documents."""
    texts = pa.array(batch.texts, pa.string())
    table = pa.table({
        "doc_id": pa.array(np.arange(first_doc_id, first_doc_id + len(texts), dtype=np.int64)),
        "source": pa.array(batch.sources, pa.string()),
        "text": texts,
        "num_chars": pc.utf8_length(texts).cast(pa.int64()),
    })
    for field in batch.metadata.schema:
        table = table.append_column(field, batch.metadata[field.name])
    return table
