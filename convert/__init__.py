"""Conversion of Hugging Face checkpoints into kalm-mlx folders (``python -m convert``)."""

import kalm_mlx  # noqa: F401  (sets up the BLAS before MLX is imported)

from .convert import ConversionError, convert

__all__ = ["ConversionError", "convert"]
