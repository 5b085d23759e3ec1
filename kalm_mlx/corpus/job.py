"""``embed_corpus``: files in, Parquet shards and a manifest out, resumable.

Three threads share the work: a reader thread reads and checks the rows, cuts them into
chunks and tokenises them (a bounded queue holds a few ahead), the calling thread encodes each chunk
with every model (all MLX work stays on it), and a writer thread writes the finished
shards and the manifest. Chunks are cut at the same places in every run (never across
a shard boundary or a file), so a resumed job encodes exactly the batches an
uninterrupted one would have.
"""

from __future__ import annotations

import functools
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__, load
from ..ensemble import Ensemble, check_kind
from .encoding import Tokenized, counted_warnings_off, encode_tokenized, job_prompt, tokenize_texts
from .manifest import MANIFEST, Manifest, job_difference, read_manifest
from .readers import (
    Bad,
    BadRowError,
    InputFile,
    check_columns,
    count_records,
    find_inputs,
    read_records,
)
from .shards import Embedded, ShardCutter, ShardWriter, shard_schema

DEFAULT_SHARD_ROWS = 10_000
"""Rows per Parquet shard: at most this many texts are encoded again after a kill."""
CHUNK_ROWS = 2048
"""Texts per encode call. ``encode()`` sorts a call's texts by length into batches, so a
larger call pads less: on a long-tailed corpus, calls of 512 texts cost 8 % more padded
tokens than one call on everything, calls of 2048 about 1 %. The progress bar moves once
per call."""
QUEUE_CHUNKS = 2
"""Chunks the reader may hold ready (read and tokenised) ahead of the encoder."""
DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class Chunk:
    """Consecutive good rows of one input, with the unreadable rows among them."""

    input_index: int
    ids: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    bad: list[int] = field(default_factory=list)
    end: int = 0
    tokenized: dict[str, Tokenized] = field(default_factory=dict)
    """Column -> the texts as that model's token ids (filled on the reader thread)."""


@dataclass
class CorpusSummary:
    """What a corpus job did (totals cover every shard, including those of earlier runs)."""

    output: Path
    texts: int
    """Rows in the output."""
    tokens: dict[str, int]
    truncated: dict[str, int]
    empty: int
    bad_rows: int
    shards: int
    seconds: float
    """Time this run took."""
    texts_this_run: int
    tokens_this_run: int
    resumed_shards: int
    """Shards that earlier runs had finished."""

    @property
    def texts_per_second(self) -> float:
        """Texts this run encoded per second."""
        return self.texts_this_run / self.seconds if self.seconds else 0.0

    def describe(self) -> str:
        """A few lines for people: texts, tokens, time, speed, truncated, empty and bad rows."""
        lines = [f"{self.texts} texts in {self.shards} shard(s) in {self.output}"]
        if self.resumed_shards:
            lines.append(f"{self.resumed_shards} shard(s) were already done")
        lines.append(f"this run: {self.texts_this_run} texts, {self.tokens_this_run} tokens in "
                     f"{self.seconds:.1f} s ({self.texts_per_second:.1f} texts/s, "
                     f"{self.tokens_this_run / self.seconds if self.seconds else 0:.0f} tokens/s)")
        truncated = ", ".join(f"{n} ({m})" for m, n in self.truncated.items())
        lines.append(f"truncated texts: {truncated}; empty texts: {self.empty}; "
                     f"bad rows skipped: {self.bad_rows}")
        return "\n".join(lines)


def embed_corpus(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    output: str | os.PathLike,
    models: str | Sequence[str] = "minilm",
    *,
    kind: str = "document",
    instruction: str | None = None,
    dim: int | None = None,
    dtype: str | None = None,
    keep_text: bool = False,
    shard_rows: int = DEFAULT_SHARD_ROWS,
    text_column: str = "text",
    id_column: str | None = None,
    skip_bad_rows: bool = False,
    force: bool = False,
    batch_size: int = 32,
    progress: bool = True,
) -> CorpusSummary:
    """Embed every text of ``inputs`` into Parquet shards and a manifest in ``output``.

    ``inputs`` are JSONL, Parquet, CSV/TSV or plain-text files (one text per line),
    folders of them or glob patterns; ``models`` one model or several (a comma-separated
    string or a list), each giving one vector column. ``kind`` picks each model's
    document or query prompt (``instruction`` for queries); ``dim`` truncates every model
    (Matryoshka). Rows are identified by ``id_column`` or by ``FILE:RECORD``.

    Running the same job again resumes it (finished shards are kept); a different job in
    the same folder is refused with the difference named, unless ``force`` starts over.
    An unreadable row raises :class:`~kalm_mlx.corpus.BadRowError` naming the file and
    row, or is skipped and counted with ``skip_bad_rows``. ``progress`` shows a bar and
    prints the summary on stderr.
    """
    return run_job(inputs, output, models, run_single_machine, kind=kind, instruction=instruction,
                   dim=dim, dtype=dtype, keep_text=keep_text, shard_rows=shard_rows,
                   text_column=text_column, id_column=id_column, skip_bad_rows=skip_bad_rows,
                   force=force, batch_size=batch_size, progress=progress)


