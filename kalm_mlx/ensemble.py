"""Ensemble: several embedding models behind one object, with fusion and a size-aware LRU.

Models are loaded on first use and kept while they fit the memory budget (bytes of
loaded weights, measured with ``Embedder.nbytes``) and the ``max_loaded`` count. When a
model needs room, idle models are evicted least recently used first; a model that is
encoding is never evicted, and a thread that needs room waits until enough is released.
A model larger than the whole budget is still served: loaded alone, used, released.

Several threads may share one ensemble. A model is loaded by one thread at a time (the
others wait for that load), and the MLX work of one ensemble (loading and encoding) runs
one model at a time, which is what the device does anyway.
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .embedder import Embedder, as_text_list
from .fusion import FUSIONS, RRF_K, competition_ranks, fuse_ranking, fuse_rrf, fuse_scores, fuse_vectors
from .hub import converted_folder
from .api import load
from .loading import release_memory
from .settings import (
    DEFAULT_MODELS,
    Settings,
    canonical_model_name,
    check_weight,
    parse_byte_size,
    registry_entry,
)

__all__ = [
    "DEFAULT_MODELS",
    "Ensemble",
    "KINDS",
    "check_kind",
    "MemoryBudgetWarning",
    "RRF_K",
    # Re-exported from settings and fusion, where they live now.
    "canonical_model_name",
    "competition_ranks",
    "fuse_rrf",
    "fuse_scores",
    "parse_byte_size",
]

KINDS = ("query", "document")
"""What a text is to the models: a query (each model's query prompt) or a document."""


def check_kind(kind: str) -> str:
    """Return ``kind`` if it is one of :data:`KINDS`; ValueError naming the choices otherwise."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    return kind


class MemoryBudgetWarning(UserWarning):
    """A model is larger than the whole memory budget: it is loaded alone and released after use."""


# --- the ensemble -------------------------------------------------------------------------


class Ensemble:
    """Several embedding models used together: one vector per model, fused rankings.

    ``models`` are registry names, aliases or folders (the first is :attr:`default_model`);
    ``weights`` maps models to positive weights (1.0 where not given) or lists them in
    order. ``memory_budget`` (bytes, or a size such as ``"3GB"``) and ``max_loaded``
    bound what stays loaded; None means no bound. ``loader`` turns a model name into an
    :class:`~kalm_mlx.Embedder` (default :func:`kalm_mlx.load`).
    """

    def __init__(
        self,
        models: str | Sequence[str],
        weights: Mapping[str, float] | Sequence[float] | None = None,
        memory_budget: int | str | None = None,
        max_loaded: int | None = None,
        loader: Callable[[str], object] | None = None,
    ):
        if isinstance(models, (str, os.PathLike)):
            models = [models]
        names = [canonical_model_name(name) for name in models]
        if not names:
            raise ValueError("an ensemble needs at least one model")
        repeated = [name for name, count in Counter(names).items() if count > 1]
        if repeated:
            raise ValueError(f"model {repeated[0]!r} is listed twice")
        self.models: tuple[str, ...] = tuple(names)
        """Model names, in the caller's order; the first is the default model."""
        self.weights: dict[str, float] = self._resolve_weights(weights)
        """Fusion weight of each model."""
        self.memory_budget: int | None = self._resolve_budget(memory_budget)
        """Most bytes of weights kept loaded (None: no bound)."""
        self.max_loaded: int | None = self._resolve_max_loaded(max_loaded)
        """Most models kept loaded (None: no bound)."""
        self._loader = load if loader is None else loader
        self._state = threading.Condition()
        self._mlx_lock = threading.Lock()
        self._loaded: OrderedDict[str, object] = OrderedDict()  # least recently used first
        self._nbytes: dict[str, int] = {}  # measured at load; kept after eviction
        self._users: Counter[str] = Counter()
        self._loading: dict[str, Future] = {}
        self._reserved: dict[str, int] = {}  # expected bytes of the loads in flight
        self._load_counts: Counter[str] = Counter()
        self._eviction_counts: Counter[str] = Counter()
        self._peak_bytes = 0
        self._local = threading.local()

    @classmethod
    def from_settings(cls, settings: Settings, loader: Callable[[str], object] | None = None) -> Ensemble:
        """Build an ensemble from a :class:`~kalm_mlx.settings.Settings`."""
        return cls(list(settings.models), weights=dict(settings.weights),
                   memory_budget=settings.memory_budget, max_loaded=settings.max_loaded, loader=loader)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None,
                 loader: Callable[[str], object] | None = None) -> Ensemble:
        """Build an ensemble from ``EMBED_MODELS``, ``EMBED_WEIGHTS``, ``EMBED_MEMORY_BUDGET``
        and ``EMBED_MAX_LOADED`` (read from ``environ``, default ``os.environ``).

        Unset or empty variables take their defaults: ``bge-base``, weight 1.0 each, no
        budget, no count bound. A bad value raises ValueError naming the variable and value.
        """
        return cls.from_settings(Settings.from_env(environ), loader=loader)

    # --- configuration -------------------------------------------------------------------

    def _resolve_weights(self, weights) -> dict[str, float]:
        if weights is None:
            return {name: 1.0 for name in self.models}
        if isinstance(weights, Mapping):
            given = {}
            for name, weight in weights.items():
                canonical = canonical_model_name(name)
                if canonical not in self.models:
                    raise ValueError(
                        f"weight given for {name!r}, which is not one of the ensemble's models "
                        f"({', '.join(self.models)})"
                    )
                given[canonical] = check_weight(weight, weight)
            return {name: given.get(name, 1.0) for name in self.models}
        if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
            raise TypeError(f"weights must be a mapping or a sequence, not {type(weights).__name__}")
        if len(weights) != len(self.models):
            raise ValueError(f"{len(weights)} weights for {len(self.models)} models")
        return {name: check_weight(w, w) for name, w in zip(self.models, weights)}

    @staticmethod
    def _resolve_budget(budget) -> int | None:
        if budget is None:
            return None
        if isinstance(budget, str):
            return parse_byte_size(budget)
        if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)):
            raise TypeError(
                f"memory_budget must be bytes (int) or a size string, not {type(budget).__name__}"
            )
        if budget <= 0:
            raise ValueError(f"memory_budget must be positive, not {budget}")
        return int(budget)

    @staticmethod
    def _resolve_max_loaded(max_loaded) -> int | None:
        if max_loaded is None:
            return None
        if isinstance(max_loaded, bool) or not isinstance(max_loaded, (int, np.integer)):
            raise TypeError(f"max_loaded must be an integer, not {type(max_loaded).__name__}")
        if max_loaded < 1:
            raise ValueError(f"max_loaded must be at least 1, not {max_loaded}")
        return int(max_loaded)

    @property
    def default_model(self) -> str:
        """The first model listed: the one to use where a caller needs a single model."""
        return self.models[0]

    def __repr__(self) -> str:
        weights = ", ".join(f"{name}={weight:g}" for name, weight in self.weights.items())
        return (
            f"Ensemble({weights}; memory_budget={self.memory_budget}, max_loaded={self.max_loaded}, "
            f"loaded={list(self.loaded)})"
        )

    # --- what is loaded ------------------------------------------------------------------

    @property
    def loaded(self) -> dict[str, int]:
        """Loaded models and their bytes, least recently used first."""
        with self._state:
            return {name: self._nbytes[name] for name in self._loaded}

    @property
    def loaded_bytes(self) -> int:
        """Bytes of weights loaded now."""
        with self._state:
            return self._resident_bytes()

    @property
    def peak_loaded_bytes(self) -> int:
        """Most bytes of weights ever loaded at once by this ensemble."""
        with self._state:
            return self._peak_bytes

    @property
    def load_counts(self) -> dict[str, int]:
        """How many times each model has been loaded (reloads after eviction included)."""
        with self._state:
            return dict(self._load_counts)

    @property
    def eviction_counts(self) -> dict[str, int]:
        """How many times each model has been evicted (``unload()`` included)."""
        with self._state:
            return dict(self._eviction_counts)

    @property
    def timings(self) -> dict[str, dict[str, float]]:
        """Seconds spent per model by this thread's last ``encode`` (or call built on it).

        ``{model: {"wait": ..., "load": ..., "encode": ...}}``: ``load`` is the loading
        itself (0.0 when the model was loaded already or another thread loaded it),
        ``encode`` the embedding, ``wait`` the rest: waiting for room in the budget, for
        another thread's load, or for the device.
        """
        return dict(getattr(self._local, "timings", {}))

    def unload(self) -> list[str]:
        """Unload every model that is not in use now; return their names."""
        with self._state:
            names = [name for name in self._loaded if self._users[name] == 0]
            victims = [self._evict(name) for name in names]
            self._state.notify_all()
        self._drop(victims)
        return names

    # --- loading and eviction ------------------------------------------------------------

    def _resident_bytes(self) -> int:
        return sum(self._nbytes[name] for name in self._loaded)

    def _estimate_bytes(self, name: str) -> int | None:
        """Bytes a model is expected to take before it is loaded: its measured size from an
        earlier load, else its weights on disk, else the registry's parameter count in float32."""
        if name in self._nbytes:
            return self._nbytes[name]
        entry, variant = registry_entry(name)
        folder = converted_folder(entry, variant) if entry is not None else Path(name).expanduser()
        on_disk = sum(path.stat().st_size for path in folder.glob("*.safetensors"))
        if on_disk:
            return on_disk
        return entry.memory_bytes() if entry is not None else None

    def _fits(self, expected: int, leaving: Sequence[str] = ()) -> bool:
        """Whether a model of ``expected`` bytes fits beside what is loaded (minus ``leaving``)."""
        others = [name for name in self._loaded if name not in leaving]
        count = len(others) + len(self._loading)
        if count == 0:
            return True  # alone, any model is served, even one larger than the budget
        used = sum(self._nbytes[name] for name in others) + sum(self._reserved.values())
        bytes_ok = self.memory_budget is None or used + expected <= self.memory_budget
        count_ok = self.max_loaded is None or count < self.max_loaded
        return bytes_ok and count_ok

    def _room_plan(self, expected: int) -> list[str] | None:
        """Idle models to evict, least recently used first, so that ``expected`` bytes fit;
        None when they cannot fit until models in use are released."""
        victims: list[str] = []
        for name in self._loaded:
            if self._fits(expected, victims):
                return victims
            if self._users[name] == 0:
                victims.append(name)
        return victims if self._fits(expected, victims) else None

    def _over_limits(self) -> bool:
        count = len(self._loaded) + len(self._loading)
        used = self._resident_bytes() + sum(self._reserved.values())
        return (self.memory_budget is not None and used > self.memory_budget) or (
            self.max_loaded is not None and count > self.max_loaded
        )

    def _trim(self) -> list[object]:
        """Evict idle models until the limits hold again; return the evicted embedders."""
        victims = []
        if self.memory_budget is not None:
            # A model larger than the whole budget is released as soon as nobody uses it.
            for name in list(self._loaded):
                if self._users[name] == 0 and self._nbytes[name] > self.memory_budget:
                    victims.append(self._evict(name))
        for name in list(self._loaded):
            if not self._over_limits():
                break
            if self._users[name] == 0:
                victims.append(self._evict(name))
        return victims

    def _evict(self, name: str) -> object:
        if self._users[name]:
            raise RuntimeError(f"bug: {name} would be evicted while in use")
        self._eviction_counts[name] += 1
        return self._loaded.pop(name)

    def _drop(self, victims: list[object]) -> None:
        """Let go of evicted embedders and hand their buffers back to the system."""
        if not victims:
            return
        victims.clear()
        with self._mlx_lock:
            release_memory()

    def _acquire(self, name: str) -> tuple[object, float]:
        """Return (embedder, seconds spent loading it, 0.0 when it was loaded) with the model
        marked in use."""
        with self._state:
            embedder, pending, victims = self._claim(name)
        if embedder is not None:
            return embedder, 0.0
        self._drop(victims)
        return self._load(name, pending)

    def _claim(self, name: str) -> tuple[object | None, Future | None, list[object]]:
        """Under the state lock: mark a loaded model in use, or wait for another thread's
        load of it, or wait for room and reserve it for this thread to load.

        Returns (embedder, None, []) for a loaded model, else (None, the reservation's
        future, the embedders evicted to make room).
        """
        while True:
            if name in self._loaded:
                self._users[name] += 1
                self._loaded.move_to_end(name)
                return self._loaded[name], None, []
            if name in self._loading:
                pending = self._loading[name]
                self._state.wait_for(pending.done)
                if pending.exception() is not None:
                    raise pending.exception()
                continue
            expected = self._estimate_bytes(name)
            if expected is None:
                expected = self.memory_budget or 0  # unknown size: make room for the largest
            plan = self._room_plan(expected)
            if plan is not None:
                victims = [self._evict(victim) for victim in plan]
                pending = Future()
                self._loading[name] = pending
                self._reserved[name] = expected
                return None, pending, victims
            self._state.wait()

    def _load(self, name: str, pending: Future) -> tuple[object, float]:
        """Load a reserved model outside the state lock, then record it, in use, and settle
        ``pending`` for the threads waiting on this load. Returns (embedder, seconds)."""
        try:
            with self._mlx_lock:
                start = time.perf_counter()
                embedder = self._loader(name)
                seconds = time.perf_counter() - start
            nbytes = int(embedder.nbytes)
        except BaseException as err:
            with self._state:
                del self._loading[name], self._reserved[name]
                pending.set_exception(err)
                self._state.notify_all()
            raise
        with self._state:
            del self._loading[name], self._reserved[name]
            self._loaded[name] = embedder
            self._nbytes[name] = nbytes
            self._users[name] += 1
            self._load_counts[name] += 1
            self._peak_bytes = max(self._peak_bytes, self._resident_bytes())
            victims = self._trim()
            pending.set_result(None)
            self._state.notify_all()
        self._drop(victims)
        if self.memory_budget is not None and nbytes > self.memory_budget:
            warnings.warn(
                f"{name} takes {nbytes} bytes, more than the whole memory budget "
                f"({self.memory_budget} bytes); it is served alone and released after use",
                MemoryBudgetWarning,
                stacklevel=5,
            )
        return embedder, seconds

    def _release(self, name: str) -> None:
        with self._state:
            self._users[name] -= 1
            victims = self._trim()
            self._state.notify_all()
        self._drop(victims)

    # --- encoding ------------------------------------------------------------------------

    def _select(self, models: str | Sequence[str] | None) -> list[str]:
        if models is None:
            return list(self.models)
        if isinstance(models, (str, os.PathLike)):
            models = [models]
        chosen = []
        for model in models:
            name = canonical_model_name(model)
            if name not in self.models:
                raise ValueError(f"{model!r} is not one of the ensemble's models ({', '.join(self.models)})")
            if name not in chosen:
                chosen.append(name)
        if not chosen:
            raise ValueError("no models selected")
        return chosen

    def _next_model(self, remaining: list[str]) -> str:
        """A loaded model first, then one being loaded, else the next one listed: this spares
        loads and evictions when threads share a tight budget."""
        with self._state:
            for pool in (self._loaded, self._loading):
                for name in remaining:
                    if name in pool:
                        return name
        return remaining[0]

    @contextmanager
    def use(self, model: str) -> Iterator[Embedder]:
        """Hold one model for a block of MLX work: ``with ensemble.use("bge-base") as embedder:``.

        The model is loaded if needed (making room as :meth:`encode` does), stays in use,
        so never evicted, until the block ends, and the block holds the ensemble's device
        lock: other threads' loads and encodes wait. For callers that drive the embedder
        themselves (the server's batcher, the corpus job); ``model`` is any name
        :meth:`encode` accepts.
        """
        name = self._select(model)[0]
        embedder, _ = self._acquire(name)
        try:
            with self._mlx_lock:
                yield embedder
        finally:
            embedder = None  # an evicted model must not outlive its eviction here
            self._release(name)

    def _encode_with(self, name: str, texts, kind: str, batch_size: int) -> tuple[np.ndarray, dict]:
        """Embed with one model, holding it in use meanwhile; returns (vectors, timings)."""
        start = time.perf_counter()
        embedder, load_seconds = self._acquire(name)
        try:
            with self._mlx_lock:
                encode_start = time.perf_counter()
                if kind == "query":
                    vectors = embedder.encode_queries(texts, batch_size=batch_size)
                else:
                    vectors = embedder.encode_documents(texts, batch_size=batch_size)
                encode_seconds = time.perf_counter() - encode_start
        finally:
            embedder = None  # an evicted model must not outlive its eviction here
            self._release(name)
        waited = time.perf_counter() - start - load_seconds - encode_seconds
        return vectors, {"wait": max(waited, 0.0), "load": load_seconds, "encode": encode_seconds}

    def encode(self, texts: str | Sequence[str], kind: str = "query",
               models: str | Sequence[str] | None = None, batch_size: int = 32) -> dict[str, np.ndarray]:
        """Embed ``texts`` with every model (or those in ``models``): ``{model: (n, dim) array}``.

        ``kind`` is ``"query"`` or ``"document"`` and picks each model's own prompt
        (``Embedder.encode_queries`` / ``encode_documents``). Models already loaded run
        first; the result keeps the ensemble's order. Per-model seconds: :attr:`timings`.
        """
        check_kind(kind)
        as_text_list(texts)  # a TypeError now, before any model loads
        names = self._select(models)
        vectors, timings = {}, {}
        remaining = list(names)
        while remaining:
            name = self._next_model(remaining)
            remaining.remove(name)
            vectors[name], timings[name] = self._encode_with(name, texts, kind, batch_size)
        self._local.timings = {name: timings[name] for name in names}
        return {name: vectors[name] for name in names}

    def encode_fused(self, texts: str | Sequence[str], kind: str = "query",
                     batch_size: int = 32) -> np.ndarray:
        """One vector per text for the whole ensemble, shape (n, sum of the models' dims).

        Each model's normalised vector is scaled by ``sqrt(w_m / sum w)`` and the parts are
        concatenated in the ensemble's order, so the dot product of two fused vectors is the
        weighted mean of the models' cosines: one vector index serves the whole ensemble.
        """
        per_model = self.encode(texts, kind=kind, batch_size=batch_size)
        return fuse_vectors(per_model, self.weights, self.models)

    def rank(self, query: str, documents: Sequence[str] | Mapping[str, np.ndarray],
             top_k: int | None = None, fusion: str = "rrf", k: float = RRF_K) -> list[tuple[int, float]]:
        """Rank documents for one query by fusing the models' rankings; best first.

        ``documents`` are texts (embedded now, as documents) or precomputed document
        embeddings ``{model: (n, dim) array}`` such as ``encode(docs, kind="document")``
        returns. ``fusion="rrf"`` scores each document ``sum w_m / (k + rank_m)``;
        ``fusion="score"`` uses the weighted mean cosine. Returns ``[(index, score), ...]``,
        the ``top_k`` best (all when None); ties keep document order.
        """
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {', '.join(FUSIONS)}, not {fusion!r}")
        if not isinstance(query, str):
            raise TypeError(f"query must be a string, not {type(query).__name__}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be a positive integer or None, not {top_k!r}")
        if isinstance(documents, Mapping):
            doc_vectors = self._check_document_vectors(documents)
        else:
            doc_vectors = self.encode(documents, kind="document")
        query_vectors = self.encode(query, kind="query")
        scores = {}
        for name in self.models:
            if doc_vectors[name].shape[1] != query_vectors[name].shape[1]:
                raise ValueError(
                    f"document vectors for {name} have {doc_vectors[name].shape[1]} dims, "
                    f"the model gives {query_vectors[name].shape[1]}"
                )
            scores[name] = doc_vectors[name] @ query_vectors[name][0]
        return fuse_ranking(scores, self.weights, fusion, k, top_k)

    def _check_document_vectors(self, documents: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        given = {canonical_model_name(name): np.asarray(array, dtype=np.float32)
                 for name, array in documents.items()}
        missing = [name for name in self.models if name not in given]
        if missing:
            raise ValueError(f"document vectors are missing for {', '.join(missing)}")
        shapes = {name: given[name].shape for name in self.models}
        if any(len(shape) != 2 for shape in shapes.values()) or len({s[0] for s in shapes.values()}) != 1:
            raise ValueError(f"document vectors must be 2-D with one row per document; got shapes {shapes}")
        return {name: given[name] for name in self.models}
