"""Backend set-up that must run before the first ``import mlx.core``.

On Linux the ``mlx[cpu]`` wheel links a slow reference BLAS. Loading an
optimised OpenBLAS into the global symbol namespace first makes MLX's float32
matmul resolve to it (about 40x faster on x86). Nothing happens on macOS, where
MLX uses Accelerate and Metal.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import shutil
import sys

# Debian/Ubuntu paths first (package libopenblas0-pthread), then what the
# dynamic linker can find. KALM_MLX_BLAS names a library explicitly; set it to
# "none" to keep MLX's bundled BLAS.
_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
)

blas_library: str | None = None
"""Path of the BLAS library loaded for MLX, or None when MLX uses its own."""


def _find_openblas() -> str | None:
    explicit = os.environ.get("KALM_MLX_BLAS")
    if explicit:
        return None if explicit.lower() == "none" else explicit
    for path in _CANDIDATES:
        if os.path.exists(path):
            return path
    found = ctypes.util.find_library("openblas")
    return found


def load_fast_blas() -> str | None:
    """Load OpenBLAS globally on Linux before MLX; return the path loaded, or None."""
    global blas_library
    if blas_library is not None or not sys.platform.startswith("linux"):
        return blas_library
    if "mlx.core" in sys.modules:
        # Too late: MLX has already bound its BLAS symbols.
        return None
    path = _find_openblas()
    if path is None:
        return None
    try:
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError:
        return None
    blas_library = path
    return path


load_fast_blas()


@functools.cache
def cpu_compiler_available() -> bool:
    """True when MLX can build compiled kernels for the CPU backend.

    ``mx.compile`` on the CPU backend writes C++ and builds it with ``g++`` at run time;
    without one on PATH the process exits with no Python exception. The encoders' CPU
    fast paths are compiled, so they are used only when this is True.
    """
    return shutil.which("g++") is not None
