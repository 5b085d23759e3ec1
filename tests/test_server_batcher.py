"""The batcher without HTTP: queue policy (order, recall lane, token budget, cancelled entries),
the worker thread, and vectors equal to ``Embedder.encode`` whatever shares the batch."""

from __future__ import annotations

import asyncio
import threading
import time
from contextlib import contextmanager

import numpy as np
import pytest

from kalm_mlx.server.batcher import (
    MAX_RETRY_AFTER_SECONDS,
    Batcher,
    EmbedJob,
    Entry,
    EntryQueue,
    InputError,
    ModelUnavailableError,
    QueueFullError,
    Ticket,
    retry_after_seconds,
)
from tests.helpers import TEXTS

pytestmark = pytest.mark.filterwarnings("ignore::kalm_mlx.TruncationWarning")


def entries(ticket: Ticket, lengths: list[int]) -> list[Entry]:
    return [Entry(ticket, row, list(range(1, n + 1)), None) for row, n in enumerate(lengths)]


def ticket(model: str = "a", size: int = 1, recall: bool = False) -> Ticket:
    return Ticket(EmbedJob(model=model, token_ids=[[1]] * size, recall=recall))


# --- the queue's policy ---------------------------------------------------------------------


def test_queue_takes_oldest_first_within_count_and_token_budget():
    queue = EntryQueue()
    first, second = ticket(size=3), ticket(size=2)
    queue.push("a", entries(first, [4, 4, 4]))
    queue.push("a", entries(second, [10, 2]))
    assert queue.next_model() == ("a", False)
    # 4,4,4 then 10 would pad to 10 x 4 = 40 > 32: the batch stops before it.
    batch = queue.take("a", max_count=8, max_tokens=32)
    assert [(e.ticket, e.row) for e in batch] == [(first, 0), (first, 1), (first, 2)]
    # 10 and 2 pad to 20 <= 32; the count cap holds too.
    assert queue.plan("a", max_count=8, max_tokens=32) == (2, False)
    assert [e.row for e in queue.take("a", max_count=1, max_tokens=32)] == [0]
    assert len(queue) == 1


def test_queue_gives_an_overlong_text_a_batch_of_its_own():
    queue = EntryQueue()
    queue.push("a", entries(ticket(size=2), [50, 1]))
    assert len(queue.take("a", max_count=8, max_tokens=16)) == 1
    assert len(queue.take("a", max_count=8, max_tokens=16)) == 1


def test_recall_lane_goes_first_and_picks_its_model():
    queue = EntryQueue()
    bulk_a, bulk_b, recall_b = ticket("a", 3), ticket("b", 1), ticket("b", 1, recall=True)
    queue.push("a", entries(bulk_a, [2, 2, 2]))
    queue.push("b", entries(bulk_b, [2]))
    queue.push("b", entries(recall_b, [2]), recall=True)
    assert queue.next_model() == ("b", True)
    batch = queue.take("b", max_count=8, max_tokens=100)
    assert [e.ticket for e in batch] == [recall_b, bulk_b]  # recall first, then the model's bulk
    assert queue.next_model() == ("a", False)


def test_oldest_model_goes_first_among_normal_work():
    queue = EntryQueue()
    queue.push("b", entries(ticket("b"), [1]))
    queue.push("a", entries(ticket("a"), [1]))
    assert queue.next_model() == ("b", False)


def test_cancelled_entries_are_dropped_before_a_batch():
    queue = EntryQueue()
    gone, kept = ticket(size=2), ticket(size=1)
    queue.push("a", entries(gone, [3, 3]))
    queue.push("a", entries(kept, [3]))
    gone.cancel()
    assert [e.ticket for e in queue.drop_cancelled()] == [gone, gone]
    assert [e.ticket for e in queue.take("a", 8, 100)] == [kept]
    assert len(queue) == 0 and queue.next_model() is None


def test_take_job_takes_one_whole_request():
    queue = EntryQueue()
    first, second = ticket(size=3), ticket(size=2)
    queue.push("a", entries(first, [1, 1, 1]))
    queue.push("a", entries(second, [1, 1]))
    assert [e.ticket for e in queue.take_job("a")] == [first] * 3
    assert [e.ticket for e in queue.drain()] == [second] * 2


