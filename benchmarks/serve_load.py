"""A loopback load generator for embedding servers: closed-loop clients on httpx.AsyncClient.

Every client sends one request, waits for its answer, then sends the next (a closed loop,
as Engram's clients do), until the point's request count or its time cap is reached.
Warm-up requests (one per client by default) run first and are not recorded; throughput
counts the requests served in the steady state, from when the last client has warmed up to
when the first one stops, so that no warm-up work is inside the window. A request
counts as served only when the answer is 200 and holds one vector per input text; any
other answer is counted as an error by status (or exception name), never timed.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
import numpy as np

WORDS = (
    "memory user prefers coffee morning meeting project deadline tuesday code review search "
    "index vector query document cluster server batch latency budget travel berlin train "
    "ticket birthday sister gift garden tomato recipe pasta python function error cache "
    "release notes weekly report invoice client call backup laptop password reminder "
    "doctor appointment library book chapter summary music playlist running shoes weather"
).split()
"""Plain English words for the short texts (a dozen or so words, ~15 tokens, like a memory)."""


def short_texts(count: int, seed: int = 0, words: tuple[int, int] = (8, 14)) -> list[str]:
    """``count`` distinct short sentences (``words`` words each, numbered), reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    texts = []
    for i in range(count):
        n = int(rng.integers(words[0], words[1] + 1))
        texts.append(f"note {i}: " + " ".join(rng.choice(WORDS, size=n)))
    return texts


def embeddings_body(model: str, texts: list[str]) -> dict:
    """OpenAI's embeddings body: one text goes as a bare string (as Engram's memory API sends it)."""
    return {"input": texts[0] if len(texts) == 1 else texts, "model": model, "encoding_format": "float"}


def latency_stats(seconds: list[float]) -> dict:
    """p50, p95, p99, mean and max latency in milliseconds (None when there are no samples)."""
    if not seconds:
        return {key: None for key in ("p50_ms", "p95_ms", "p99_ms", "mean_ms", "max_ms")}
    ms = np.asarray(seconds) * 1000
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p95_ms": round(float(np.percentile(ms, 95)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "mean_ms": round(float(ms.mean()), 2),
        "max_ms": round(float(ms.max()), 2),
    }


@dataclass
class LoadResult:
    """What one closed-loop run measured: latencies of the served requests, errors, wall time."""

    concurrency: int
    texts_per_request: int
    latencies_s: list[float] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)
    wall_s: float = 0.0
    """Length of the steady-state window (see :func:`closed_loop`)."""
    window_requests: int = 0
    """Requests served within the window: requests/s is this over ``wall_s``."""
    hit_time_cap: bool = False

    def summary(self) -> dict:
        """The JSON row: counts, requests/s, texts/s and latency percentiles."""
        served = len(self.latencies_s)
        rate = self.window_requests / self.wall_s if self.wall_s > 0 else 0.0
        return {
            "concurrency": self.concurrency,
            "texts_per_request": self.texts_per_request,
            "requests": served,
            "texts": served * self.texts_per_request,
            "errors": dict(self.errors),
            "seconds": round(self.wall_s, 3),
            "window_requests": self.window_requests,
            "hit_time_cap": self.hit_time_cap,
            "requests_per_s": round(rate, 2),
            "texts_per_s": round(rate * self.texts_per_request, 2),
            **latency_stats(self.latencies_s),
        }


def make_client(concurrency: int, timeout_s: float = 300.0) -> httpx.AsyncClient:
    """An AsyncClient with a connection for every client (keep-alive), no proxies from the environment."""
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    return httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(timeout_s), trust_env=False)


async def _post(client: httpx.AsyncClient, url: str, body: dict, headers: dict | None,
                expected: int) -> str | None:
    """Send one request; None when served, else the error's label."""
    try:
        response = await client.post(url, json=body, headers=headers)
    except httpx.HTTPError as err:
        return type(err).__name__
    if response.status_code != 200:
        return str(response.status_code)
    try:
        data = response.json()["data"]
    except (ValueError, KeyError, TypeError):
        return "bad body"
    return None if len(data) == expected else "wrong count"


