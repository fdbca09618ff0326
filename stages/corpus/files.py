"""Reading users' files into documents (tokenize.paths and evaluate.extra_files): globs, text units, formats.

`read_documents` / `read_files` return one `Corpus`, `file_batches` the documents in batches. One file is open at
a time: .jsonl files are read line by line, .parquet files in row batches, a .txt file is read whole (then cut by
its text unit). In source ids, <name> is the file's path relative to the deepest directory holding every matched
file (its bare name when there is one directory), so the split does not change when the corpus is moved, copied
elsewhere or reached through another path:
    .txt      cut by the text unit: `file` (one document, source `files:<name>`, row null), `paragraph`
              (runs of non-empty lines separated by one or more empty/whitespace-only lines, joined by newlines;
              source `files:<name>:p<k>`, row k = paragraph index) or `line` (each non-empty line of
              str.splitlines, as the `datasets` "text" loader; source `files:<name>:l<k>`, row k = 0-based line)
    .jsonl    one document per non-blank line (source `files:<name>:<k>`, row k = 0-based line)
    .parquet  one document per row (source `files:<name>:<k>`, row k = 0-based row)
The other fields of .jsonl/.parquet records become metadata columns (stages/corpus/metadata.py).
"""

import glob
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from schemas.configs import TextUnit
from stages.corpus.documents import Corpus, DocumentBatches, SourceDocument, concat_batches
from stages.corpus.metadata import FILES_FIELDS

FILE_SUFFIXES = (".txt", ".jsonl", ".parquet")
TEXT_UNIT_TAGS = {"file": None, "paragraph": "p", "line": "l"}
"""Source-id tag of a .txt document per text unit: files:<name>:<tag><k> (none for whole files)."""
DEFAULT_BATCH_BYTES = 8 * 2**20
"""Text per batch when the caller reads a whole corpus at once (read_documents, read_files)."""
PARQUET_ROWS_PER_READ = 1024
"""Rows of a .parquet file converted to Python at once."""


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


def decode_utf8(data: bytes, path: Path, offset: int = 0) -> str:
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
    for row, text in split_text(decode_utf8(path.read_bytes(), path), unit):
        yield FileRow(row, text, {})


def _read_jsonl(path: Path, settings: FileSettings) -> Iterator[FileRow]:
    """Texts, 0-based line indexes and other fields of a JSON-lines file's records, read line by line (blank
    lines skipped)."""
    text_column = settings.text_column
    offset = 0
    with open(path, "rb") as handle:
        for index, raw in enumerate(handle):
            line = decode_utf8(raw, path, offset)
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
