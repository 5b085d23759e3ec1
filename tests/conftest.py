"""Shared fixtures: tiny random Qwen2 checkpoints, written once per test session."""

from __future__ import annotations

import pytest

import kalm_mlx  # noqa: F401  (BLAS set-up before mlx.core)
from tests.helpers import QWEN2_TOKENIZER, make_qwen2_checkpoint


@pytest.fixture
def offline_env(tmp_path, monkeypatch):
    """Offline, with empty Hugging Face and kalm-mlx caches under tmp_path (returned)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("KALM_MLX_HOME", str(tmp_path / "kalm-mlx"))
    return tmp_path


@pytest.fixture(scope="session")
def qwen2_gqa7(tmp_path_factory):
    """KaLM's attention shape: 14 query heads over 2 KV heads, head_dim 64. Returns (folder, torch model)."""
    folder = tmp_path_factory.mktemp("qwen2-gqa7")
    model = make_qwen2_checkpoint(folder, hidden=896, heads=14, kv_heads=2, intermediate=1024)
    return folder, model


@pytest.fixture(scope="session")
def qwen2_gqa2(tmp_path_factory):
    """4 query heads over 2 KV heads, head_dim 64. Returns (folder, torch model)."""
    folder = tmp_path_factory.mktemp("qwen2-gqa2")
    model = make_qwen2_checkpoint(folder, hidden=256, heads=4, kv_heads=2, intermediate=512, seed=1)
    return folder, model


@pytest.fixture(scope="session")
def qwen2_real_tokenizer(tmp_path_factory):
    """A narrow Qwen2 with the real Qwen2 tokenizer (full 151,646-token vocabulary)."""
    folder = tmp_path_factory.mktemp("qwen2-realtok")
    model = make_qwen2_checkpoint(
        folder, hidden=64, heads=2, kv_heads=1, intermediate=128, tokenizer=QWEN2_TOKENIZER, seed=2
    )
    return folder, model


@pytest.fixture(scope="session")
def small_model(qwen2_gqa2):
    """The 2:1 tiny model loaded in float32 (shared: do not mutate)."""
    return kalm_mlx.load(qwen2_gqa2[0])