def run_job(inputs, output, models, runner: Callable[[JobPlan, Manifest, bool], None], *,
            progress: bool = True, **options) -> CorpusSummary:
    """Check and plan a job, open its output, and let ``runner`` encode what is left.

    ``runner(plan, manifest, progress)`` encodes from ``plan.start(manifest)`` on and
    records each shard in ``manifest``: :func:`run_single_machine` here, the Ray Data
    runner in :mod:`kalm_mlx.ray`. ``options`` are :func:`embed_corpus`'s.
    """
    started = time.perf_counter()
    plan = JobPlan.prepare(inputs, output, models, **options)
    plan.load_models()
    manifest = plan.open_output()
    done_before = len(manifest.shards)
    if not manifest.complete:
        runner(plan, manifest, progress)
    summary = plan.summary(manifest, time.perf_counter() - started, done_before)
    if progress:
        print(summary.describe(), file=sys.stderr)
    return summary


@dataclass
class JobPlan:
    """A checked corpus job: its inputs, its models and its options, before anything is written."""

    inputs: list[InputFile]
    output: Path
    ensemble: Ensemble
    kind: str
    instruction: str | None
    dim: int | None
    dtype: str | None
    options: dict
    force: bool
    batch_size: int
    models: list[dict] = field(default_factory=list)
    """Per model: the name given, its column, dim and prompt (filled by :meth:`load_models`)."""
    previous: Manifest | None = None

    @classmethod
    def prepare(cls, inputs, output, models="minilm", *, kind="document", instruction=None, dim=None,
                dtype=None, keep_text=False, shard_rows=DEFAULT_SHARD_ROWS, text_column="text",
                id_column=None, skip_bad_rows=False, force=False, batch_size=32) -> JobPlan:
        """Check :func:`embed_corpus`'s arguments and the output folder; find the inputs. Writes nothing."""
        check_kind(kind)
        if instruction is not None and kind != "query":
            raise ValueError("an instruction applies to queries only (kind='query')")
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
        for name, value in (("shard_rows", shard_rows), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, not {value!r}")
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 1):
            raise ValueError(f"dim must be a positive integer, not {dim!r}")
        if not text_column or (id_column is not None and not id_column):
            raise ValueError("column names must not be empty")
        if isinstance(models, os.PathLike):
            models = [os.fspath(models)]
        names = [m.strip() for m in models.split(",")] if isinstance(models, str) else list(models)
        output = Path(output).expanduser().resolve()
        files = find_inputs(inputs, exclude=output)
        if id_column is not None and any(f.format == "text" for f in files):
            raise ValueError(f"plain text inputs have no columns, so no id column {id_column!r}: "
                             f"{next(f.path for f in files if f.format == 'text')}")
        for source in files:
            check_columns(source, text_column, id_column)
        ensemble = Ensemble(names, loader=functools.partial(load, dtype=dtype))
        options = {"text_column": text_column, "id_column": id_column, "keep_text": bool(keep_text),
                   "shard_rows": shard_rows, "skip_bad_rows": bool(skip_bad_rows)}
        plan = cls(files, output, ensemble, kind, instruction, dim, dtype, options, force, batch_size)
        plan.previous = plan._check_output()
        return plan

    def _check_output(self) -> Manifest | None:
        """The manifest of an earlier run of this job to resume, or None to start afresh."""
        if self.output.exists() and not self.output.is_dir():
            raise ValueError(f"{self.output} exists and is not a folder")
        if not self.output.exists():
            return None
        has_manifest = (self.output / MANIFEST).exists()
        if not has_manifest and any(p.name not in self._own_files() for p in self.output.iterdir()):
            raise ValueError(f"{self.output} is not empty and holds no {MANIFEST}: "
                             "give an empty or new folder")
        previous = None if self.force or not has_manifest else read_manifest(self.output)
        if previous is None or not previous.shards:
            return None  # nothing done yet: start afresh
        self._refuse_if_different(previous.job)
        return previous

    def _own_files(self) -> set[str]:
        return {MANIFEST} | {p.name for p in self.output.glob("part-*.parquet")} | {
            p.name for p in self.output.glob(".*.tmp")}

    def _refuse_if_different(self, old: dict) -> None:
        difference = job_difference(old, self.job())
        if difference is not None:
            raise ValueError(f"{self.output} holds a different job ({difference}); "
                             "use --force to start over")

    def load_models(self) -> None:
        """Load every model, check ``dim`` against each and describe it in :attr:`models`."""
        columns = set()
        for name in self.ensemble.models:
            with self.ensemble.use(name) as embedder:
                embedder.encode([], truncate_dim=self.dim)  # a ValueError for a dim it lacks
                column = embedder.name
                if column in columns or column in ("id", "text"):
                    raise ValueError(f"two models give the column {column!r}, or it clashes with id/text")
                self.models.append({"model": name, "column": column, "dim": self.dim or embedder.dim,
                                    "prompt": job_prompt(embedder, self.kind, self.instruction)})
                columns.add(column)
        if self.previous is not None:
            self._refuse_if_different(self.previous.job)

    def job(self) -> dict:
        """The manifest's description of this job (models by name only until they are loaded)."""
        models = self.models or [{"model": name} for name in self.ensemble.models]
        return {"kalm_mlx_version": __version__, "kind": self.kind, "instruction": self.instruction,
                "dim": self.dim, "dtype": self.dtype, "models": models,
                "options": self.options, "inputs": [f.describe() for f in self.inputs]}

    def open_output(self) -> Manifest:
        """Create the output folder (or empty it of an earlier job); the manifest to continue from.

        Leftovers of a killed run (temporary files, shards the manifest does not list) go.
        """
        if self.previous is None and self.output.exists():
            for name in self._own_files():
                (self.output / name).unlink(missing_ok=True)
        self.output.mkdir(parents=True, exist_ok=True)
        manifest = self.previous if self.previous is not None else Manifest(self.job())
        listed = {s.file for s in manifest.shards}
        for name in self._own_files() - listed - {MANIFEST}:
            (self.output / name).unlink(missing_ok=True)
        manifest.write(self.output)
        return manifest

    def summary(self, manifest: Manifest, seconds: float, done_before: int) -> CorpusSummary:
        """The summary of a run that found ``done_before`` shards done."""
        totals = manifest.totals()
        new = manifest.shards[done_before:]
        return CorpusSummary(
            self.output, totals["rows"], totals["tokens"], totals["truncated"], totals["empty"],
            totals["bad_rows"], len(manifest.shards), seconds, sum(s.rows for s in new),
            sum(sum(s.tokens.values()) for s in new), done_before)

    def start(self, manifest: Manifest) -> tuple[int, int]:
        """Where reading resumes: (input index, records of it already consumed)."""
        return tuple(manifest.shards[-1].end) if manifest.shards else (0, 0)

    def remaining_records(self, manifest: Manifest) -> int:
        """About how many records are left to read (for a progress bar)."""
        index, consumed = self.start(manifest)
        return max(sum(count_records(f) for f in self.inputs[index:]) - consumed, 0)


