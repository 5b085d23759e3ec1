"""kalm-mlx: text embeddings on Apple Silicon with MLX, KaLM-Embedding-V2 first."""

from . import _backend  # noqa: F401  (must run before mlx.core is imported)
from ._backend import SlowBlasWarning
from .embedder import EmptyTextWarning, Embedder, TruncationWarning
from .ensemble import Ensemble
from .api import load
from .registry import ModelEntry, list_models

__all__ = [
    "Embedder",
    "EmptyTextWarning",
    "Ensemble",
    "ModelEntry",
    "SlowBlasWarning",
    "TruncationWarning",
    "list_models",
    "load",
]
__version__ = "0.1.0"
