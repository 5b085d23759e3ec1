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

import json
import math
import os
import re
import threading
import time
import warnings
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path

import numpy as np

from .embedder import as_text_list
from .hub import converted_folder, split_variant
from .loading import load, release_memory
from .registry import ModelEntry, find_model, list_models

DEFAULT_MODELS = "bge-base"
RRF_K = 60
KINDS = ("query", "document")
FUSIONS = ("rrf", "score")

_DECIMAL_UNITS = {"kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_BINARY_UNITS = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
BYTE_UNITS = {"": 1, "b": 1, **_DECIMAL_UNITS, **_BINARY_UNITS}
"""Size suffixes, case-insensitive: KB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB powers of 1024."""

_SIZE_PATTERN = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")


class MemoryBudgetWarning(UserWarning):
    """A model is larger than the whole memory budget: it is loaded alone and released after use."""


# --- parsing ------------------------------------------------------------------------------


def parse_byte_size(text: str) -> int:
    """Parse a size such as ``"3GB"``, ``"750MB"``, ``"1.5 GiB"`` or ``"123456"`` into bytes.

    KB, MB, GB and TB are decimal (1 GB = 10**9 bytes, as disks and macOS count);
    KiB, MiB, GiB and TiB are binary (1 GiB = 2**30 bytes); no suffix or ``B`` means
    bytes. Units are case-insensitive. The size must be positive.
    """
    if not isinstance(text, str):
        raise TypeError(f"a size must be a string, not {type(text).__name__}")
    match = _SIZE_PATTERN.match(text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in BYTE_UNITS:
        raise ValueError(
            f"cannot read {text!r} as a size; write a number with one of the units "
            "B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024)"
        )
    number = float(match.group(1))
    if BYTE_UNITS[unit] == 1 and not number.is_integer():
        raise ValueError(f"cannot read {text!r} as a size: a byte count must be a whole number")
    size = round(number * BYTE_UNITS[unit])
    if size <= 0:
        raise ValueError(f"size {text!r} must be positive")
    return size


def _parse_weight(text: str) -> float:
    try:
        weight = float(text)
    except ValueError:
        raise ValueError(f"weight {text!r} is not a number") from None
    return _check_weight(weight, text)


def _check_weight(weight: object, shown: object) -> float:
    if isinstance(weight, bool) or not isinstance(weight, (int, float, np.integer, np.floating)):
        raise ValueError(f"weight {shown!r} is not a number")
    weight = float(weight)
    if not math.isfinite(weight) or weight <= 0:
        raise ValueError(f"weight {shown!r} must be a positive finite number")
    return weight


def _split_items(text: str) -> list[tuple[str, str | None]]:
    """Split ``a:1, b`` into ``[("a", "1"), ("b", None)]``; an empty item is an error."""
    items = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            raise ValueError("empty item (two commas in a row, or a trailing comma?)")
        name, colon, weight = item.rpartition(":")
        items.append((name.strip(), weight.strip()) if colon else (item, None))
    return items


def parse_model_list(text: str) -> tuple[list[str], dict[str, float]]:
    """Parse an ``EMBED_MODELS`` value into (canonical model names, weights given inline).

    Items are comma-separated registry names, aliases or folder paths, each with an
    optional ``:weight``. ``all`` or ``*`` stands for every registry model that is not
    opt-in (models named elsewhere in the list keep their own place). The first model
    is the default one. Raises ValueError for unknown, empty or repeated names.
    """
    names: list[str] = []
    weights: dict[str, float] = {}
    wildcard_at = None
    for raw_name, weight_text in _split_items(text):
        if raw_name.lower() in ("all", "*"):
            if weight_text is not None:
                raise ValueError(f"a weight cannot be given to {raw_name!r}")
            if wildcard_at is not None:
                raise ValueError(f"{raw_name!r} is given twice")
            wildcard_at = len(names)
            continue
        name = canonical_model_name(raw_name)
        if name in names:
            raise ValueError(f"model {name!r} is listed twice")
        names.append(name)
        if weight_text is not None:
            weights[name] = _parse_weight(weight_text)
    if wildcard_at is not None:
        defaults = [e.name for e in list_models() if not e.opt_in and e.name not in names]
        if not defaults and not names:
            raise ValueError("the registry has no models that are on by default")
        names[wildcard_at:wildcard_at] = defaults
    return names, weights


def parse_weights(text: str) -> dict[str, float]:
    """Parse an ``EMBED_WEIGHTS`` value: ``name:weight`` pairs, comma-separated, or a JSON object.

    Names are canonicalised (aliases become registry names); weights must be positive.
    """
    text = text.strip()
    if text.startswith("{"):
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"malformed JSON ({err})") from None
        if not isinstance(raw, dict):
            raise ValueError("expected a JSON object of model names and weights")
        pairs = [(name, _check_weight(weight, weight)) for name, weight in raw.items()]
    else:
        pairs = []
        for name, weight_text in _split_items(text):
            if weight_text is None:
                raise ValueError(f"{name!r} is not name:weight")
            pairs.append((name, _parse_weight(weight_text)))
    weights: dict[str, float] = {}
    for name, weight in pairs:
        canonical = canonical_model_name(name)
        if canonical in weights:
            raise ValueError(f"model {canonical!r} is given two weights")
        weights[canonical] = weight
    return weights


def parse_max_loaded(text: str) -> int:
    """Parse an ``EMBED_MAX_LOADED`` value: a whole number of models, at least 1."""
    try:
        count = int(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is not a whole number") from None
    if count < 1:
        raise ValueError(f"{text!r}: at least one model must be allowed to stay loaded")
    return count


def _registry_entry(name: str) -> tuple[ModelEntry | None, str | None]:
    """(registry entry, quantized variant such as ``q8``) for a name like ``kalm-q8``."""
    base, variant = split_variant(name.strip())
    return find_model(base), variant


def canonical_model_name(name: str | os.PathLike) -> str:
    """The registry name for a name, alias or hub id (``kalm-q8`` gives ``kalm-v2-q8``);
    a folder path is kept as written.

    Raises ValueError listing the known models when ``name`` is neither.
    """
    if isinstance(name, os.PathLike):
        name = os.fspath(name)
    if not isinstance(name, str):
        raise TypeError(f"a model name must be a string, not {type(name).__name__}")
    entry, variant = _registry_entry(name)
    if entry is not None:
        return f"{entry.name}-{variant}" if variant else entry.name
    if name and Path(name).expanduser().is_dir():
        return name
    valid = ", ".join(e.name for e in list_models())
    raise ValueError(
        f"unknown model {name!r}: not a folder nor a known model ({valid}; "
        "add -q8 or -q4 for a quantized copy)"
    )


# --- fusion -------------------------------------------------------------------------------


def _check_scores(scores: Mapping[str, np.ndarray], weights: Mapping[str, float]) -> dict:
    if not scores:
        raise ValueError("no scores to fuse")
    arrays = {name: np.asarray(values, dtype=np.float64) for name, values in scores.items()}
    lengths = {name: values.shape for name, values in arrays.items()}
    if any(len(shape) != 1 for shape in lengths.values()) or len(set(lengths.values())) != 1:
        raise ValueError(f"scores must be 1-D arrays of one length; got shapes {lengths}")
    missing = [name for name in arrays if name not in weights]
    if missing:
        raise ValueError(f"no weight for {', '.join(missing)}")
    return arrays


def competition_ranks(scores: np.ndarray) -> np.ndarray:
    """1-based ranks, highest score first; equal scores share the better rank (1, 2, 2, 4)."""
    descending = np.sort(-np.asarray(scores, dtype=np.float64))
    return np.searchsorted(descending, -np.asarray(scores, dtype=np.float64), side="left") + 1


def fuse_rrf(scores: Mapping[str, np.ndarray], weights: Mapping[str, float], k: float = RRF_K) -> np.ndarray:
    """Weighted reciprocal rank fusion: ``sum over models of w_m / (k + rank_m(doc))``.

    ``scores`` maps each model to its score per document (higher is better); ranks
    start at 1 and ties share a rank. Returns one fused score per document.
    """
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not math.isfinite(k) or k < 0:
        raise ValueError(f"k must be a non-negative number, not {k!r}")
    arrays = _check_scores(scores, weights)
    fused = sum(weights[name] / (k + competition_ranks(values)) for name, values in arrays.items())
    return np.asarray(fused, dtype=np.float64)


def fuse_scores(scores: Mapping[str, np.ndarray], weights: Mapping[str, float]) -> np.ndarray:
    """Weighted mean of the models' scores (cosines): ``sum w_m s_m / sum w_m`` per document."""
    arrays = _check_scores(scores, weights)
    total = sum(weights[name] for name in arrays)
    return sum(weights[name] * values for name, values in arrays.items()) / total


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
        self._peak_bytes = 0
        self._local = threading.local()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None,
                 loader: Callable[[str], object] | None = None) -> Ensemble:
        """Build an ensemble from ``EMBED_MODELS``, ``EMBED_WEIGHTS``, ``EMBED_MEMORY_BUDGET``
        and ``EMBED_MAX_LOADED`` (read from ``environ``, default ``os.environ``).

        Unset or empty variables take their defaults: ``bge-base``, weight 1.0 each, no
        budget, no count bound. A bad value raises ValueError naming the variable and value.
        """
        env = os.environ if environ is None else environ

        def read(variable: str, parse: Callable[[str], object], default: str | None):
            value = (env.get(variable) or "").strip()
            if not value:
                if default is None:
                    return None
                value = default
            try:
                return parse(value)
            except ValueError as err:
                raise ValueError(f"{variable}={value!r}: {err}") from None

        names, weights = read("EMBED_MODELS", parse_model_list, DEFAULT_MODELS)
        extra_weights = read("EMBED_WEIGHTS", parse_weights, None) or {}
        for name, weight in extra_weights.items():
            if name not in names:
                raise ValueError(
                    f"EMBED_WEIGHTS={env['EMBED_WEIGHTS']!r}: {name!r} is not in EMBED_MODELS "
                    f"({', '.join(names)})"
                )
            if name in weights and weights[name] != weight:
                raise ValueError(
                    f"EMBED_WEIGHTS={env['EMBED_WEIGHTS']!r}: {name!r} has weight {weight} "
                    f"but EMBED_MODELS={env['EMBED_MODELS']!r} gives it {weights[name]}"
                )
            weights[name] = weight
        budget = read("EMBED_MEMORY_BUDGET", parse_byte_size, None)
        max_loaded = read("EMBED_MAX_LOADED", parse_max_loaded, None)
        return cls(names, weights=weights, memory_budget=budget, max_loaded=max_loaded, loader=loader)

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
                given[canonical] = _check_weight(weight, weight)
            return {name: given.get(name, 1.0) for name in self.models}
        if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
            raise TypeError(f"weights must be a mapping or a sequence, not {type(weights).__name__}")
        if len(weights) != len(self.models):
            raise ValueError(f"{len(weights)} weights for {len(self.models)} models")
        return {name: _check_weight(w, w) for name, w in zip(self.models, weights)}

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
        entry, variant = _registry_entry(name)
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
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
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
        total = sum(self.weights.values())
        parts = [per_model[name] * np.float32(math.sqrt(self.weights[name] / total)) for name in self.models]
        return np.concatenate(parts, axis=1).astype(np.float32, copy=False)

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
        if fusion == "rrf":
            fused = fuse_rrf(scores, self.weights, k)
        else:
            fused = fuse_scores(scores, self.weights)
        order = np.argsort(-fused, kind="stable")[:top_k]
        return [(int(index), float(fused[index])) for index in order]

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
