"""Backend set-up that must run before the first ``import mlx.core``.

On Linux the ``mlx[cpu]`` wheel links a slow reference BLAS. Loading an
optimised OpenBLAS into the global symbol namespace first makes MLX's float32
matmul resolve to it (about 40x faster on x86). When that cannot be done (no
OpenBLAS installed, a failed load, or ``mlx.core`` imported first) and MLX computes
on the CPU, a :class:`SlowBlasWarning` says so once, unless ``KALM_MLX_BLAS=none``.
Nothing happens on macOS, where MLX uses Accelerate and Metal.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import hashlib
import os
import platform
import re
import shlex
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

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
BLAS_PACKAGE = "libopenblas0-pthread"
"""The Debian/Ubuntu package that installs the OpenBLAS kalm-mlx looks for."""


class SlowBlasWarning(UserWarning):
    """MLX's CPU backend runs on its slow reference BLAS (Linux, no OpenBLAS loaded in time)."""


blas_library: str | None = None
"""Path of the BLAS library loaded for MLX, or None when MLX uses its own."""
blas_status: str = "not set up yet"
"""One line on how MLX's BLAS was set up (what ``kalm-mlx info`` prints)."""
_blas_handle: ctypes.CDLL | None = None
_slow_blas_reason: str | None = None


AVX512_FLAGS = ("avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl")
"""The AVX-512 features (as Linux's /proc/cpuinfo names them) of OpenBLAS's SkylakeX-family kernels."""
AVX512_KERNELS = ("SkylakeX", "Cooperlake", "SapphireRapids")
"""OpenBLAS kernel sets whose float32 GEMM uses AVX-512."""


def cpuinfo_fields(names: tuple[str, ...], cpuinfo: str = "/proc/cpuinfo") -> dict[str, str]:
    """The first value of each of ``names`` (``model name``, ``flags``...) in Linux's ``cpuinfo``;
    names it lacks are left out, and there is none at all where the file is missing (macOS)."""
    fields: dict[str, str] = {}
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in names and key not in fields:
                    fields[key] = value.strip()
                    if len(fields) == len(names):
                        break
    except OSError:
        pass
    return fields


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags as Linux reports them (the first ``flags`` line of ``cpuinfo``);
    empty where there is no such file or line (macOS, most ARM machines)."""
    return frozenset(cpuinfo_fields(("flags",), cpuinfo).get("flags", "").split())


def has_avx512(flags: frozenset[str]) -> bool:
    """True when ``flags`` (see :func:`cpu_flags`) hold every feature of :data:`AVX512_FLAGS`."""
    return all(flag in flags for flag in AVX512_FLAGS)


def blas_kernel_note(kernels: str | None, flags: frozenset[str], environ: dict[str, str]) -> str | None:
    """A warning line when OpenBLAS runs kernels without AVX-512 on a CPU that has it, else None.

    On such a CPU OpenBLAS's AVX2 kernels run float32 matmul at about half the speed of its
    AVX-512 ones (AMD Zen 5: ~105 against ~200 GFLOP/s a core). Usually ``OPENBLAS_CORETYPE``
    chose them (some machines set it because older OpenBLAS builds miscompute on their CPU),
    or the OpenBLAS is older than the CPU. kalm-mlx only says so; it never changes the variable.
    """
    if not kernels or not has_avx512(flags):
        return None
    if kernels.lower() in (name.lower() for name in AVX512_KERNELS):
        return None
    forced = environ.get("OPENBLAS_CORETYPE")
    why = (f"OPENBLAS_CORETYPE={forced} chose them" if forced
           else "this OpenBLAS chose them; a newer one may know this CPU")
    return (f"OpenBLAS runs its {kernels} kernels (no AVX-512) on a CPU with AVX-512 ({why}): "
            "float32 matmul runs at about half the speed its AVX-512 kernels reach")


def _find_openblas() -> str | None:
    for path in _CANDIDATES:
        if os.path.exists(path):
            return path
    return ctypes.util.find_library("openblas")


@functools.cache
def load_fast_blas() -> str | None:
    """Load OpenBLAS globally on Linux before MLX; return the path loaded, or None.

    Done once, at import; later calls return the same. Records what happened in
    :data:`blas_status`. Without an optimised BLAS on Linux (none found, a failed load,
    or ``mlx.core`` imported first) the reason is kept for the :class:`SlowBlasWarning`;
    ``KALM_MLX_BLAS=none`` is a choice, not a problem.
    """
    global blas_library, blas_status, _blas_handle, _slow_blas_reason
    if not sys.platform.startswith("linux"):
        blas_status = "Accelerate, MLX's own on macOS" if sys.platform == "darwin" else "MLX's own"
        return None
    explicit = os.environ.get("KALM_MLX_BLAS", "").strip()
    if explicit.lower() == "none":
        blas_status = "MLX's bundled reference BLAS (KALM_MLX_BLAS=none)"
        return None
    if "mlx.core" in sys.modules:
        # Too late: MLX has already bound its BLAS symbols.
        blas_status = "MLX's bundled reference BLAS (mlx.core was imported before kalm_mlx)"
        _slow_blas_reason = (
            "mlx.core was imported before kalm_mlx, too late to load OpenBLAS for it; "
            "import kalm_mlx first"
        )
        return None
    path = explicit or _find_openblas()
    if path is None:
        blas_status = "MLX's bundled reference BLAS (no OpenBLAS found)"
        _slow_blas_reason = (
            f"no OpenBLAS found; install it (Debian/Ubuntu: sudo apt-get install {BLAS_PACKAGE}) "
            "or set KALM_MLX_BLAS to a libopenblas.so"
        )
        return None
    try:
        _blas_handle = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError as err:
        blas_status = f"MLX's bundled reference BLAS (could not load {path})"
        named = " named by KALM_MLX_BLAS" if explicit else ""
        _slow_blas_reason = (
            f"could not load the BLAS{named} ({err}); install OpenBLAS "
            f"(Debian/Ubuntu: sudo apt-get install {BLAS_PACKAGE}) or set KALM_MLX_BLAS to a "
            "libopenblas.so that loads"
        )
        return None
    blas_library = path
    kernels = openblas_kernels()
    blas_status = f"{path}, loaded before mlx.core" + (f", {kernels} kernels" if kernels else "")
    return path


def openblas_kernels() -> str | None:
    """The kernel set the loaded OpenBLAS runs (``Haswell``, ``SkylakeX``, ``Cooperlake``...),
    or None without OpenBLAS.

    OpenBLAS picks it from the CPU when it loads unless ``OPENBLAS_CORETYPE`` names one;
    on an AVX-512 CPU forced to AVX2 kernels (``Haswell``) float32 matmul runs at about
    half speed.
    """
    get = getattr(_blas_handle, "openblas_get_corename", None)
    if get is None:
        return None
    get.restype = ctypes.c_char_p
    name = get()
    return name.decode() if name else None


load_fast_blas()

import mlx.core as mx  # noqa: E402  (only once the BLAS above is in place)


def _warn_if_slow_blas() -> bool:
    """Warn (:class:`SlowBlasWarning`) when MLX's CPU backend has no optimised BLAS; True if warned.

    Called once by ``import kalm_mlx``. Quiet on macOS, on a GPU, with OpenBLAS loaded
    and with ``KALM_MLX_BLAS=none``.
    """
    if _slow_blas_reason is None or mx.default_device() != mx.cpu:
        return False
    warnings.warn(
        f"MLX's CPU backend is running on its reference BLAS, which makes float32 matmul "
        f"10-40x slower: {_slow_blas_reason}. Set KALM_MLX_BLAS=none to keep MLX's BLAS without "
        "this warning; `kalm-mlx info` shows what is loaded.",
        SlowBlasWarning,
        stacklevel=2,
    )
    return True


_warn_if_slow_blas()


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
    fast paths are compiled, so they are used only when this is True. The first call puts
    :func:`use_jit_isa_flags` in place, before kalm-mlx's first kernel is built: MLX keeps
    each build in its cache by name, with whatever flags it was first built with.
    """
    use_jit_isa_flags()
    return shutil.which("g++") is not None


