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
