"""The batcher: texts of concurrent requests gathered into encoder batches, on one MLX thread.

Nothing here knows of HTTP. A caller submits an :class:`EmbedJob` (one request's texts
for one model) and awaits its :class:`EmbedResult`. In the manner of TEI's queue
(``core/src/queue.rs``):

- every text, not every request, is a queue entry, and its token ids are computed before
  it is queued (with the model's own prompt), so a batch can be sized in padded tokens;
- one long-lived worker thread runs all MLX work (loading, tokenising with the model's
  tokenizer, encoding): MLX streams belong to the thread that made them, and the event
  loop must never wait on the device;
- the worker asks for its next batch when it is free, and the queue fills that batch in
  one pass, oldest first, up to the encoder's token budget (longest text x count) and a
  count cap; the recall lane (``X-Priority: recall`` in the server) is looked at first, and
  a large request is spread over many batches, so a recall slips in between them;
- entries of a cancelled request (its client went away) are dropped before encoding;
- results reach the waiting coroutines through ``loop.call_soon_threadsafe``.

With ``batching=False`` the worker encodes one request at a time, whole, as
``Embedder.encode`` would (engram-embed's design, kept for comparison).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from ..ensemble import check_kind

WAIT_SHARE_OF_ENCODE = 0.1
"""The gathering window grows to this share of the model's last batch encode time."""
RECALL_WINDOW_SECONDS = 30.0
"""For this long after a recall job, normal-lane batches hold at most a quarter of ``max_batch_size``."""
BULK_DIVISOR_NEAR_RECALLS = 4


MAX_RETRY_AFTER_SECONDS = 60


def retry_after_seconds(queued: int, texts_per_second: float | None) -> int:
    """Whole seconds a refused client should wait: the time the recent speed takes to embed
    ``queued`` texts, 1 to :data:`MAX_RETRY_AFTER_SECONDS`; 1 while no speed is known."""
    if not texts_per_second or texts_per_second <= 0:
        return 1
    return int(min(MAX_RETRY_AFTER_SECONDS, max(1, math.ceil(queued / texts_per_second))))


class QueueFullError(RuntimeError):
    """The queue holds as many texts as it may; try again in ``retry_after`` seconds."""

    def __init__(self, queued: int, limit: int, retry_after: int = 1):
        super().__init__(f"the server is busy: {queued} texts are queued (the limit is {limit}); "
                         f"retry in {retry_after} s")
        self.queued = queued
        self.limit = limit
        self.retry_after = retry_after


class InputError(ValueError):
    """A job's input cannot be embedded as asked; ``param`` names the offending field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class ModelUnavailableError(RuntimeError):
    """A model could not be loaded (for example: offline and not in any cache)."""


class BatcherStoppedError(RuntimeError):
    """The batcher was stopped before the job finished."""


class ModelPool(Protocol):
    """What the batcher needs of :class:`kalm_mlx.Ensemble`."""

    def use(self, model: str) -> AbstractContextManager: ...


@dataclass(frozen=True)
class EmbedJob:
    """One request's inputs for one model: texts, or token ids (embedded as given, no prompt)."""

    model: str
    texts: Sequence[str] | None = None
    token_ids: Sequence[Sequence[int]] | None = None
    kind: str = "document"
    """``query`` or ``document``: which of the model's prompts texts get."""
    instruction: str | None = None
    """For instruction-tuned models (KaLM): the task text or name in the query prompt."""
    instruction_optional: bool = False
    """Models without an instruction slot ignore ``instruction`` instead of refusing it."""
    dimensions: int | None = None
    """Matryoshka dims to keep (one of the model's trained dims); None keeps all."""
    truncate: bool = True
    """Cut texts over the model's limit (counted); False refuses them with :class:`InputError`."""
    recall: bool = False
    """Put the texts in the recall lane, ahead of normal work."""

    def __post_init__(self):
        if (self.texts is None) == (self.token_ids is None):
            raise ValueError("give texts or token_ids, not both or neither")
        check_kind(self.kind)

    @property
    def size(self) -> int:
        """Number of inputs."""
        return len(self.texts if self.texts is not None else self.token_ids)


