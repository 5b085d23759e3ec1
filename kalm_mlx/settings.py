"""Settings read from the environment or written as sizes: ``EMBED_*`` and byte counts.

Plain functions parse each variable; :class:`Settings` holds the result, frozen, for
the ensemble and the server to build from. Every error names what was wrong: the
functions name the value, :meth:`Settings.from_env` adds the variable.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .hub import split_variant
from .registry import ModelEntry, find_model, list_models

DEFAULT_MODELS = "bge-base"
"""``EMBED_MODELS`` when it is unset or empty (engram-embed's default)."""

_DECIMAL_UNITS = {"kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_BINARY_UNITS = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
BYTE_UNITS = {"": 1, "b": 1, **_DECIMAL_UNITS, **_BINARY_UNITS}
"""Size suffixes, case-insensitive: KB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB powers of 1024."""

_SIZE_PATTERN = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")


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
    return check_weight(weight, text)


def check_weight(weight: object, shown: object) -> float:
    """A fusion weight as a float; ValueError (showing ``shown``) unless it is a positive finite number."""
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
        pairs = [(name, check_weight(weight, weight)) for name, weight in raw.items()]
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


def registry_entry(name: str) -> tuple[ModelEntry | None, str | None]:
    """(registry entry or None, quantized variant such as ``q8``) for a name like ``kalm-q8``."""
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
    entry, variant = registry_entry(name)
    if entry is not None:
        return f"{entry.name}-{variant}" if variant else entry.name
    if name and Path(name).expanduser().is_dir():
        return name
    valid = ", ".join(e.name for e in list_models())
    raise ValueError(
        f"unknown model {name!r}: not a folder nor a known model ({valid}; "
        "add -q8 or -q4 for a quantized copy)"
    )


@dataclass(frozen=True)
class Settings:
    """What ``EMBED_MODELS``, ``EMBED_WEIGHTS``, ``EMBED_MEMORY_BUDGET`` and ``EMBED_MAX_LOADED`` say.

    ``models`` are canonical names (or folders), the first being the default model;
    ``weights`` has a positive weight for every model; ``memory_budget`` (bytes) and
    ``max_loaded`` are None when unbounded.
    """

    models: tuple[str, ...]
    weights: Mapping[str, float] = field(default_factory=dict)
    memory_budget: int | None = None
    max_loaded: int | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read the four ``EMBED_*`` variables from ``environ`` (default ``os.environ``).

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
        return cls(
            models=tuple(names),
            weights={name: weights.get(name, 1.0) for name in names},
            memory_budget=read("EMBED_MEMORY_BUDGET", parse_byte_size, None),
            max_loaded=read("EMBED_MAX_LOADED", parse_max_loaded, None),
        )
