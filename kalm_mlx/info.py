"""What ``kalm-mlx info`` reports: versions, device, BLAS, threads, caches and converted models.

Everything a bug report needs, gathered without touching the network or loading a model.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import mlx.core as mx

from . import __version__, _backend
from .embedder import default_parallel_streams
from .hub import cache_home, hf_hub_cache
from .loading import is_converted


def environment_report() -> dict:
    """The environment as a JSON-ready dict: what ``kalm-mlx info --json`` prints.

    Keys: ``kalm_mlx``, ``mlx``, ``python`` (versions), ``python_executable``, ``os``,
    ``machine``, ``device`` (``"cpu"`` or ``"gpu"``, MLX's default), ``device_name``,
    ``blas_library`` (the path kalm-mlx loaded, or None), ``blas`` (one line on MLX's BLAS),
    ``blas_kernels`` (the kernel set OpenBLAS runs, such as ``Haswell``, or None), ``blas_note`` (a warning when
    those kernels leave the CPU's AVX-512 unused, else None),
    ``blas_threads`` (OpenBLAS's threads at start, None without it), ``cpu_streams`` (streams a CPU batch is split
    over), ``compiled_cpu_paths`` (a C++ compiler for MLX's CPU kernels is on PATH), ``jit_flags`` (the
    instruction-set flags MLX's CPU kernels are built with, see :func:`kalm_mlx._backend.use_jit_isa_flags`),
    ``compiler``, ``kalm_mlx_home``, ``hf_hub_cache`` and ``converted_models``: one
    ``{"name", "path", "size_bytes"}`` per converted folder in ``kalm_mlx_home``.
    """
    device = mx.default_device()
    kernels = _backend.openblas_kernels()
    return {
        "kalm_mlx": __version__,
        "mlx": mx.__version__,
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "os": platform.platform(),
        "machine": platform.machine(),
        "device": "gpu" if device.type == mx.gpu else "cpu",
        "device_name": _device_name(),
        "blas_library": _backend.blas_library,
        "blas": _backend.blas_status,
        "blas_kernels": kernels,
        "blas_note": _backend.blas_kernel_note(kernels, _backend.cpu_flags(), dict(os.environ)),
        "blas_threads": _backend.blas_thread_budget(),
        "cpu_streams": default_parallel_streams(),
        "compiled_cpu_paths": _backend.cpu_compiler_available(),
        "jit_flags": _backend.jit_flags_status,  # set up by cpu_compiler_available() just above
        "compiler": _backend.real_compiler(),
        "kalm_mlx_home": str(cache_home()),
        "hf_hub_cache": str(hf_hub_cache()),
        "converted_models": converted_models(cache_home()),
    }


def converted_models(folder: Path) -> list[dict]:
    """The converted models directly inside ``folder``, by name: name, path and bytes on disk."""
    if not folder.is_dir():
        return []
    return [
        {"name": child.name, "path": str(child), "size_bytes": folder_size(child)}
        for child in sorted(folder.iterdir())
        if child.is_dir() and is_converted(child)
    ]


def folder_size(folder: Path) -> int:
    """Bytes in the files under ``folder`` (symbolic links are not followed)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            path = Path(root) / name
            if not path.is_symlink():
                total += path.stat().st_size
    return total


def report_lines(report: dict) -> list[str]:
    """``report`` as aligned ``key  value`` lines: what ``kalm-mlx info`` prints."""

    def show(value) -> str:
        if value is None:
            return "none"
        if isinstance(value, bool):
            return "yes" if value else "no"
        return str(value)

    models = report["converted_models"]
    scalars = {key: value for key, value in report.items() if key != "converted_models"}
    width = max(map(len, scalars)) + 2
    lines = [f"{key.ljust(width)}{show(value)}" for key, value in scalars.items()]
    lines.append(f"{'converted_models'.ljust(width)}{len(models) or 'none'}")
    if models:
        name_width = max(len(model["name"]) for model in models) + 2
        lines += [
            f"  {model['name'].ljust(name_width)}{_megabytes(model['size_bytes']):>10}  {model['path']}"
            for model in models
        ]
    return lines


def _megabytes(size: int) -> str:
    return f"{size / 1e6:,.1f} MB"


def _device_name() -> str | None:
    try:
        return mx.device_info().get("device_name")
    except (AttributeError, RuntimeError):
        return None