# --- Instruction-set flags for MLX's CPU JIT ---------------------------------------------------

JIT_FLAGS_SETTING = "KALM_MLX_JIT_FLAGS"
"""Environment variable: ``auto`` (the default), ``off``, or the ``-m`` flags to build MLX's CPU kernels with."""
AVX2_JIT_FLAGS = ("-mavx2", "-mfma", "-mf16c")
"""The flags MLX's JIT adds itself when MLX was built with AVX2, which its Linux wheels are not."""
_AVX2_CPU_FLAGS = ("avx2", "fma", "f16c")
_JIT_FLAG = re.compile(r"^-m[A-Za-z0-9_.,=+-]+$")
# MLX's JIT writes its sources and libraries to <temp dir>/mlx/<version>/cpu/.
_MLX_JIT_ARGUMENT = "*/mlx/*/cpu/*"
_WRAPPER_MARK = "# Written by kalm-mlx (kalm_mlx._backend.use_jit_isa_flags)"

jit_flags_status: str = "not set up yet"
"""One line on the flags MLX's CPU JIT builds with (what ``kalm-mlx info`` prints)."""


def jit_isa_flags(environ: dict[str, str] | None = None, flags: frozenset[str] | None = None,
                  machine: str | None = None, system: str | None = None) -> tuple[str, ...]:
    """The instruction-set flags MLX's CPU kernels should be built with here.

    :data:`JIT_FLAGS_SETTING` decides when set: ``off`` (or ``none``, ``0``) for none, ``auto``
    for the default, otherwise its ``-m`` flags (``-march=native`` for instance). The default
    is :data:`AVX2_JIT_FLAGS` on x86-64 Linux CPUs with AVX2, FMA and F16C, else none.
    ``environ``, ``flags`` (CPU features), ``machine`` and ``system`` default to this process's.
    Raises ValueError naming the variable when its value is not ``-m`` flags.
    """
    environ = os.environ if environ is None else environ
    setting = environ.get(JIT_FLAGS_SETTING, "").strip()
    if setting.lower() in ("off", "none", "0"):
        return ()
    if setting and setting.lower() != "auto":
        chosen = tuple(shlex.split(setting))
        bad = [flag for flag in chosen if not _JIT_FLAG.match(flag)]
        if bad:
            raise ValueError(f"{JIT_FLAGS_SETTING}={setting!r}: {bad[0]!r} is not a -m compiler flag; "
                             "use auto, off, or flags such as '-mavx2 -mfma'")
        return chosen
    machine = platform.machine() if machine is None else machine
    system = sys.platform if system is None else system
    if not system.startswith("linux") or machine.lower() not in ("x86_64", "amd64"):
        return ()
    flags = cpu_flags() if flags is None else flags
    return AVX2_JIT_FLAGS if all(flag in flags for flag in _AVX2_CPU_FLAGS) else ()


