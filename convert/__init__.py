"""The conversion command (``python -m convert``, ``kalm-mlx-convert``).

A thin layer over kalm-mlx's conversion machinery (:mod:`kalm_mlx.conversion`); it
imports kalm_mlx and is never imported by it.
"""

from kalm_mlx.api import convert
from kalm_mlx.conversion import ConversionError

__all__ = ["ConversionError", "convert"]