@dataclass
class EmbedResult:
    """What a finished job gives back."""

    model: str
    vectors: np.ndarray
    """float32 (n, dims), L2-normalised, in the job's order."""
    tokens: int
    """Tokens embedded, prompts and special tokens included (after truncation)."""
    truncated: int
    """Inputs cut to the model's token limit."""
    seconds: float
    """From submission to the last vector."""


@dataclass(frozen=True)
class ModelInfo:
    """What the batcher learned about a model the first time it held it."""

    dim: int
    max_tokens: int
    matryoshka_dims: tuple[int, ...]
    max_batch_tokens: int


@dataclass(frozen=True)
class BatchStats:
    """One encoded batch, for metrics."""

    model: str
    texts: int
    tokens: int
    padded_tokens: int
    max_batch_tokens: int
    seconds: float


class Ticket:
    """A submitted job's state: its vectors as they come, and the future to settle.

    Settled from the worker thread through the future's loop. ``cancel`` (from any thread)
    marks the remaining entries to be dropped before they are encoded.
    """

    def __init__(self, job: EmbedJob, future: asyncio.Future | None = None,
                 loop: asyncio.AbstractEventLoop | None = None):
        self.job = job
        self.future = future
        self.loop = loop
        self.cancelled = False
        self.submitted = time.perf_counter()
        self.vectors: np.ndarray | None = None
        self.remaining = 0
        self.tokens = 0
        self.truncated = 0
        self.outcome: EmbedResult | BaseException | None = None
        self.done = threading.Event()

    def cancel(self) -> None:
        """Drop whatever of this job is not encoded yet."""
        self.cancelled = True

    def settle(self, outcome: EmbedResult | BaseException) -> None:
        """Record the job's result or error and wake its waiter (once)."""
        if self.outcome is not None:
            return
        self.outcome = outcome
        self.done.set()
        if self.future is not None and self.loop is not None:
            try:
                self.loop.call_soon_threadsafe(_settle_future, self.future, outcome)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass


def _settle_future(future: asyncio.Future, outcome: EmbedResult | BaseException) -> None:
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


@dataclass
class Entry:
    """One text of one job, tokenised, waiting in a lane."""

    ticket: Ticket
    row: int
    ids: list[int]
    dims: int | None
    enqueued: float = field(default_factory=time.perf_counter)
    seq: int = 0


class EntryQueue:
    """Per-model lanes of entries (recall and normal), and the choice of the next batch.

    Not thread-safe: the :class:`Batcher` guards it with its lock. Kept apart so its policy
    can be tested without threads.
    """

    def __init__(self):
        self._lanes: dict[str, tuple[deque[Entry], deque[Entry]]] = {}
        self._seq = itertools.count()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def count(self, model: str) -> int:
        """Entries queued for ``model``."""
        lanes = self._lanes.get(model)
        return len(lanes[0]) + len(lanes[1]) if lanes else 0

    def push(self, model: str, entries: Sequence[Entry], recall: bool = False) -> None:
        """Queue ``entries`` (in order) for ``model``, in the recall lane or the normal one."""
        lanes = self._lanes.setdefault(model, (deque(), deque()))
        lane = lanes[0] if recall else lanes[1]
        for entry in entries:
            entry.seq = next(self._seq)
            lane.append(entry)
        self._count += len(entries)

    def drain(self) -> list[Entry]:
        """Remove and return every queued entry."""
        entries = [entry for lanes in self._lanes.values() for lane in lanes for entry in lane]
        self._lanes.clear()
        self._count = 0
        return entries

    def drop_cancelled(self) -> list[Entry]:
        """Remove and return the entries whose job was cancelled."""
        dropped = []
        for lanes in self._lanes.values():
            for lane in lanes:
                kept = [entry for entry in lane if not entry.ticket.cancelled]
                if len(kept) != len(lane):
                    dropped.extend(entry for entry in lane if entry.ticket.cancelled)
                    lane.clear()
                    lane.extend(kept)
        self._count -= len(dropped)
        return dropped

    def next_model(self) -> tuple[str, bool] | None:
        """(model, whether it comes from the recall lane) of the next batch, or None when empty.

        The model of the oldest recall entry when there is one, else of the oldest entry.
        """
        for lane_index in (0, 1):
            heads = [(lanes[lane_index][0].seq, model) for model, lanes in self._lanes.items()
                     if lanes[lane_index]]
            if heads:
                return min(heads)[1], lane_index == 0
        return None

    def oldest_enqueued(self) -> float | None:
        """When the oldest queued entry was queued (``time.perf_counter``), or None."""
        times = [lane[0].enqueued for lanes in self._lanes.values() for lane in lanes if lane]
        return min(times) if times else None

    def _candidates(self, model: str) -> Iterator[Entry]:
        recall, normal = self._lanes[model]
        yield from recall
        yield from normal

    def plan(self, model: str, max_count: int, max_tokens: int) -> tuple[int, bool]:
        """(how many entries the next batch of ``model`` would take, whether that batch is full).

        Entries are taken in order, recall lane first, while the batch holds at most
        ``max_count`` entries and ``longest x count <= max_tokens`` padded tokens (one
        entry longer than that still makes a batch on its own).
        """
        count, longest = 0, 0
        for entry in self._candidates(model):
            new_longest = max(longest, len(entry.ids))
            if count and (count + 1 > max_count or new_longest * (count + 1) > max_tokens):
                return count, True
            count, longest = count + 1, new_longest
        return count, count >= max_count

    def take(self, model: str, max_count: int, max_tokens: int) -> list[Entry]:
        """Remove and return the next batch of ``model`` (see :meth:`plan`)."""
        count, _ = self.plan(model, max_count, max_tokens)
        return self._pop(model, count)

    def take_job(self, model: str) -> list[Entry]:
        """Remove and return every entry of the first queued job of ``model`` (no batching)."""
        recall, normal = self._lanes[model]
        lane = recall if recall else normal
        ticket = lane[0].ticket
        count = 0
        for entry in lane:
            if entry.ticket is not ticket:
                break
            count += 1
        return self._pop(model, count)

    def _pop(self, model: str, count: int) -> list[Entry]:
        recall, normal = self._lanes[model]
        batch = []
        for _ in range(count):
            batch.append(recall.popleft() if recall else normal.popleft())
        self._count -= len(batch)
        return batch


