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
_blas_handle: ctypes.CDLL | None = None


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
    global _blas_handle
    try:
        _blas_handle = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError:
        return None
    blas_library = path
    return path


load_fast_blas()


def blas_threads() -> int | None:
    """Threads the loaded OpenBLAS runs a matmul on, or None when there is no such control.

    None on macOS (Accelerate) and with MLX's bundled BLAS. The count starts at
    ``OPENBLAS_NUM_THREADS`` when set, else the number of cores.
    """
    get = getattr(_blas_handle, "openblas_get_num_threads", None)
    return int(get()) if get is not None else None


_blas_threads_at_start = blas_threads()


def blas_thread_budget() -> int | None:
    """Threads kalm-mlx may give OpenBLAS in all: its count at import, or None without OpenBLAS."""
    return _blas_threads_at_start


def set_blas_threads(count: int) -> bool:
    """Make the loaded OpenBLAS run each matmul on ``count`` threads; False when it can't.

    Process-wide and cheap (a store), so callers set it per batch.
    """
    setter = getattr(_blas_handle, "openblas_set_num_threads", None)
    if setter is None:
        return False
    if count < 1:
        raise ValueError(f"BLAS thread count must be at least 1, not {count}")
    setter(int(count))
    return True


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None)
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


# glibc's mallopt parameters.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 << 20
"""Blocks up to this size come from the heap after :func:`tune_malloc` (glibc's maximum)."""
TRIM_THRESHOLD_BYTES = 256 << 20
"""Free memory at the heap's top that glibc keeps after :func:`tune_malloc`."""


@functools.cache
def tune_malloc() -> bool:
    """Keep glibc from unmapping MLX's activation buffers between batches; True if done.

    By default glibc serves blocks over 128 KiB..32 MiB with fresh ``mmap`` calls and
    unmaps them when freed, so every batch page-faults its activations in again (about
    570 faults a layer for KaLM at 512 tokens a stream, 2-3 % of the CPU time and
    more when two streams fault at once). With these thresholds such blocks are reused
    from the heap. Process-wide and done once; :func:`release_memory` still returns
    free memory to the system with ``malloc_trim``. Not on macOS or musl.
    """
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )


def trim_malloc() -> bool:
    """Return the C heap's free pages to the system (glibc ``malloc_trim``); True if done."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


@functools.cache
def cpu_compiler_available() -> bool:
    """True when MLX can build compiled kernels for the CPU backend.

    ``mx.compile`` on the CPU backend writes C++ and builds it with ``g++`` at run time;
    without one on PATH the process exits with no Python exception. The encoders' CPU
    fast paths are compiled, so they are used only when this is True.
    """
    return shutil.which("g++") is not None