def run_single_machine(plan: JobPlan, manifest: Manifest, progress: bool) -> None:
    """Encode what is left of the job on this machine, shard by shard, into ``manifest``."""
    # The reader thread tokenises with each model's tokenizer while this thread encodes.
    # The job's ensemble has no memory budget, so these embedders stay loaded throughout.
    tokenizers = {}
    for model in plan.models:
        with plan.ensemble.use(model["model"]) as embedder:
            tokenizers[model["column"]] = (embedder, model["prompt"])
    with counted_warnings_off():
        _encode_chunks(plan, manifest, progress, ChunkReader(plan, plan.start(manifest), tokenizers))


def _encode_chunks(plan: JobPlan, manifest: Manifest, progress: bool, reader: ChunkReader) -> None:
    try:
        with ShardSink(plan, manifest, progress) as sink:
            for chunk in reader:
                vectors = {}
                for model in plan.models:
                    column = model["column"]
                    with plan.ensemble.use(model["model"]) as embedder:
                        vectors[column] = encode_tokenized(embedder, chunk.tokenized[column], plan.dim,
                                                           plan.batch_size)
                sink.add(Embedded(chunk.input_index, chunk.ids, chunk.texts, chunk.rows, vectors,
                                  {c: t.tokens for c, t in chunk.tokenized.items()},
                                  {c: t.truncated for c, t in chunk.tokenized.items()}, chunk.bad, chunk.end))
    finally:
        reader.close()