class Batcher:
    """Gathers the texts of concurrent jobs into encoder batches on one MLX worker thread.

    ``models`` is a :class:`kalm_mlx.Ensemble` (anything with ``use(name)``, a context
    manager that holds a loaded :class:`~kalm_mlx.Embedder`). ``max_batch_size`` caps the
    texts per batch (the token budget is each embedder's ``max_batch_tokens``);
    ``max_queued_texts`` bounds the texts waiting (beyond it :meth:`submit` raises
    :class:`QueueFullError`, except into an empty queue). When the worker becomes free it
    waits for the next requests of the clients its last batch answered, as long as the
    batch is not full: under steady concurrent load they are on their way and a fuller
    batch costs little more than a small one, while a lone client, or a bulk request
    spread over many batches, never waits. It waits at most ``batch_wait`` seconds, or
    :data:`WAIT_SHARE_OF_ENCODE` of that model's last batch encode time where that is
    longer: a client's round trip through HTTP takes milliseconds, and a model whose
    batch takes 400 ms (KaLM on a CPU) would otherwise settle into two half batches, each
    taken while the other half's clients are still on their way back. ``batch_wait=0``
    never waits. ``batching=False`` encodes one job at a time, whole.
    ``on_batch`` is called (on the worker thread) with each batch's :class:`BatchStats`.
    """

    def __init__(self, models: ModelPool, *, max_batch_size: int = 32, max_queued_texts: int = 8192,
                 batch_wait: float = 0.005, batching: bool = True,
                 on_batch: Callable[[BatchStats], None] | None = None):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, not {max_batch_size}")
        if max_queued_texts < 1:
            raise ValueError(f"max_queued_texts must be at least 1, not {max_queued_texts}")
        if not 0 <= batch_wait <= 1:
            raise ValueError(f"batch_wait must be 0..1 seconds, not {batch_wait}")
        self.models = models
        self.max_batch_size = max_batch_size
        self.max_queued_texts = max_queued_texts
        self.batch_wait = batch_wait
        self.batching = batching
        self.on_batch = on_batch
        self.info: dict[str, ModelInfo] = {}
        """What is known of each model the worker has held (dims, token limits)."""
        self.last_batch_time: float | None = None
        """``time.time()`` when the last batch finished, or None."""
        self._cond = threading.Condition()
        self._jobs: deque[Ticket] = deque()  # submitted, not tokenised yet
        self._recall_jobs: deque[Ticket] = deque()
        self._entries = EntryQueue()
        self._pending_texts = 0  # texts of jobs not tokenised yet
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._free_since = time.perf_counter()  # when the worker finished its last batch
        self._returning: dict[str, int] = {}  # texts of the jobs the last batch of a model finished
        self._queued_when_free: dict[str, int] = {}
        self._encode_seconds: dict[str, float] = {}  # each model's last batch
        self._texts_per_second: float | None = None  # moving average over recent batches
        self._last_recall = -math.inf  # perf_counter() of the last recall job

    # --- life cycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker thread (once)."""
        with self._cond:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name="kalm-mlx-batcher", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop the worker after the batch in hand; fail every job still queued."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._cond:
            tickets = {id(t): t for t in (*self._recall_jobs, *self._jobs)}
            tickets.update((id(entry.ticket), entry.ticket) for entry in self._entries.drain())
            self._jobs.clear()
            self._recall_jobs.clear()
            self._pending_texts = 0
        for ticket in tickets.values():
            ticket.settle(BatcherStoppedError("the server is shutting down"))

    @property
    def queued_texts(self) -> int:
        """Texts waiting: not yet tokenised, or tokenised and not yet encoded."""
        with self._cond:
            return self._pending_texts + len(self._entries)

    # --- submitting ------------------------------------------------------------------------

    def submit(self, job: EmbedJob, future: asyncio.Future | None = None,
               loop: asyncio.AbstractEventLoop | None = None) -> Ticket:
        """Queue ``job``; returns its :class:`Ticket` (settled when done). Thread-safe.

        Raises :class:`QueueFullError` when the queue cannot take ``job.size`` more texts.
        """
        ticket = Ticket(job, future, loop)
        with self._cond:
            if self._stopping:
                raise BatcherStoppedError("the server is shutting down")
            queued = self._pending_texts + len(self._entries)
            if queued and queued + job.size > self.max_queued_texts:
                raise QueueFullError(queued, self.max_queued_texts,
                                     retry_after_seconds(queued, self._texts_per_second))
            if job.recall:
                self._last_recall = time.perf_counter()
                self._recall_jobs.append(ticket)
            else:
                self._jobs.append(ticket)
            self._pending_texts += job.size
            self._cond.notify_all()
        return ticket

    async def embed(self, job: EmbedJob) -> EmbedResult:
        """Submit ``job`` and wait for its result; cancelling the wait drops its queued texts."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        ticket = self.submit(job, future, loop)
        try:
            return await future
        finally:
            if not future.done() or future.cancelled():
                ticket.cancel()

    def embed_sync(self, job: EmbedJob, timeout: float | None = None) -> EmbedResult:
        """Submit ``job`` and block until its result (for threads other than the worker)."""
        ticket = self.submit(job)
        if not ticket.done.wait(timeout):
            ticket.cancel()
            raise TimeoutError(f"the job was not done in {timeout} s")
        if isinstance(ticket.outcome, BaseException):
            raise ticket.outcome
        return ticket.outcome

    def preload(self, models: Sequence[str], warm_text: str = "warm up") -> None:
        """Load each model on the worker thread and embed ``warm_text`` once (``--preload``)."""
        for model in models:
            self.embed_sync(EmbedJob(model=model, texts=[warm_text]))

    # --- the worker ------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._jobs or self._recall_jobs or len(self._entries) or self._stopping):
                    self._cond.wait()
                if self._stopping:
                    return
                jobs = [*self._recall_jobs, *self._jobs]
                self._recall_jobs.clear()
                self._jobs.clear()
            if jobs:
                self._prepare_all(jobs)
                continue
            batch = self._next_batch()
            if batch:
                finished = self._encode(*batch)
                with self._cond:
                    self._free_since = time.perf_counter()
                    self._returning = {batch[0]: finished}
                    pending = sum(t.job.size for t in (*self._recall_jobs, *self._jobs)
                                  if t.job.model == batch[0])
                    self._queued_when_free = {batch[0]: self._entries.count(batch[0]) + pending}

    def _next_batch(self) -> tuple[str, list[Entry]] | None:
        """The next batch to encode, or None after waiting a little for more texts."""
        with self._cond:
            self._entries.drop_cancelled()
            pick = self._entries.next_model()
            if pick is None:
                return None
            model, recall = pick
            if not self.batching:
                return model, self._entries.take_job(model)
            budget = self.info[model].max_batch_tokens
            count = self._batch_count(recall)
            _, full = self._entries.plan(model, count, budget)
            expected = self._queued_when_free.get(model, 0) + self._returning.get(model, 0)
            expecting = self._entries.count(model) < expected
            if expecting and not (full or recall) and self.batch_wait > 0:
                window = max(self.batch_wait, WAIT_SHARE_OF_ENCODE * self._encode_seconds.get(model, 0.0))
                remaining = self._free_since + window - time.perf_counter()
                if remaining > 0:
                    self._cond.wait(remaining)  # new jobs wake the worker to tokenise them
                    return None
            return model, self._entries.take(model, count, budget)

    def _batch_count(self, recall: bool) -> int:
        """Most texts in the next batch: smaller normal-lane batches while recalls come in, since
        a recall that arrives mid-batch waits for the whole batch (a KaLM batch of 32 texts is
        seconds on a CPU), and for short texts a quarter-size batch costs little throughput."""
        if recall or time.perf_counter() - self._last_recall > RECALL_WINDOW_SECONDS:
            return self.max_batch_size
        return max(1, self.max_batch_size // BULK_DIVISOR_NEAR_RECALLS)

    def _prepare_all(self, tickets: list[Ticket]) -> None:
        """Tokenise the new jobs, a model at a time (recall jobs came first), and queue their texts."""
        by_model: dict[str, list[Ticket]] = {}
        for ticket in tickets:
            by_model.setdefault(ticket.job.model, []).append(ticket)
        for model, group in by_model.items():
            live = [t for t in group if not t.cancelled]
            for ticket in group:
                if ticket.cancelled:
                    self._forget(ticket)
            if not live:
                continue
            prepared: list[tuple[Ticket, list[Entry] | BaseException]] = []
            held = False
            try:
                with self.models.use(model) as embedder:
                    held = True
                    self._learn(model, embedder)
                    for ticket in live:
                        try:
                            prepared.append((ticket, self._entries_for(ticket, embedder)))
                        except (InputError, ValueError, TypeError) as err:
                            prepared.append((ticket, err if isinstance(err, InputError)
                                             else InputError(str(err), "input")))
            except Exception as err:  # noqa: BLE001  (the worker must outlive any load failure)
                failure = err if held else ModelUnavailableError(f"model {model} cannot be loaded: {err}")
                done = {id(t) for t, _ in prepared}
                prepared.extend((t, failure) for t in live if id(t) not in done)
            for ticket, outcome in prepared:
                self._queue_or_fail(model, ticket, outcome)

    def _forget(self, ticket: Ticket) -> None:
        with self._cond:
            self._pending_texts -= ticket.job.size

    def _queue_or_fail(self, model: str, ticket: Ticket, outcome: list[Entry] | BaseException) -> None:
        with self._cond:
            self._pending_texts -= ticket.job.size
            if isinstance(outcome, BaseException):
                failed = outcome
            elif not outcome:
                failed = None
            else:
                ticket.remaining = len(outcome)
                self._entries.push(model, outcome, recall=ticket.job.recall)
                return
        if failed is not None:
            ticket.settle(failed)
        else:  # no inputs at all
            ticket.settle(EmbedResult(model, np.zeros((0, self.info[model].dim), np.float32), 0, 0,
                                      time.perf_counter() - ticket.submitted))

    def _learn(self, model: str, embedder) -> None:
        if model not in self.info:
            self.info[model] = ModelInfo(
                dim=embedder.dim,
                max_tokens=embedder.max_tokens,
                matryoshka_dims=tuple(embedder.matryoshka_dims),
                max_batch_tokens=int(embedder.max_batch_tokens),
            )

    def _entries_for(self, ticket: Ticket, embedder) -> list[Entry]:
        """Token ids of a job's inputs, as ``encode`` would make them, checked against the job."""
        job = ticket.job
        dims = self._check_dimensions(job.dimensions, embedder)
        if job.texts is not None:
            prompt = self._prompt(job, embedder)
            texts = [prompt + text for text in job.texts] if prompt else list(job.texts)
            ids, cut = embedder.tokenize_with_truncation(texts)
            truncated = sum(cut)
            if truncated and not job.truncate:
                index = cut.index(True)
                raise InputError(
                    f"input[{index}] is longer than {embedder.name}'s limit of {embedder.max_tokens} "
                    "tokens (prompt included); shorten it or leave truncate on", "input")
        else:
            ids = embedder.check_token_ids(job.token_ids)
            limit = embedder.max_tokens
            over = [i for i, seq in enumerate(ids) if len(seq) > limit]
            if over and not job.truncate:
                raise InputError(f"input[{over[0]}] has {len(ids[over[0]])} tokens, more than "
                                 f"{embedder.name}'s limit of {limit}", "input")
            ids = [seq[:limit] for seq in ids]
            truncated = len(over)
        empty = [i for i, seq in enumerate(ids) if not seq]
        if empty:
            raise InputError(f"input[{empty[0]}] has no tokens", "input")
        ticket.vectors = np.zeros((len(ids), dims or embedder.dim), dtype=np.float32)
        ticket.tokens = sum(len(seq) for seq in ids)
        ticket.truncated = truncated
        return [Entry(ticket, row, seq, dims) for row, seq in enumerate(ids)]

    @staticmethod
    def _prompt(job: EmbedJob, embedder) -> str:
        if job.kind == "document":
            return embedder.prompts.get("document", "")
        if job.instruction is not None and job.instruction_optional and not embedder.meta.get("query_template"):
            return embedder.query_prompt(None)
        try:
            return embedder.query_prompt(job.instruction)
        except (ValueError, TypeError) as err:
            raise InputError(str(err), "instruction") from None

    @staticmethod
    def _check_dimensions(dims: int | None, embedder) -> int | None:
        if dims is None or dims == embedder.dim:
            return None
        trained = tuple(embedder.matryoshka_dims) or (embedder.dim,)
        if dims not in trained:
            raise InputError(f"{embedder.name} gives vectors of {', '.join(map(str, trained))} "
                             f"dimensions, not {dims}", "dimensions")
        return dims

    def _encode(self, model: str, batch: list[Entry]) -> int:
        """Encode one batch and hand out its vectors; returns the texts of the jobs it finished."""
        start = time.perf_counter()
        try:
            with self.models.use(model) as embedder:
                size = len(batch) if self.batching else 32
                pooled = embedder.encode_tokens([entry.ids for entry in batch], batch_size=size,
                                                normalize=False)
                by_dims: dict[int | None, list[int]] = {}
                for position, entry in enumerate(batch):
                    by_dims.setdefault(entry.dims, []).append(position)
                vectors = [None] * len(batch)
                for dims, positions in by_dims.items():
                    finished = embedder.finish(pooled[positions], True, dims)
                    for position, vector in zip(positions, finished):
                        vectors[position] = vector
        except Exception as err:  # noqa: BLE001  (handed to the waiters; the worker carries on)
            for ticket in {id(e.ticket): e.ticket for e in batch}.values():
                ticket.cancel()  # its other texts are not worth encoding now
                ticket.settle(err)
            return 0
        seconds = time.perf_counter() - start
        self._encode_seconds[model] = seconds
        speed = len(batch) / max(seconds, 1e-6)
        with self._cond:
            previous = self._texts_per_second
            self._texts_per_second = speed if previous is None else 0.7 * previous + 0.3 * speed
        self.last_batch_time = time.time()
        finished = 0
        for entry, vector in zip(batch, vectors):
            ticket = entry.ticket
            ticket.vectors[entry.row] = vector
            ticket.remaining -= 1
            if ticket.remaining == 0 and not ticket.cancelled:
                finished += ticket.job.size
                ticket.settle(EmbedResult(model, ticket.vectors, ticket.tokens, ticket.truncated,
                                          time.perf_counter() - ticket.submitted))
        if self.on_batch is not None:
            lengths = [len(entry.ids) for entry in batch]
            self.on_batch(BatchStats(model, len(batch), sum(lengths), max(lengths) * len(batch),
                                     self.info[model].max_batch_tokens, seconds))
        return finished
