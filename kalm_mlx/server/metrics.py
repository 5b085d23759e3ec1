"""Prometheus metrics (prometheus-client), one registry per app, and a JSON snapshot of them."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .batcher import BatchStats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
BATCH_TOKEN_BUCKETS = (16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384)
FILL_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


class _EnsembleCollector:
    """Loaded bytes, loads and evictions, read from the ensemble at scrape time."""

    def __init__(self, ensemble):
        self.ensemble = ensemble

    def collect(self):
        loaded = GaugeMetricFamily("kalm_mlx_loaded_bytes", "Bytes of model weights loaded", labels=["model"])
        for name, nbytes in self.ensemble.loaded.items():
            loaded.add_metric([name], nbytes)
        yield loaded
        loads = CounterMetricFamily("kalm_mlx_model_loads", "Model loads (reloads included)", labels=["model"])
        for name, count in self.ensemble.load_counts.items():
            loads.add_metric([name], count)
        yield loads
        evictions = CounterMetricFamily("kalm_mlx_model_evictions", "Models evicted to make room",
                                        labels=["model"])
        for name, count in getattr(self.ensemble, "eviction_counts", {}).items():
            evictions.add_metric([name], count)
        yield evictions


class ServerMetrics:
    """The server's metrics; ``queue_depth`` and the ensemble are read when scraped."""

    def __init__(self, ensemble, queue_depth: Callable[[], float]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("kalm_mlx_requests", "HTTP requests", ["route", "status"], registry=r)
        self.latency = Histogram("kalm_mlx_request_seconds", "HTTP request latency", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("kalm_mlx_in_flight_requests", "Requests being served", registry=r)
        self.texts = Counter("kalm_mlx_texts", "Texts embedded", ["model"], registry=r)
        self.tokens = Counter("kalm_mlx_tokens", "Tokens embedded (prompts included)", ["model"], registry=r)
        self.truncated = Counter("kalm_mlx_truncated_inputs", "Inputs cut to the model's token limit",
                                 ["model"], registry=r)
        self.batches = Counter("kalm_mlx_batches", "Encoder batches", ["model"], registry=r)
        self.batch_size = Histogram("kalm_mlx_batch_size", "Texts per encoder batch", ["model"],
                                    buckets=BATCH_SIZE_BUCKETS, registry=r)
        self.batch_tokens = Histogram("kalm_mlx_batch_tokens", "Padded tokens per encoder batch", ["model"],
                                      buckets=BATCH_TOKEN_BUCKETS, registry=r)
        self.batch_fill = Histogram("kalm_mlx_batch_fill", "Padded tokens of a batch / the token budget",
                                    ["model"], buckets=FILL_BUCKETS, registry=r)
        self.batch_seconds = Histogram("kalm_mlx_batch_seconds", "Encoding time per batch", ["model"],
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Gauge("kalm_mlx_queue_texts", "Texts waiting to be embedded", registry=r)
        self.queue.set_function(queue_depth)
        r.register(_EnsembleCollector(ensemble))

    def observe_batch(self, stats: BatchStats) -> None:
        """Record one encoder batch (called on the batcher's thread)."""
        self.texts.labels(stats.model).inc(stats.texts)
        self.tokens.labels(stats.model).inc(stats.tokens)
        self.batches.labels(stats.model).inc()
        self.batch_size.labels(stats.model).observe(stats.texts)
        self.batch_tokens.labels(stats.model).observe(stats.padded_tokens)
        self.batch_fill.labels(stats.model).observe(min(1.0, stats.padded_tokens / stats.max_batch_tokens))
        self.batch_seconds.labels(stats.model).observe(stats.seconds)

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        """Record one HTTP request."""
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def snapshot(self) -> dict:
        """Every sample as JSON-ready data: ``{metric: {"type", "help", "samples": [...]}}``."""
        out = {}
        for family in self.registry.collect():
            out[family.name] = {
                "type": family.type,
                "help": family.documentation,
                "samples": [{"name": s.name, "labels": dict(s.labels), "value": s.value}
                            for s in family.samples],
            }
        return out
