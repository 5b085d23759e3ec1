"""Backend set-up on Linux: OpenBLAS for MLX (or a warning), its thread count, glibc's malloc thresholds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kalm_mlx import _backend

ROOT = Path(__file__).resolve().parents[1]

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux set-up")
needs_openblas = pytest.mark.skipif(_backend.blas_library is None, reason="needs OpenBLAS")


@linux
@needs_openblas
def test_openblas_thread_count_can_be_set_and_read():
    budget = _backend.blas_thread_budget()
    assert budget is not None and budget >= 1
    try:
        assert _backend.set_blas_threads(1)
        assert _backend.blas_threads() == 1
        assert _backend.set_blas_threads(budget)
        assert _backend.blas_threads() == budget
    finally:
        _backend.set_blas_threads(budget)
    with pytest.raises(ValueError, match="at least 1"):
        _backend.set_blas_threads(0)


@needs_openblas
def test_the_kernel_set_is_reported_and_follows_openblas_coretype():
    kernels = _backend.openblas_kernels()
    assert kernels and kernels.isprintable()
    assert f", {kernels} kernels" in _backend.blas_status
    forced = os.environ.get("OPENBLAS_CORETYPE")  # set on some machines; never changed here
    if forced:
        assert kernels.lower() == forced.lower()


def test_without_openblas_there_is_no_thread_control(monkeypatch):
    monkeypatch.setattr(_backend, "_blas_handle", None)
    assert _backend.blas_threads() is None
    assert _backend.set_blas_threads(2) is False
    assert _backend.openblas_kernels() is None


@linux
def test_malloc_tuning_and_trim_on_glibc():
    assert _backend.tune_malloc() is True
    assert _backend.trim_malloc() is True


def test_malloc_helpers_do_nothing_off_glibc(monkeypatch):
    monkeypatch.setattr(_backend, "_glibc", lambda: None)
    _backend.tune_malloc.cache_clear()
    try:
        assert _backend.tune_malloc() is False
        assert _backend.trim_malloc() is False
    finally:
        _backend.tune_malloc.cache_clear()


# --- the warning about a slow BLAS ----------------------------------------------------------

_REPORT_IMPORT = """
import json, sys, warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    if sys.argv[1] == "mlx-first":
        import mlx.core
    if sys.argv[1] == "no-openblas":  # a machine without libopenblas0-pthread
        import ctypes.util, os.path
        exists = os.path.exists
        os.path.exists = lambda path: "openblas" not in str(path) and exists(path)
        ctypes.util.find_library = lambda name: None
    import kalm_mlx
