"""Encoder families: one module per architecture, chosen by the checkpoint's ``model_type``."""

from __future__ import annotations

import importlib
from types import ModuleType

# model_type in config.json -> family module. A family module provides
# ModelArgs.from_config, Model (with sanitize) and DEFAULT_POOLING.
FAMILIES = {
    "qwen2": "kalm_mlx.models.qwen2",
    "bert": "kalm_mlx.models.bert",
    "nomic_bert": "kalm_mlx.models.nomic_bert",
}


def family_of(config: dict, source: str = "config.json") -> str:
    """Return the family name for a Hugging Face config dict, or raise ValueError naming the model type."""
    model_type = config.get("model_type")
    if model_type in FAMILIES:
        return model_type
    architectures = config.get("architectures") or []
    raise ValueError(
        f"{source}: model_type {model_type!r} (architectures {architectures}) is not supported; "
        f"supported model types: {', '.join(sorted(FAMILIES))}"
    )


def family_module(family: str) -> ModuleType:
    """Import and return the encoder module of a family name."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known: {', '.join(sorted(FAMILIES))}")
    return importlib.import_module(FAMILIES[family])