# --- the worker, with a fake model pool -----------------------------------------------------


class FakeEmbedder:
    """Token ids are character codes; a vector is (length, sum of ids, 1, 1), normalised."""

    def __init__(self, name: str, max_batch_tokens: int = 64):
        self.name, self.dim, self.max_tokens = name, 4, 16
        self.matryoshka_dims = (4, 2)
        self.max_batch_tokens = max_batch_tokens
        self.prompts = {"query": "q:", "document": ""}
        self.meta = {"query_template": None}
        self.batches: list[list[list[int]]] = []

    def query_prompt(self, instruction=None):
        if instruction is not None:
            raise ValueError(f"{self.name} takes no instruction")
        return self.prompts["query"]

    def tokenize_with_truncation(self, texts):
        ids = [[ord(c) for c in text] for text in texts]
        return [seq[: self.max_tokens] for seq in ids], [len(seq) > self.max_tokens for seq in ids]

    def check_token_ids(self, token_ids):
        for i, seq in enumerate(token_ids):
            if any(t >= 1000 for t in seq):
                raise ValueError(f"token_ids[{i}] is outside the vocabulary")
        return [list(seq) for seq in token_ids]

    def encode_tokens(self, token_ids, batch_size=32, normalize=True):
        self.batches.append([list(seq) for seq in token_ids])
        return np.array([[len(s), sum(s), 1, 1] for s in token_ids], dtype=np.float32)

    def finish(self, pooled, normalize=True, truncate_dim=None):
        pooled = pooled[:, :truncate_dim] if truncate_dim else pooled
        return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


class FakePool:
    def __init__(self, **embedders):
        self.embedders = embedders
        self.gate = threading.Event()
        self.gate.set()
        self.uses: list[str] = []

    @contextmanager
    def use(self, name):
        self.gate.wait(10)
        if name not in self.embedders:
            raise FileNotFoundError(f"{name}: offline and not cached")
        self.uses.append(name)
        yield self.embedders[name]


def expected(text: str, prompt: str = "", dims: int | None = None) -> np.ndarray:
    ids = [ord(c) for c in prompt + text][:16]
    vector = np.array([len(ids), sum(ids), 1, 1], dtype=np.float32)[:dims]
    return vector / np.linalg.norm(vector)


def test_worker_gathers_concurrent_jobs_into_batches_and_keeps_each_order():
    pool = FakePool(a=FakeEmbedder("a", max_batch_tokens=1000))
    batcher = Batcher(pool, max_batch_size=32, batch_wait=0)
    pool.gate.clear()  # hold the worker until every job is queued
    batcher.start()
    try:
        texts = [["one", "two"], ["three"], ["four", "five", "six"]]
        tickets = [batcher.submit(EmbedJob(model="a", texts=t)) for t in texts]
        assert batcher.queued_texts == 6
        pool.gate.set()
        for t, job_texts in zip(tickets, texts):
            assert t.done.wait(10)
            np.testing.assert_allclose(t.outcome.vectors, [expected(x) for x in job_texts], rtol=1e-6)
            assert t.outcome.tokens == sum(len(x) for x in job_texts)
        # Tokenised together, encoded as one batch.
        assert [len(batch) for batch in pool.embedders["a"].batches] == [6]
    finally:
        batcher.stop()


def test_worker_splits_by_token_budget_and_count_cap():
    pool = FakePool(a=FakeEmbedder("a", max_batch_tokens=12))
    batcher = Batcher(pool, max_batch_size=2, batch_wait=0)
    pool.gate.clear()
    batcher.start()
    try:
        job = batcher.submit(EmbedJob(model="a", texts=["aaaa", "bbbb", "cccc", "dd", "e"]))
        pool.gate.set()
        assert job.done.wait(10)
        batches = pool.embedders["a"].batches
        assert all(len(b) <= 2 and len(b) * max(map(len, b)) <= 12 for b in batches)
        assert sum(len(b) for b in batches) == 5
    finally:
        batcher.stop()


