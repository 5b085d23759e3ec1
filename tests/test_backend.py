"""Backend set-up on Linux: OpenBLAS for MLX, its thread count, glibc's malloc thresholds."""

from __future__ import annotations

import sys

import pytest

from kalm_mlx import _backend

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


def test_without_openblas_there_is_no_thread_control(monkeypatch):
    monkeypatch.setattr(_backend, "_blas_handle", None)
    assert _backend.blas_threads() is None
    assert _backend.set_blas_threads(2) is False


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
