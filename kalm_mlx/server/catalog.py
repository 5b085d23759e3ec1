"""Which models a request may name, and what is known of them.

A request names an enabled model by its name, an alias or its hub id, and nothing else:
a path, or a registry model that is not enabled, is refused without touching the disk or
the network (no folder is probed, nothing is downloaded).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..settings import registry_entry
from .batcher import ModelInfo

ALL_MODELS = ("*", "all")

DIFFERENT_MODELS = {
    "gte-base-en-v1.5": (
        "Alibaba-NLP/gte-base-en-v1.5 is a different model from gte-base (thenlper/gte-base): "
        "their vectors are not interchangeable, and kalm-mlx does not serve it. Ask for "
        "gte-base (and re-embed what was embedded with gte-base-en-v1.5)"
    ),
}
"""Names clients send for models that look like a registry model but are not it."""
DIFFERENT_MODELS["alibaba-nlp/gte-base-en-v1.5"] = DIFFERENT_MODELS["gte-base-en-v1.5"]


class UnknownModelError(LookupError):
    """A request named a model this server does not serve."""


@dataclass(frozen=True)
class ModelFacts:
    """What a listing shows for one enabled model."""

    name: str
    dimensions: int | None
    max_tokens: int | None


class Catalog:
    """The enabled models (``enabled[0]`` is the default) and how requests name them.

    ``learned`` is the batcher's :attr:`~kalm_mlx.server.batcher.Batcher.info` (facts of
    models it has held), which win over the registry's.
    """

    def __init__(self, enabled: Sequence[str], learned: Mapping[str, ModelInfo] | None = None):
        if not enabled:
            raise ValueError("no models enabled")
        self.enabled = tuple(enabled)
        self.learned = learned if learned is not None else {}

    @property
    def default(self) -> str:
        """The model used when a request names none."""
        return self.enabled[0]

    def resolve(self, requested: str | None) -> str:
        """The enabled model ``requested`` names (None or "" for the default).

        Raises :class:`UnknownModelError` with a message listing the enabled models.
        """
        if requested is None or not requested.strip():
            return self.default
        if requested in self.enabled:
            return requested
        key = requested.strip().lower()
        if key in DIFFERENT_MODELS:
            raise UnknownModelError(f"{DIFFERENT_MODELS[key]}. {self._listing()}")
        entry, variant = registry_entry(requested)
        if entry is not None:
            wanted = f"{entry.name}-{variant}" if variant else entry.name
            if wanted in self.enabled:
                return wanted
            if variant is None:
                # An alias of a model enabled only as a quantized copy names that copy.
                copies = [name for name in self.enabled if registry_entry(name)[0] is entry]
                if len(copies) == 1:
                    return copies[0]
            raise UnknownModelError(
                f"model {requested!r} ({entry.hub_id}) is not enabled on this server. {self._listing()}")
        raise UnknownModelError(f"model {requested!r} is not served here. {self._listing()}")

    def _listing(self) -> str:
        return (f"Enabled models: {', '.join(self.enabled)} (also by alias or hub id; "
                'set EMBED_MODELS to change; "*" asks for all of them)')

    def facts(self, name: str) -> ModelFacts:
        """Dims and token limit of an enabled model: measured once it has been loaded, from the
        registry before that (None for a folder not loaded yet)."""
        info = self.learned.get(name)
        if info is not None:
            return ModelFacts(name, info.dim, info.max_tokens)
        entry = registry_entry(name)[0]
        if entry is not None:
            return ModelFacts(name, entry.dim, entry.max_tokens)
        return ModelFacts(name, None, None)
