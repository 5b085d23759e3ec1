"""The conversion machinery: read a checkpoint folder, check it, cast or quantize it, write it atomically.

Used by :func:`kalm_mlx.load` to convert a registry model into the cache on first use
(through :mod:`kalm_mlx.hub`) and by the conversion command (``python -m convert``,
``kalm-mlx convert``), which resolves names first (:func:`kalm_mlx.api.convert`).
"""

from .core import ConversionError, check_options, convert_folder, format_report, validate_output
from .quantize import DEFAULT_GROUP_SIZE, QUANTIZE_BITS

__all__ = [
    "DEFAULT_GROUP_SIZE",
    "QUANTIZE_BITS",
    "ConversionError",
    "check_options",
    "convert_folder",
    "format_report",
    "validate_output",
]