print(json.dumps({
    "warnings": [[w.category.__name__, str(w.message)] for w in caught
                 if issubclass(w.category, kalm_mlx.SlowBlasWarning)],
    "blas_library": kalm_mlx._backend.blas_library,
    "blas": kalm_mlx._backend.blas_status,
    "again": [kalm_mlx._backend.load_fast_blas(), kalm_mlx._backend.blas_status],
}))
"""


def import_in_child(blas: str | None, how: str = "kalm-first") -> dict:
    """Import kalm_mlx in a fresh interpreter with KALM_MLX_BLAS=blas (None: unset).

    ``how``: ``kalm-first``, ``mlx-first`` (mlx.core imported before) or ``no-openblas``.
    """
    env = {key: value for key, value in os.environ.items() if key != "KALM_MLX_BLAS"}
    if blas is not None:
        env["KALM_MLX_BLAS"] = blas
    done = subprocess.run([sys.executable, "-c", _REPORT_IMPORT, how], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@linux
def test_a_missing_blas_warns_once_naming_the_package_and_the_variable():
    child = import_in_child("/nonexistent/libopenblas.so.0")
    assert len(child["warnings"]) == 1
    category, message = child["warnings"][0]
    assert category == "SlowBlasWarning"
    assert "libopenblas0-pthread" in message and "KALM_MLX_BLAS" in message
    assert "/nonexistent/libopenblas.so.0" in message and "slower" in message
    assert child["blas_library"] is None
    assert "could not load /nonexistent/libopenblas.so.0" in child["blas"]
    assert child["again"] == [None, child["blas"]]  # set up once: a second call changes nothing


@linux
def test_no_openblas_installed_warns_naming_the_package_and_the_variable():
    child = import_in_child(None, how="no-openblas")
    assert [category for category, _ in child["warnings"]] == ["SlowBlasWarning"]
    message = child["warnings"][0][1]
    assert "no OpenBLAS found" in message and "sudo apt-get install libopenblas0-pthread" in message
    assert "KALM_MLX_BLAS" in message
    assert child["blas_library"] is None and "no OpenBLAS found" in child["blas"]


@linux
def test_blas_none_is_a_choice_and_stays_quiet():
    child = import_in_child("none")
    assert child["warnings"] == []
    assert child["blas_library"] is None and "KALM_MLX_BLAS=none" in child["blas"]
    assert import_in_child("none", how="mlx-first")["warnings"] == []


@linux
def test_importing_mlx_first_is_too_late_and_says_so():
    child = import_in_child(None, how="mlx-first")
    assert [category for category, _ in child["warnings"]] == ["SlowBlasWarning"]
    assert "mlx.core was imported before kalm_mlx" in child["warnings"][0][1]
    assert child["blas_library"] is None


@linux
def test_the_default_warns_only_without_openblas():
    child = import_in_child(None)
    assert child["blas_library"] == _backend.blas_library
    if _backend.blas_library is None:  # no OpenBLAS on this machine
        assert [category for category, _ in child["warnings"]] == ["SlowBlasWarning"]
    else:
        assert child["warnings"] == []
        assert child["blas"] == f"{_backend.blas_library}, loaded before mlx.core, {_backend.openblas_kernels()} kernels"
    assert child["again"] == [child["blas_library"], child["blas"]]


def test_the_warning_is_exported():
    import kalm_mlx

    assert kalm_mlx.SlowBlasWarning is _backend.SlowBlasWarning
    assert issubclass(kalm_mlx.SlowBlasWarning, UserWarning)


# --- OpenBLAS's kernels on an AVX-512 CPU -------------------------------------------------------

AVX512 = frozenset(_backend.AVX512_FLAGS) | {"fma", "avx2"}


def test_cpu_flags_reads_the_first_flags_line(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f\n\nprocessor\t: 1\nflags\t\t: other\n")
    assert _backend.cpu_flags(str(cpuinfo)) == {"fpu", "avx2", "avx512f"}
    assert _backend.cpu_flags(str(tmp_path / "missing")) == frozenset()
    (tmp_path / "noflags").write_text("processor\t: 0\n")
    assert _backend.cpu_flags(str(tmp_path / "noflags")) == frozenset()
    assert _backend.has_avx512(AVX512) and not _backend.has_avx512(AVX512 - {"avx512vl"})


def test_cpuinfo_fields_keeps_the_first_value_of_each_name(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: AMD EPYC\ncpu family\t: 26\nmodel\t\t: 2\n\n"
                       "processor\t: 1\nmodel name\t: other\n")
    assert _backend.cpuinfo_fields(("model name", "cpu family", "model", "stepping"), str(cpuinfo)) == {
        "model name": "AMD EPYC", "cpu family": "26", "model": "2"}
    assert _backend.cpuinfo_fields(("model name",), str(tmp_path / "missing")) == {}


def test_avx2_kernels_on_an_avx512_cpu_are_named_with_their_cause():
    forced = _backend.blas_kernel_note("Haswell", AVX512, {"OPENBLAS_CORETYPE": "Haswell"})
    assert forced and "Haswell kernels" in forced and "OPENBLAS_CORETYPE=Haswell" in forced
    assert "half the speed" in forced
    chosen = _backend.blas_kernel_note("Zen", AVX512, {})
    assert chosen and "this OpenBLAS chose them" in chosen


def test_no_note_where_the_kernels_fit_the_cpu():
    assert _backend.blas_kernel_note("Cooperlake", AVX512, {}) is None
    assert _backend.blas_kernel_note("SKYLAKEX", AVX512, {"OPENBLAS_CORETYPE": "SKYLAKEX"}) is None
    assert _backend.blas_kernel_note("Haswell", frozenset({"fma", "avx2"}), {}) is None  # no AVX-512
    assert _backend.blas_kernel_note(None, AVX512, {}) is None  # no OpenBLAS


# --- Instruction-set flags for MLX's CPU JIT ---------------------------------------------------

AVX2_CPU = frozenset({"sse2", "avx2", "fma", "f16c"})


def test_jit_flags_are_avx2_on_x86_linux_cpus_that_have_it():
    flags = _backend.jit_isa_flags({}, AVX2_CPU, "x86_64", "linux")
    assert flags == _backend.AVX2_JIT_FLAGS == ("-mavx2", "-mfma", "-mf16c")
    assert _backend.jit_isa_flags({"KALM_MLX_JIT_FLAGS": "auto"}, AVX2_CPU, "x86_64", "linux") == flags
    assert _backend.jit_isa_flags({}, AVX2_CPU - {"fma"}, "x86_64", "linux") == ()
    assert _backend.jit_isa_flags({}, AVX2_CPU, "arm64", "darwin") == ()
    assert _backend.jit_isa_flags({}, AVX2_CPU, "aarch64", "linux") == ()


def test_jit_flags_setting_turns_them_off_or_names_them():
    for off in ("off", "none", "0", " OFF "):
        assert _backend.jit_isa_flags({"KALM_MLX_JIT_FLAGS": off}, AVX2_CPU, "x86_64", "linux") == ()
    chosen = _backend.jit_isa_flags({"KALM_MLX_JIT_FLAGS": "-march=native -mtune=znver4"}, frozenset(),
                                    "aarch64", "linux")
    assert chosen == ("-march=native", "-mtune=znver4")
    for bad in ("-O0", "-mavx2; rm -rf ~", "avx2", "-mavx2 $(id)"):
        with pytest.raises(ValueError, match="KALM_MLX_JIT_FLAGS=.*is not a -m compiler flag"):
            _backend.jit_isa_flags({"KALM_MLX_JIT_FLAGS": bad}, AVX2_CPU, "x86_64", "linux")


def _fake_compiler(tmp_path: Path) -> Path:
    """A stand-in for g++ that prints the arguments it was given, one a line."""
    compiler = tmp_path / "real bin" / "g++"
    compiler.parent.mkdir()
    compiler.write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    compiler.chmod(0o755)
    return compiler


@linux
def test_the_wrapper_adds_flags_to_mlx_kernel_builds_only(tmp_path):
    compiler = _fake_compiler(tmp_path)
    wrapper = tmp_path / "g++"
    wrapper.write_text(_backend.jit_wrapper_script(str(compiler), ("-mavx2", "-mfma")))
    wrapper.chmod(0o755)
    mlx_build = ["-std=c++17", "-O3", "-shared", "/tmp/mlx/0.32.4/cpu/K.cpp", "-o", "/tmp/mlx/0.32.4/cpu/libK.so"]
    run = subprocess.run([str(wrapper), *mlx_build], capture_output=True, text=True, check=True)
    assert run.stdout.split("\n")[:-1] == ["-mavx2", "-mfma", *mlx_build]
    other = ["-O2", "my file.c", "-o", "/tmp/a.out"]
    run = subprocess.run([str(wrapper), *other], capture_output=True, text=True, check=True)
    assert run.stdout.split("\n")[:-1] == other  # untouched, spaces in arguments kept


@linux
def test_use_jit_isa_flags_puts_one_wrapper_first_on_path(tmp_path, monkeypatch):
    compiler = _fake_compiler(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", f"{compiler.parent}{os.pathsep}/usr/bin")
    monkeypatch.setattr(_backend, "cpu_flags", lambda cpuinfo="/proc/cpuinfo": AVX2_CPU)
    monkeypatch.setattr(_backend.platform, "machine", lambda: "x86_64")
    monkeypatch.setenv("KALM_MLX_JIT_FLAGS", "auto")
    assert _backend.use_jit_isa_flags() == _backend.AVX2_JIT_FLAGS
    first = Path(os.environ["PATH"].split(os.pathsep)[0])
    assert first.is_relative_to(tmp_path / "cache" / "kalm-mlx" / "jit-compiler")
    assert (first / "g++").read_text() == _backend.jit_wrapper_script(str(compiler), _backend.AVX2_JIT_FLAGS)
    assert _backend.real_compiler() == str(compiler)
    assert "-mavx2 -mfma -mf16c" in _backend.jit_flags_status
    # Again, and with other flags: still one wrapper on PATH, running the real compiler.
    assert _backend.use_jit_isa_flags() == _backend.AVX2_JIT_FLAGS
    monkeypatch.setenv("KALM_MLX_JIT_FLAGS", "-march=native")
    assert _backend.use_jit_isa_flags() == ("-march=native",)
    entries = os.environ["PATH"].split(os.pathsep)
    assert entries[1:] == [str(compiler.parent), "/usr/bin"]
    assert str(compiler) in Path(entries[0], "g++").read_text()


@linux
def test_use_jit_isa_flags_changes_nothing_when_off_or_without_a_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("KALM_MLX_JIT_FLAGS", "off")
    path = os.environ["PATH"]
    assert _backend.use_jit_isa_flags() == () and os.environ["PATH"] == path
    assert "KALM_MLX_JIT_FLAGS=off" in _backend.jit_flags_status
    monkeypatch.setenv("KALM_MLX_JIT_FLAGS", "-mavx2")
    monkeypatch.setenv("PATH", str(tmp_path))  # no g++ there
    assert _backend.use_jit_isa_flags() == () and os.environ["PATH"] == str(tmp_path)
    assert _backend.jit_flags_status == "none (no g++ on PATH)"
    monkeypatch.setenv("KALM_MLX_JIT_FLAGS", "-O0")
    with pytest.warns(UserWarning, match="is not a -m compiler flag"):
        assert _backend.use_jit_isa_flags() == ()
    assert not (tmp_path / "cache").exists()


_COMPILE_ONE_KERNEL = """
import sys
import kalm_mlx
from kalm_mlx import _backend
import mlx.core as mx
flags = _backend.use_jit_isa_flags()
f = mx.compile(lambda x: x * 3.0 + 1.25)
print(f(mx.array([1.0, 2.0])).tolist(), " ".join(flags))
"""


@linux
@pytest.mark.skipif(not _backend.cpu_compiler_available(), reason="needs g++ for MLX's CPU JIT")
@pytest.mark.skipif(not _backend.jit_isa_flags(), reason="no flags to add on this CPU")
def test_mlx_kernels_are_built_with_the_flags(tmp_path):
    """A real MLX compile in a child process (its own JIT cache in TMPDIR): the kernel's source is
    built through the wrapper, gives the right numbers, and its library holds AVX (VEX) code."""
    import shutil

    env = dict(os.environ, TMPDIR=str(tmp_path / "tmp"), XDG_CACHE_HOME=str(tmp_path / "cache"))
    env.pop("KALM_MLX_JIT_FLAGS", None)
    (tmp_path / "tmp").mkdir()
    done = subprocess.run([sys.executable, "-c", _COMPILE_ONE_KERNEL], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-5:] == ["[4.25,", "7.25]", "-mavx2", "-mfma", "-mf16c"]
    libraries = list((tmp_path / "tmp").glob("mlx/*/cpu/lib*.so"))
    assert libraries, "MLX built no kernel library"
    if shutil.which("objdump"):
        code = subprocess.run(["objdump", "-d", str(libraries[0])], capture_output=True, text=True).stdout
        assert "%ymm" in code