def jit_wrapper_script(compiler: str, flags: tuple[str, ...]) -> str:
    """A POSIX shell script standing in for ``g++``: it runs ``compiler`` with ``flags`` added when
    the command builds one of MLX's JIT kernels (its paths hold ``/mlx/<version>/cpu/``), and runs
    it unchanged for anything else."""
    real = shlex.quote(compiler)
    added = " ".join(shlex.quote(flag) for flag in flags)
    return (
        "#!/bin/sh\n"
        f"{_WRAPPER_MARK}: MLX builds its CPU kernels\n"
        "# with plain g++ -O3, for the baseline x86-64 (SSE2) vector units; this adds the CPU's own.\n"
        f'case "$*" in\n  {_MLX_JIT_ARGUMENT}) exec {real} {added} "$@" ;;\nesac\n'
        f'exec {real} "$@"\n'
    )


def _jit_wrapper_root() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "kalm-mlx" / "jit-compiler"


def _is_wrapper(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return _WRAPPER_MARK in f.read(512)
    except OSError:
        return False


def _path_without_wrappers() -> list[str]:
    """PATH's entries less the folders whose g++ is one of :func:`use_jit_isa_flags`'s wrappers."""
    return [entry for entry in os.environ.get("PATH", "").split(os.pathsep)
            if entry and not _is_wrapper(Path(entry) / "g++")]


def real_compiler() -> str | None:
    """The ``g++`` on PATH, looking past the wrapper of :func:`use_jit_isa_flags`; None without one."""
    return shutil.which("g++", path=os.pathsep.join(_path_without_wrappers()))


def _write_executable(path: Path, text: str) -> None:
    if path.is_file() and path.read_text() == text and os.access(path, os.X_OK):
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, prefix=".g++-") as f:
        f.write(text)
    os.chmod(f.name, 0o755)
    os.replace(f.name, path)


def use_jit_isa_flags() -> tuple[str, ...]:
    """Make MLX build its CPU kernels with :func:`jit_isa_flags`; returns the flags now in effect.

    ``mx.compile`` on the CPU writes C++ and runs ``g++ -O3`` on it with no instruction-set
    flags (MLX's Linux wheels are built for baseline x86-64), so its kernels use 4-wide SSE2
    on CPUs with 8-wide AVX2 and FMA: the encoders' compiled GELU and softmax ran 1.8-2x
    slower. MLX takes no compiler setting, so this puts a ``g++`` wrapper
    (:func:`jit_wrapper_script`, in ``~/.cache/kalm-mlx/jit-compiler``) first on this process's
    ``PATH``; it adds the flags to MLX's kernel builds only. Kernels MLX built before (cached in
    ``<temp dir>/mlx/<version>/cpu``) are reused as they are. Records the outcome in
    :data:`jit_flags_status`; () and no change without a ``g++``, off x86-64 Linux, or with
    ``KALM_MLX_JIT_FLAGS=off``.
    """
    global jit_flags_status
    try:
        flags = jit_isa_flags()
    except ValueError as err:
        jit_flags_status = f"none ({err})"
        warnings.warn(str(err), stacklevel=2)
        return ()
    if not flags:
        jit_flags_status = "none (MLX's own: no flags to add on this CPU or platform, or KALM_MLX_JIT_FLAGS=off)"
        return ()
    compiler = real_compiler()
    if compiler is None:
        jit_flags_status = "none (no g++ on PATH)"
        return ()
    folder = _jit_wrapper_root() / hashlib.sha256("\0".join((compiler, *flags)).encode()).hexdigest()[:16]
    try:
        _write_executable(folder / "g++", jit_wrapper_script(compiler, flags))
    except OSError as err:
        jit_flags_status = f"none (could not write the g++ wrapper in {folder}: {err})"
        return ()
    os.environ["PATH"] = os.pathsep.join([str(folder), *_path_without_wrappers()])
    jit_flags_status = f"{' '.join(flags)} (through {folder / 'g++'})"
    return flags