async def closed_loop(client: httpx.AsyncClient, url: str, bodies: list[dict], *, concurrency: int,
                      requests: int, time_cap_s: float, warmup_per_client: int = 1,
                      headers: dict | None = None, stop: asyncio.Event | None = None) -> LoadResult:
    """Run ``concurrency`` closed-loop clients over ``bodies`` (cycled) and time each request.

    Each client first sends ``warmup_per_client`` requests that are left out, then timed
    ones. The steady-state window opens when the last client has warmed up, and closes
    when the first client stops: after ``requests`` timed requests in all, ``time_cap_s``
    into the window, or when ``stop`` is set (the requests in flight finish and count).
    Throughput is the requests served within the window over its length; when none was
    (too few requests for the clients), it is every timed request over the time from the
    first one's start to the last one's end.
    """
    if concurrency < 1 or requests < 0 or not bodies:
        raise ValueError("concurrency must be >= 1, requests >= 0 and bodies not empty")
    texts = bodies[0]["input"]
    per_request = 1 if isinstance(texts, str) else len(texts)
    result = LoadResult(concurrency, per_request)
    cycle = itertools.count()
    issued = itertools.count()
    warmed = 0
    window: dict[str, float] = {}
    first_sent: list[float] = []
    served_at: list[float] = []

    def next_body() -> dict:
        return bodies[next(cycle) % len(bodies)]

    async def one_client() -> None:
        nonlocal warmed
        # Each client warms up on its own and goes straight on: no barrier, so no connection
        # sits idle long enough for the server to close it under the client (a keep-alive race).
        for _ in range(warmup_per_client):
            await _post(client, url, next_body(), headers, per_request)
        warmed += 1
        if warmed == concurrency:
            window["start"] = time.perf_counter()
        while True:
            now = time.perf_counter()
            capped = "start" in window and now >= window["start"] + time_cap_s
            if capped or next(issued) >= requests or (stop is not None and stop.is_set()):
                result.hit_time_cap |= capped
                window.setdefault("end", now)
                return
            if not first_sent:
                first_sent.append(now)
            error = await _post(client, url, next_body(), headers, per_request)
            done = time.perf_counter()
            if error is None:
                result.latencies_s.append(done - now)
                served_at.append(done)
            else:
                result.errors[error] += 1
            await asyncio.sleep(0)  # let the other clients run even if the transport never waited

    await asyncio.gather(*(one_client() for _ in range(concurrency)))
    opened, closed = window.get("start", 0.0), window.get("end", 0.0)
    in_window = sum(1 for t in served_at if opened <= t <= closed)
    if in_window:
        result.wall_s, result.window_requests = closed - opened, in_window
    elif served_at:
        result.wall_s, result.window_requests = max(served_at) - first_sent[0], len(served_at)
    return result


async def priority_run(client: httpx.AsyncClient, url: str, bulk_bodies: list[dict],
                       probe_bodies: list[dict], *, bulk_clients: int, probes: int,
                       time_cap_s: float, settle_s: float = 1.0,
                       drain_timeout_s: float = 120.0) -> dict:
    """Bulk clients keep the server busy while two probe clients send the same single texts,
    one with ``X-Priority: recall`` and one without, side by side.

    The probes start ``settle_s`` after the bulk clients (so bulk work is queued) and stop
    after ``probes`` requests each or ``time_cap_s``; then the bulk clients stop sending and
    their last requests are awaited (cancelled after ``drain_timeout_s``).
    """
    stop = asyncio.Event()
    bulk = asyncio.gather(*(closed_loop(client, url, bulk_bodies, concurrency=1, requests=10**9,
                                        time_cap_s=time_cap_s + settle_s + drain_timeout_s,
                                        warmup_per_client=0, stop=stop)
                            for _ in range(bulk_clients)))
    try:
        await asyncio.sleep(settle_s)
        recall, normal = await asyncio.gather(
            closed_loop(client, url, probe_bodies, concurrency=1, requests=probes,
                        time_cap_s=time_cap_s, warmup_per_client=0, headers={"X-Priority": "recall"}),
            closed_loop(client, url, probe_bodies, concurrency=1, requests=probes,
                        time_cap_s=time_cap_s, warmup_per_client=0),
        )
    finally:
        stop.set()
        try:
            bulk_results = await asyncio.wait_for(bulk, timeout=drain_timeout_s)
        except asyncio.TimeoutError:
            bulk_results = []
    served = sum(len(r.latencies_s) for r in bulk_results)
    bulk_texts = bulk_bodies[0]["input"]
    return {
        "bulk_clients": bulk_clients,
        "bulk_texts_per_request": len(bulk_texts) if isinstance(bulk_texts, list) else 1,
        "bulk_requests": served,
        "bulk_errors": dict(sum((r.errors for r in bulk_results), Counter())),
        "recall": recall.summary(),
        "normal": normal.summary(),
    }
