"""Finding a model's folder: a local path, the kalm-mlx cache, or the Hugging Face hub."""

from __future__ import annotations

import os
from pathlib import Path

from .registry import ModelEntry, find_model


def cache_home() -> Path:
    """Folder of converted models: ``$KALM_MLX_HOME`` or ``~/.cache/kalm-mlx``."""
    return Path(os.environ.get("KALM_MLX_HOME") or Path.home() / ".cache" / "kalm-mlx")


def resolve(name_or_path: str | Path) -> tuple[Path, ModelEntry | None]:
    """Return (folder, registry entry or None) for a path, registry name or hub id."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path, None
    name = str(name_or_path)
    entry = find_model(name)
    tried = []
    if entry is not None:
        converted = cache_home() / entry.name
        if (converted / "config.json").exists():
            return converted, entry
        tried.append(f"converted cache {converted}")
    hub_id = entry.hub_id if entry else name
    if "/" not in hub_id:
        from .registry import list_models

        valid = ", ".join(e.name for e in list_models())
        raise ValueError(f"unknown model {name!r}: not a folder, a known name ({valid}) or a hub id")
    folder = _hub_snapshot(hub_id, tried)
    return folder, entry


def _hub_snapshot(hub_id: str, tried: list[str]) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.txt", "*/config.json"]
    try:
        return Path(snapshot_download(hub_id, allow_patterns=patterns, local_files_only=True))
    except Exception:
        tried.append(f"Hugging Face cache ({hub_id})")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise FileNotFoundError(f"{hub_id}: not found offline (HF_HUB_OFFLINE is set); tried {'; '.join(tried)}")
    try:
        return Path(snapshot_download(hub_id, allow_patterns=patterns))
    except Exception as err:
        tried.append(f"Hugging Face hub ({type(err).__name__}: {err})")
        raise FileNotFoundError(f"{hub_id}: could not be found or downloaded; tried {'; '.join(tried)}") from None
