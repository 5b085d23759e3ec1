"""Parquet shards: the schema, atomic writes, and cutting a stream of embedded rows into shards.

A shard holds ``id`` (string), ``text`` (string, with ``keep_text``) and one
``fixed_size_list<float32, dim>`` column per model, named after the model. Shards are
cut every ``shard_rows`` good rows, counted from the start of the job, so the same
inputs always give the same shards whichever run wrote them.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .manifest import SHARD_PATTERN, Shard, replace_atomically


@dataclass
class Embedded:
    """Rows of one input with their vectors and per-row counts, in input order."""

    input_index: int
    ids: list[str]
    texts: list[str]
    rows: list[int]
    """1-based record numbers."""
    vectors: dict[str, np.ndarray]
    """Column name -> (n, dim) float32."""
    tokens: dict[str, np.ndarray]
    """Column name -> tokens per row."""
    truncated: dict[str, np.ndarray]
    """Column name -> whether each row was truncated."""
    bad: list[int] = field(default_factory=list)
    """Record numbers of the rows skipped as unreadable."""
    end: int = 0
    """Records of the input consumed after these rows."""

    def __len__(self) -> int:
        return len(self.ids)

    def split(self, count: int) -> tuple[Embedded, Embedded]:
        """The first ``count`` rows (with the bad rows before the last of them) and the rest."""
        cut = self.rows[count - 1]
        head = Embedded(
            self.input_index, self.ids[:count], self.texts[:count], self.rows[:count],
            {k: v[:count] for k, v in self.vectors.items()}, {k: v[:count] for k, v in self.tokens.items()},
            {k: v[:count] for k, v in self.truncated.items()}, [b for b in self.bad if b < cut], cut)
        tail = Embedded(
            self.input_index, self.ids[count:], self.texts[count:], self.rows[count:],
            {k: v[count:] for k, v in self.vectors.items()}, {k: v[count:] for k, v in self.tokens.items()},
            {k: v[count:] for k, v in self.truncated.items()}, [b for b in self.bad if b > cut], self.end)
        return head, tail


def shard_schema(dims: dict[str, int], keep_text: bool) -> pa.Schema:
    """The Arrow schema of a shard for ``{column: dim}``."""
    fields = [pa.field("id", pa.string(), nullable=False)]
    if keep_text:
        fields.append(pa.field("text", pa.string(), nullable=False))
    fields += [pa.field(name, pa.list_(pa.float32(), dim), nullable=False) for name, dim in dims.items()]
    return pa.schema(fields)


def shard_table(parts: Sequence[Embedded], schema: pa.Schema) -> pa.Table:
    """One Arrow table of ``parts``' rows in ``schema``."""
    columns = [pa.array([i for p in parts for i in p.ids], pa.string())]
    if "text" in schema.names:
        columns.append(pa.array([t for p in parts for t in p.texts], pa.string()))
    for name in schema.names[len(columns):]:
        dim = schema.field(name).type.list_size
        flat = np.concatenate([p.vectors[name] for p in parts]).astype(np.float32, copy=False).reshape(-1)
        columns.append(pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), dim))
    return pa.Table.from_arrays(columns, schema=schema)


def write_shard(table: pa.Table, path: Path) -> None:
    """Write ``table`` to ``path`` atomically (see :func:`~kalm_mlx.corpus.manifest.replace_atomically`)."""
    replace_atomically(path, lambda temp: pq.write_table(table, temp))


class ShardCutter:
    """Collects :class:`Embedded` rows and hands a full shard to ``emit`` every ``shard_rows`` rows."""

    def __init__(self, shard_rows: int, first_index: int,
                 emit: Callable[[int, list[Embedded], int], None]):
        self.shard_rows = shard_rows
        self.index = first_index
        """Number of the shard being filled."""
        self._emit = emit
        self._parts: list[Embedded] = []
        self._rows = 0
        self._bad = 0

    def add(self, part: Embedded) -> None:
        """Add rows (and the bad rows among them); full shards are emitted as they fill."""
        while len(part) >= self.shard_rows - self._rows:
            head, part = part.split(self.shard_rows - self._rows)
            self._take(head)
            self._flush()
        self._take(part)

    def finish(self) -> int:
        """Emit the last, partial shard; returns the bad rows seen after the last shard's end."""
        if self._rows:
            self._flush()
        bad, self._bad = self._bad, 0
        return bad

    def _take(self, part: Embedded) -> None:
        self._bad += len(part.bad)
        if len(part):
            self._parts.append(part)
            self._rows += len(part)

    def _flush(self) -> None:
        self._emit(self.index, self._parts, self._bad)
        self.index += 1
        self._parts, self._rows, self._bad = [], 0, 0


def shard_record(index: int, parts: list[Embedded], bad_rows: int) -> Shard:
    """The manifest entry of a shard made of ``parts``."""
    last = parts[-1]
    columns = parts[0].vectors.keys()
    return Shard(
        SHARD_PATTERN.format(index), sum(len(p) for p in parts), (last.input_index, last.end),
        {c: int(sum(int(p.tokens[c].sum()) for p in parts)) for c in columns},
        {c: int(sum(int(p.truncated[c].sum()) for p in parts)) for c in columns},
        max(sum(int((p.tokens[c] == 0).sum()) for p in parts) for c in columns), bad_rows)


class ShardWriter:
    """Writes shards on a thread of its own, so that encoding does not wait for the disk.

    ``submit`` blocks only when ``depth`` shards are already waiting. ``on_written`` runs
    on the writer thread after each rename (the job records the shard in its manifest).
    An error on the writer thread is raised again by the next ``submit`` or by ``close``.
    """

    def __init__(self, folder: Path, schema: pa.Schema, on_written: Callable[[Shard], None], depth: int = 2):
        self.folder = Path(folder)
        self.schema = schema
        self._on_written = on_written
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="kalm-mlx-shard-writer", daemon=True)
        self._thread.start()

    def submit(self, index: int, parts: list[Embedded], bad_rows: int) -> None:
        """Queue a shard for writing."""
        self._raise_error()
        self._queue.put((index, parts, bad_rows))

    def close(self) -> None:
        """Wait for the queued shards to be written; raise the writer's error if it had one."""
        self._queue.put(None)
        self._thread.join()
        self._raise_error()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is not None:
                continue  # drain: the job is failing
            index, parts, bad_rows = item
            try:
                record = shard_record(index, parts, bad_rows)
                write_shard(shard_table(parts, self.schema), self.folder / record.file)
                self._on_written(record)
            except BaseException as err:  # handed to the encoding thread
                self._error = err
