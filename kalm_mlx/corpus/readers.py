"""Corpus inputs: finding the files, and reading their rows in bounded batches.

Readers stream a file (Arrow batches for Parquet and CSV, lines for JSONL and text), so
memory does not grow with the file. A record is identified by its input and its
1-based record number there (the line for JSONL and plain text, the data row for CSV,
TSV and Parquet); ``start`` skips the first records of a file, which is how a resumed
job picks up where its last finished shard ended. Records that cannot be read (a
missing or non-string column, invalid UTF-8, malformed JSON or CSV) come out as
:class:`Bad` with the reason; what to do with them is the caller's choice.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

FORMATS = {
    ".jsonl": "jsonl", ".ndjson": "jsonl",
    ".parquet": "parquet", ".pq": "parquet",
    ".csv": "csv", ".tsv": "tsv",
    ".txt": "text", ".text": "text",
}
"""File suffix -> input format."""

BATCH_ROWS = 1024
"""Rows per Arrow batch read from Parquet."""

CSV_BLOCK_BYTES = 1 << 20


@dataclass(frozen=True)
class InputFile:
    """One input file: where it is, the name its row ids use, and its format."""

    path: Path
    """The resolved path."""
    name: str
    """The path relative to the inputs' common folder (the first half of a default row id)."""
    format: str

    def describe(self) -> dict:
        """What the manifest records of this input: name, format, size and modification time."""
        stat = self.path.stat()
        return {"name": self.name, "path": str(self.path), "format": self.format,
                "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


class BadRowError(ValueError):
    """A row could not be read; the message names the file and the row."""

    @classmethod
    def at(cls, source: InputFile, number: int, bad: Bad) -> BadRowError:
        """The error for record ``number`` of ``source``."""
        return cls(f"{source.path}: row {number}: {bad.reason} (--skip-bad-rows skips such rows)")


def format_of(path: Path) -> str | None:
    """The input format a file's suffix says, or None."""
    return FORMATS.get(path.suffix.lower())


def find_inputs(inputs: Sequence[str | os.PathLike], exclude: Path | None = None) -> list[InputFile]:
    """Expand files, folders and glob patterns into input files, in a stable order.

    Files given by name keep the caller's order; a folder contributes its files with a
    known suffix (recursively, sorted, hidden ones and ``exclude`` left out), a glob its
    matches, sorted. Each file is read once, even when named twice. Raises
    FileNotFoundError for a path or pattern that matches nothing and ValueError for a
    file whose format is unknown.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if not inputs:
        raise ValueError("no inputs given")
    exclude = exclude.resolve() if exclude is not None else None
    found: list[Path] = []
    roots: list[Path] = []
    for item in inputs:
        text = os.fspath(item)
        path = Path(text).expanduser()
        if path.is_dir():
            roots.append(path.resolve())
            found.extend(_folder_files(path.resolve(), exclude))
        elif path.is_file():
            if format_of(path) is None:
                raise ValueError(f"{text}: unknown input format (suffixes: {', '.join(sorted(FORMATS))})")
            found.append(path.resolve())
        elif glob.has_magic(text):
            matches = sorted(Path(m).resolve() for m in glob.glob(os.path.expanduser(text), recursive=True))
            files = [m for m in matches if m.is_file() and format_of(m) is not None
                     and not _inside(m, exclude)]
            if not files:
                raise FileNotFoundError(f"{text}: no input files match")
            found.extend(files)
        else:
            raise FileNotFoundError(f"{text}: no such file or folder")
    unique = list(dict.fromkeys(found))
    if not unique:
        raise FileNotFoundError(f"no input files with a known suffix in {', '.join(map(os.fspath, inputs))}")
    root = Path(os.path.commonpath([*roots, *(p.parent for p in unique)]))
    return [InputFile(p, p.relative_to(root).as_posix(), format_of(p)) for p in unique]


def _inside(path: Path, folder: Path | None) -> bool:
    return folder is not None and (path == folder or folder in path.parents)


def _folder_files(folder: Path, exclude: Path | None) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and not _inside(here / d, exclude))
        files.extend(here / f for f in sorted(filenames)
                     if not f.startswith(".") and format_of(here / f) is not None)
    return files


def count_records(source: InputFile) -> int:
    """About how many records an input holds, cheaply (for a progress bar's total).

    Exact for Parquet (its metadata) and for text and JSONL without blank lines; for CSV
    the line count less the header.
    """
    if source.format == "parquet":
        return pq.ParquetFile(source.path).metadata.num_rows
    lines = 0
    last = b"\n"
    with open(source.path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            lines += chunk.count(b"\n")
            last = chunk[-1:]
    lines += last != b"\n"
    return max(lines - 1, 0) if source.format in ("csv", "tsv") else lines


def check_columns(source: InputFile, text_column: str = "text", id_column: str | None = None) -> None:
    """Raise ValueError naming the file if a Parquet, CSV or TSV input lacks a column or holds a
    non-text type in it (JSONL rows are checked one by one as they are read)."""
    if source.format == "parquet":
        schema = pq.ParquetFile(source.path).schema_arrow
        for column in [text_column] + ([id_column] if id_column else []):
            if column not in schema.names:
                raise _column_error(source, column, schema.names)
        _check_text_type(schema.field(text_column).type, source, text_column)
        if id_column and not pa.types.is_integer(schema.field(id_column).type):
            _check_text_type(schema.field(id_column).type, source, id_column)
    elif source.format in ("csv", "tsv"):
        names = _open_csv(source, [], lambda row: "skip").schema.names
        for column in [text_column] + ([id_column] if id_column else []):
            if column not in names:
                raise _column_error(source, column, names)


def _check_text_type(kind: pa.DataType, source: InputFile, column: str) -> None:
    if not any(test(kind) for test in (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary,
                                       pa.types.is_large_binary)):
        raise ValueError(f"{source.path}: column {column!r} holds {kind}, not text")


def read_records(source: InputFile, text_column: str = "text", id_column: str | None = None,
                 start: int = 0) -> Iterator[tuple[int, str | Bad, str]]:
    """``(record number, text or Bad, id)`` for each record of an input after the first ``start``.

    ``id_column`` None gives each row the id ``NAME:RECORD`` (see :class:`InputFile`).
    Raises ValueError naming the file when a column is missing from the whole file or
    has a non-text type, or when the file cannot be parsed at all.
    """
    reader = {"jsonl": _read_jsonl, "text": _read_text, "csv": _read_csv, "tsv": _read_csv,
              "parquet": _read_parquet}[source.format]
    for number, value, ident in reader(source, text_column, id_column, start):
        yield number, value, f"{source.name}:{number}" if ident is None else ident


@dataclass(frozen=True)
class Bad:
    """A record that could not be read, and why."""

    reason: str


def _decoded(raw, what: str):
    """``raw`` bytes as str, or a :class:`Bad` saying what was wrong."""
    if raw is None:
        return Bad(f"{what} is missing (null)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return Bad(f"{what} is not valid UTF-8 ({err.reason} at byte {err.start})")


def _checked_text(value, what: str):
    """A JSON value as a text, or a :class:`Bad`: must be a string of valid Unicode."""
    if not isinstance(value, str):
        return Bad(f"{what} is {_json_type(value)}, not a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return Bad(f"{what} holds a lone surrogate (not valid UTF-8)")
    return value


def _json_type(value) -> str:
    return {type(None): "null", bool: "a boolean", int: "a number", float: "a number",
            list: "an array", dict: "an object"}.get(type(value), type(value).__name__)


def _line_records(path: Path, start: int) -> Iterator[tuple[int, bytes]]:
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            if number <= start:
                continue
            if line.endswith(b"\n"):
                line = line[:-1]
            if line.endswith(b"\r"):
                line = line[:-1]
            yield number, line


def _read_text(source: InputFile, text_column: str, id_column: str | None, start: int):
    for number, line in _line_records(source.path, start):
        yield number, _decoded(line, "the line"), None


def _read_jsonl(source: InputFile, text_column: str, id_column: str | None, start: int):
    for number, line in _line_records(source.path, start):
        if not line.strip():
            continue  # a blank line is no record
        decoded = _decoded(line, "the line")
        if isinstance(decoded, Bad):
            yield number, decoded, None
            continue
        try:
            record = json.loads(decoded)
        except json.JSONDecodeError as err:
            yield number, Bad(f"not valid JSON ({err.msg})"), None
            continue
        if not isinstance(record, dict):
            yield number, Bad(f"is {_json_type(record)}, not a JSON object"), None
            continue
        if text_column not in record:
            yield number, Bad(f"has no {text_column!r} field"), None
            continue
        text = _checked_text(record[text_column], f"field {text_column!r}")
        ident = None
        if id_column is not None and not isinstance(text, Bad):
            ident = record.get(id_column)
            if isinstance(ident, bool) or not isinstance(ident, (str, int)):
                text = Bad(f"id field {id_column!r} is {_json_type(ident)}, not a string or integer"
                            if id_column in record else f"has no {id_column!r} field")
            else:
                ident = str(ident)
        yield number, text, ident


def _column_error(source: InputFile, column: str, names: Sequence[str]) -> ValueError:
    return ValueError(f"{source.path}: no column {column!r} (columns: {', '.join(names)})")


def _as_binary(array: pa.ChunkedArray | pa.Array, source: InputFile, column: str) -> list:
    """A text column's values as bytes (None for nulls); a non-text column is an error."""
    _check_text_type(array.type, source, column)
    if pa.types.is_string(array.type) or pa.types.is_large_string(array.type):
        array = array.cast(pa.large_binary())
    return array.to_pylist()


def _ids_of(array, source: InputFile, column: str) -> list:
    kind = array.type
    if pa.types.is_integer(kind):
        return [None if v is None else str(v).encode() for v in array.to_pylist()]
    return _as_binary(array, source, column)


def _table_records(source: InputFile, batches, text_column: str, id_column: str | None,
                   first: int, skipped=frozenset()):
    """Records from Arrow batches: numbered from ``first``, jumping over ``skipped`` numbers."""
    number = first
    for batch in batches:
        texts = _as_binary(batch.column(text_column), source, text_column)
        ids = _ids_of(batch.column(id_column), source, id_column) if id_column else [None] * len(texts)
        for raw, raw_id in zip(texts, ids):
            while number in skipped:
                number += 1
            text = _decoded(raw, f"column {text_column!r}")
            ident = None
            if id_column is not None and not isinstance(text, Bad):
                ident = _decoded(raw_id, f"id column {id_column!r}")
                if isinstance(ident, Bad):
                    text, ident = ident, None
            yield number, text, ident
            number += 1


def _read_parquet(source: InputFile, text_column: str, id_column: str | None, start: int):
    check_columns(source, text_column, id_column)
    parquet = pq.ParquetFile(source.path)
    columns = [text_column] + ([id_column] if id_column else [])
    # Skip the row groups before ``start`` without reading them.
    groups, first = [], 0
    for group in range(parquet.num_row_groups):
        rows = parquet.metadata.row_group(group).num_rows
        if first + rows <= start and not groups:
            first += rows
            continue
        groups.append(group)
    if not groups:
        return
    batches = parquet.iter_batches(batch_size=BATCH_ROWS, row_groups=groups, columns=columns)
    for number, text, ident in _table_records(source, batches, text_column, id_column, first + 1):
        if number > start:
            yield number, text, ident


def _read_csv(source: InputFile, text_column: str, id_column: str | None, start: int):
    malformed: dict[int, str] = {}

    def invalid_row(row) -> str:
        # pyarrow numbers rows from the header (1); records are numbered from the first data row.
        malformed[row.number - 1] = f"has {row.actual_columns} fields, expected {row.expected_columns}"
        return "skip"

    check_columns(source, text_column, id_column)
    columns = [text_column] + ([id_column] if id_column else [])
    reader = _open_csv(source, columns, invalid_row)
    records = _table_records(source, _csv_batches(reader, source), text_column, id_column, 1, malformed)
    last = 0
    for number, text, ident in records:
        yield from _malformed_before(malformed, last, number, start)
        last = number
        if number > start:
            yield number, text, ident
    yield from _malformed_before(malformed, last, float("inf"), start)


def _open_csv(source: InputFile, columns: list[str], invalid_row):
    """A streaming CSV reader; ``columns`` read as bytes (only those, when given)."""
    try:
        return pa_csv.open_csv(
            source.path,
            read_options=pa_csv.ReadOptions(use_threads=False, block_size=CSV_BLOCK_BYTES),
            parse_options=pa_csv.ParseOptions(delimiter="\t" if source.format == "tsv" else ",",
                                              newlines_in_values=True, invalid_row_handler=invalid_row),
            convert_options=pa_csv.ConvertOptions(column_types={c: pa.binary() for c in columns},
                                                  include_columns=columns),
        )
    except pa.ArrowInvalid as err:
        raise ValueError(f"{source.path}: cannot read as {source.format.upper()}: {err}") from None


def _csv_batches(reader, source: InputFile):
    while True:
        try:
            yield reader.read_next_batch()
        except StopIteration:
            return
        except pa.ArrowInvalid as err:
            raise ValueError(f"{source.path}: cannot read as {source.format.upper()}: {err}") from None


def _malformed_before(malformed: dict[int, str], after: int, before, start: int):
    for number in sorted(n for n in malformed if after < n < before and n > start):
        yield number, Bad(malformed[number]), None