def test_recall_job_overtakes_queued_bulk_work():
    pool = FakePool(a=FakeEmbedder("a", max_batch_tokens=8))
    batcher = Batcher(pool, max_batch_size=1, batch_wait=0)
    pool.gate.clear()
    batcher.start()
    try:
        bulk = batcher.submit(EmbedJob(model="a", texts=[f"bulk{i}" for i in range(6)]))
        recalls = [batcher.submit(EmbedJob(model="a", texts=[f"RECALL{i}"], recall=True)) for i in range(2)]
        pool.gate.set()
        assert bulk.done.wait(10) and all(r.done.wait(10) for r in recalls)
        order = [bytes(b[0]).decode() for b in pool.embedders["a"].batches]
        assert order[:2] == ["RECALL0", "RECALL1"] and order[2:] == [f"bulk{i}" for i in range(6)]
    finally:
        batcher.stop()


class SlowEmbedder(FakeEmbedder):
    """Each batch takes ``seconds``, as a large model's does on a CPU."""

    def __init__(self, name: str, seconds: float):
        super().__init__(name, max_batch_tokens=1000)
        self.seconds = seconds

    def encode_tokens(self, token_ids, batch_size=32, normalize=True):
        time.sleep(self.seconds)
        return super().encode_tokens(token_ids, batch_size, normalize)


def test_a_slow_model_waits_for_its_returning_clients_longer_than_batch_wait():
    """Closed-loop clients that take 20 ms to come back: a 1 ms window alone would take them one
    by one, a tenth of a 1 s batch (100 ms) gathers them all again."""
    embedder = SlowEmbedder("a", seconds=1.0)
    pool = FakePool(a=embedder)
    batcher = Batcher(pool, max_batch_size=32, batch_wait=0.001)
    pool.gate.clear()  # the first round is queued whole before the worker starts
    batcher.start()
    rounds = 3

    def client(i):
        for r in range(rounds):
            ticket = batcher.submit(EmbedJob(model="a", texts=[f"c{i}r{r}"]))
            assert ticket.done.wait(30)
            time.sleep(0.02)

    try:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        while batcher.queued_texts < 4:
            time.sleep(0.01)
        pool.gate.set()
        for thread in threads:
            thread.join(60)
    finally:
        batcher.stop()
    assert [len(batch) for batch in embedder.batches] == [4] * rounds


def test_bulk_batches_shrink_while_recalls_come_in():
    pool = FakePool(a=FakeEmbedder("a", max_batch_tokens=1000))
    batcher = Batcher(pool, max_batch_size=8, batch_wait=0)
    batcher.start()
    try:
        assert batcher.submit(EmbedJob(model="a", texts=["bulk"] * 16)).done.wait(10)
        assert [len(b) for b in pool.embedders["a"].batches] == [8, 8]
        pool.embedders["a"].batches.clear()
        assert batcher.submit(EmbedJob(model="a", texts=["r"] * 3, recall=True)).done.wait(10)
        assert batcher.submit(EmbedJob(model="a", texts=["bulk"] * 16)).done.wait(10)
        assert [len(b) for b in pool.embedders["a"].batches] == [3, 2, 2, 2, 2, 2, 2, 2, 2]
    finally:
        batcher.stop()


def test_cancelled_job_is_not_encoded():
    pool = FakePool(a=FakeEmbedder("a"))
    batcher = Batcher(pool, batch_wait=0)
    pool.gate.clear()
    batcher.start()
    try:
        gone = batcher.submit(EmbedJob(model="a", texts=["gone", "away"]))
        kept = batcher.submit(EmbedJob(model="a", texts=["kept"]))
        gone.cancel()
        pool.gate.set()
        assert kept.done.wait(10)
        encoded = [bytes(seq).decode() for batch in pool.embedders["a"].batches for seq in batch]
        assert encoded == ["kept"]
        assert not gone.done.is_set()
    finally:
        batcher.stop()
    assert batcher.queued_texts == 0