class ShardSink:
    """Where a runner puts embedded rows: cut into shards, written, recorded, shown on a bar.

    Used as a context manager; leaving it normally writes the last shard and marks the
    manifest complete, leaving it with an error waits for the shards already queued.
    """

    def __init__(self, plan: JobPlan, manifest: Manifest, progress: bool):
        self.plan = plan
        self.manifest = manifest
        schema = shard_schema({m["column"]: m["dim"] for m in plan.models}, plan.options["keep_text"])
        self._writer = ShardWriter(plan.output, schema, self._record)
        self._cutter = ShardCutter(plan.options["shard_rows"], len(manifest.shards), self._writer.submit)
        self._bar = None
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=plan.remaining_records(manifest), unit="text", desc="index",
                             dynamic_ncols=True)
        self._tokens = 0
        self._clock = time.perf_counter()

    def add(self, part: Embedded) -> None:
        """Rows of one input, with their vectors and counts."""
        if not self.plan.options["keep_text"]:
            part.texts = []
        self._cutter.add(part)
        if self._bar is not None:
            self._tokens += sum(int(c.sum()) for c in part.tokens.values())
            self._bar.update(len(part) + len(part.bad))
            rate = self._tokens / max(time.perf_counter() - self._clock, 1e-9)
            self._bar.set_postfix_str(f"{rate:.0f} tok/s", refresh=False)

    def _record(self, shard) -> None:  # on the writer thread
        self.manifest.shards.append(shard)
        self.manifest.write(self.plan.output)

    def __enter__(self) -> ShardSink:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        try:
            if kind is None:
                self.manifest.trailing_bad_rows = self._cutter.finish()
        finally:
            if self._bar is not None:
                self._bar.close()
            self._writer.close()
        if kind is None:
            self.manifest.complete = True
            self.manifest.write(self.plan.output)


class ChunkReader:
    """Reads (and tokenises) the inputs on a thread of its own, in chunks of at most ``CHUNK_ROWS`` good rows.

    Iterating gives the chunks in input order; an error on the reader thread (a bad row
    without ``skip_bad_rows``, an unreadable file) is raised there. Chunks end at every
    ``shard_rows``-th good row, at the end of each input and every ``CHUNK_ROWS`` good rows
    after a shard's start, which makes them the same in every run of a job.
    """

    def __init__(self, plan: JobPlan, start: tuple[int, int], tokenizers: dict[str, tuple] | None = None):
        self.plan = plan
        self.start = start
        self.tokenizers = tokenizers or {}
        """Column -> (embedder, prompt): each chunk is tokenised for every model here."""
        self._queue: queue.Queue = queue.Queue(maxsize=QUEUE_CHUNKS)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kalm-mlx-corpus-reader", daemon=True)
        self._thread.start()

    def __iter__(self) -> Iterator[Chunk]:
        while (item := self._queue.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        """Stop the reader thread (it may be waiting on a full queue)."""
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread.join()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def _run(self) -> None:
        try:
            for chunk in chunk_records(self.plan, self.start):
                for column, (embedder, prompt) in self.tokenizers.items():
                    chunk.tokenized[column] = tokenize_texts(embedder, chunk.texts, prompt)
                if not self._put(chunk):
                    return
            self._put(None)
        except BaseException as err:  # handed to the encoding thread
            self._put(err)


def chunk_records(plan: JobPlan, start: tuple[int, int]) -> Iterator[Chunk]:
    """The job's good rows from ``start`` on, cut into chunks (see :class:`ChunkReader`)."""
    shard_rows = plan.options["shard_rows"]
    skip = plan.options["skip_bad_rows"]
    in_shard = 0  # good rows since the current shard's start
    first_input, consumed = start
    for index in range(first_input, len(plan.inputs)):
        source = plan.inputs[index]
        chunk = Chunk(index, end=consumed if index == first_input else 0)
        records = read_records(source, plan.options["text_column"], plan.options["id_column"],
                               start=chunk.end)
        for number, text, ident in records:
            chunk.end = number
            if isinstance(text, Bad):
                if not skip:
                    raise BadRowError.at(source, number, text)
                chunk.bad.append(number)
                continue
            chunk.ids.append(ident)
            chunk.texts.append(text)
            chunk.rows.append(number)
            in_shard += 1
            if in_shard == shard_rows or in_shard % CHUNK_ROWS == 0:
                in_shard %= shard_rows
                yield chunk
                chunk = Chunk(index, end=number)
        if chunk.rows or chunk.bad:
            yield chunk