def test_queue_bound_refuses_beyond_limit_but_admits_into_an_empty_queue():
    batcher = Batcher(FakePool(a=FakeEmbedder("a")), max_queued_texts=3)  # not started
    batcher.submit(EmbedJob(model="a", texts=["x"] * 5))  # an empty queue takes any job
    with pytest.raises(QueueFullError, match="5 texts are queued") as refused:
        batcher.submit(EmbedJob(model="a", texts=["y"]))
    assert refused.value.retry_after == 1  # no batch has run: no speed known yet
    batcher._texts_per_second = 2.0  # as if recent batches ran at 2 texts/s
    with pytest.raises(QueueFullError, match="retry in 3 s") as refused:
        batcher.submit(EmbedJob(model="a", texts=["y"]))
    assert refused.value.retry_after == 3
    batcher.stop()


def test_retry_after_is_the_time_to_embed_the_queue_within_bounds():
    assert retry_after_seconds(100, None) == 1
    assert retry_after_seconds(100, 0.0) == 1
    assert retry_after_seconds(100, 1000.0) == 1
    assert retry_after_seconds(100, 40.0) == 3
    assert retry_after_seconds(10**6, 1.0) == MAX_RETRY_AFTER_SECONDS


def test_batches_teach_the_batcher_its_speed():
    batcher = Batcher(FakePool(a=FakeEmbedder("a")), batch_wait=0)
    batcher.start()
    try:
        assert batcher.submit(EmbedJob(model="a", texts=["x", "y"])).done.wait(10)
    finally:
        batcher.stop()
    assert batcher._texts_per_second > 0


def test_job_errors_reach_the_waiter():
    pool = FakePool(a=FakeEmbedder("a"))
    batcher = Batcher(pool, batch_wait=0)
    batcher.start()
    try:
        with pytest.raises(ModelUnavailableError, match="offline and not cached"):
            batcher.embed_sync(EmbedJob(model="missing", texts=["x"]), timeout=10)
        with pytest.raises(InputError, match="input\\[1\\] is longer") as err:
            batcher.embed_sync(EmbedJob(model="a", texts=["ok", "x" * 40], truncate=False), timeout=10)
        assert err.value.param == "input"
        with pytest.raises(InputError, match="4, 2 dimensions, not 3"):
            batcher.embed_sync(EmbedJob(model="a", texts=["ok"], dimensions=3), timeout=10)
        with pytest.raises(InputError, match="takes no instruction") as err:
            batcher.embed_sync(EmbedJob(model="a", texts=["ok"], kind="query", instruction="sts"), timeout=10)
        assert err.value.param == "instruction"
        with pytest.raises(InputError, match="outside the vocabulary"):
            batcher.embed_sync(EmbedJob(model="a", token_ids=[[1, 5000]]), timeout=10)
        # An ensemble request ignores an instruction a model has no slot for.
        result = batcher.embed_sync(EmbedJob(model="a", texts=["ok"], kind="query", instruction="sts",
                                             instruction_optional=True), timeout=10)
        np.testing.assert_allclose(result.vectors[0], expected("ok", "q:"), rtol=1e-6)
        truncated = batcher.embed_sync(EmbedJob(model="a", texts=["x" * 40, "y"]), timeout=10)
        assert truncated.truncated == 1
        short = batcher.embed_sync(EmbedJob(model="a", texts=["ok"], dimensions=2), timeout=10)
        np.testing.assert_allclose(short.vectors[0], expected("ok", dims=2), rtol=1e-6)
    finally:
        batcher.stop()


def test_embed_coroutine_and_cancellation_drop_the_texts():
    pool = FakePool(a=FakeEmbedder("a"))
    batcher = Batcher(pool, batch_wait=0)
    batcher.start()

    async def scenario():
        result = await batcher.embed(EmbedJob(model="a", texts=["hi"]))
        pool.gate.clear()
        waiting = asyncio.ensure_future(batcher.embed(EmbedJob(model="a", texts=["never"])))
        await asyncio.sleep(0.05)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        pool.gate.set()
        after = await batcher.embed(EmbedJob(model="a", texts=["after"]))
        return result, after

    try:
        result, after = asyncio.run(scenario())
    finally:
        batcher.stop()
    np.testing.assert_allclose(result.vectors[0], expected("hi"), rtol=1e-6)
    np.testing.assert_allclose(after.vectors[0], expected("after"), rtol=1e-6)
    encoded = [bytes(seq).decode() for batch in pool.embedders["a"].batches for seq in batch]
    assert "never" not in encoded and encoded[-1] == "after"


# --- real models: vectors equal encode() whatever shares the batch --------------------------


class OneModelPool:
    def __init__(self, embedder):
        self.embedder = embedder

    @contextmanager
    def use(self, name):
        yield self.embedder


def test_encode_tokens_equals_encode(small_model):
    ids = small_model.tokenize(TEXTS)
    np.testing.assert_allclose(small_model.encode_tokens(ids), small_model.encode(TEXTS), atol=1e-6)
    raw = small_model.encode_tokens(ids, normalize=False)
    np.testing.assert_allclose(small_model.finish(raw), small_model.encode(TEXTS), atol=1e-6)
    assert small_model.encode_tokens([]).shape == (0, small_model.dim)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        small_model.encode_tokens([[0, 10**9]])
    with pytest.raises(TypeError, match="flat list of ints"):
        small_model.check_token_ids([[0.5]])


def test_batched_vectors_equal_encode_whatever_shares_the_batch(small_model):
    batcher = Batcher(OneModelPool(small_model), max_batch_size=64, batch_wait=0.05)
    batcher.start()
    try:
        jobs = [
            EmbedJob(model="m", texts=TEXTS[:3]),
            EmbedJob(model="m", texts=TEXTS[2:], kind="query"),
            EmbedJob(model="m", texts=TEXTS[1:2], kind="query", instruction="sts"),
            EmbedJob(model="m", token_ids=small_model.tokenize(TEXTS[3:5])),
        ]
        tickets = [batcher.submit(job) for job in jobs]
        for t in tickets:
            assert t.done.wait(30)
    finally:
        batcher.stop()
    outcomes = [t.outcome for t in tickets]
    np.testing.assert_allclose(outcomes[0].vectors, small_model.encode_documents(TEXTS[:3]), atol=1e-6)
    np.testing.assert_allclose(outcomes[1].vectors, small_model.encode_queries(TEXTS[2:]), atol=1e-6)
    np.testing.assert_allclose(outcomes[2].vectors, small_model.encode_queries(TEXTS[1:2], instruction="sts"),
                               atol=1e-6)
    np.testing.assert_allclose(outcomes[3].vectors, small_model.encode(TEXTS[3:5]), atol=1e-6)
    assert outcomes[0].tokens == sum(len(ids) for ids in small_model.tokenize(TEXTS[:3]))


def test_unbatched_mode_encodes_one_job_at_a_time(small_model):
    batcher = Batcher(OneModelPool(small_model), batching=False)
    batcher.start()
    try:
        result = batcher.embed_sync(EmbedJob(model="m", texts=TEXTS), timeout=30)
    finally:
        batcher.stop()
    np.testing.assert_allclose(result.vectors, small_model.encode(TEXTS), atol=1e-6)


def test_free_worker_waits_for_the_clients_its_last_batch_answered():
    pool = FakePool(a=FakeEmbedder("a", max_batch_tokens=1000))
    batcher = Batcher(pool, max_batch_size=32, batch_wait=1.0)
    pool.gate.clear()
    batcher.start()
    try:
        first = [batcher.submit(EmbedJob(model="a", texts=[f"first {i}"])) for i in range(2)]
        pool.gate.set()
        assert all(t.done.wait(10) for t in first)
        # Two clients were answered; the first to come back waits for the other.
        again = [batcher.submit(EmbedJob(model="a", texts=[f"again {i}"])) for i in range(2)]
        assert all(t.done.wait(10) for t in again)
        # More texts queued than clients answered: no waiting.
        bulk = batcher.submit(EmbedJob(model="a", texts=["b"] * 3))
        assert bulk.done.wait(10)
    finally:
        batcher.stop()
    assert [len(batch) for batch in pool.embedders["a"].batches] == [2, 2, 3]
