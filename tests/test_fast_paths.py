"""The CPU fast paths of the Qwen2 encoder compute what the plain formulas compute."""

from __future__ import annotations

import kalm_mlx
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
import numpy as np
import pytest

from kalm_mlx.embedder import (CPU_MAX_BATCH_TOKENS, DEFAULT_MAX_BATCH_TOKENS, default_max_batch_tokens,
                               default_parallel_streams)
from kalm_mlx.models.base import (
    MASKED_SCORE,
    cpu_attention,
    cpu_weight_layout,
    exp2_shifted,
    fast_cpu_paths,
    long_attention_length,
    swiglu,
)
from kalm_mlx.models.qwen2 import rope_tables


def exact_swiglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    g = gate.astype(np.float64)
    with np.errstate(over="ignore"):
        return g / (1 + np.exp(-g)) * up.astype(np.float64)


def test_swiglu_matches_silu_on_a_dense_grid():
    gate = np.linspace(-60, 60, 400_001, dtype=np.float32)
    up = np.random.default_rng(0).normal(size=gate.size).astype(np.float32)
    got = np.array(swiglu(mx.array(gate), mx.array(up)))
    error = np.abs(got - exact_swiglu(gate, up))
    assert got.dtype == np.float32
    # float32 rounding of g * u alone is ~6e-8 of it; the approximation adds ~1.5e-7.
    assert (error / (np.maximum(np.abs(gate), 1) * np.abs(up))).max() <= 2.5e-7


def test_swiglu_saturates_for_large_inputs():
    gate = np.array([25.0, 1e4, 3e38, -25.0, -1e4, -3e38], dtype=np.float32)
    up = np.full(gate.shape, 0.5, dtype=np.float32)
    got = np.array(swiglu(mx.array(gate), mx.array(up))).astype(np.float64)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got[:3], gate[:3] * 0.5, rtol=1e-6)
    assert np.all(np.abs(got[3:]) <= 2.5e-7 * np.abs(gate[3:]) * 0.5)


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_swiglu_half_precision_stays_finite(dtype):
    gate = mx.array(np.linspace(-60000, 60000, 10_001, dtype=np.float32)).astype(dtype)
    up = mx.ones(gate.shape, dtype=dtype)
    got = swiglu(gate, up)
    assert got.dtype == dtype
    values = np.array(got.astype(mx.float32)).astype(np.float64)
    expected = exact_swiglu(np.array(gate.astype(mx.float32)), np.ones(gate.shape))
    assert np.all(np.isfinite(values))
    assert (np.abs(values - expected) / np.maximum(np.abs(expected), 1)).max() <= 1e-2


def test_swiglu_propagates_nan():
    got = np.array(swiglu(mx.array([np.nan, 1.0]), mx.array([1.0, np.nan])))
    assert np.isnan(got).all()


def test_cpu_batches_are_small(small_model):
    previous = mx.default_device()
    try:
        mx.set_default_device(mx.cpu)
        streams = default_parallel_streams()
        assert streams in (1, 2)
        assert default_max_batch_tokens() == CPU_MAX_BATCH_TOKENS * streams < DEFAULT_MAX_BATCH_TOKENS
    finally:
        mx.set_default_device(previous)
    if previous == mx.cpu:
        assert small_model.max_batch_tokens == CPU_MAX_BATCH_TOKENS * small_model.parallel_streams


def test_the_cpu_fast_paths_set_up_the_jit_flags_first():
    from kalm_mlx import _backend

    if fast_cpu_paths():
        assert _backend.jit_flags_status != "not set up yet"


def test_exp2_shifted_matches_numpy_and_keeps_tiny_values_normal():
    x = np.concatenate([np.linspace(-70, 0, 700_001), [-1e9, -2.0**30]]).astype(np.float32)
    got = np.array(exp2_shifted(mx.array(x), mx.array(0.0))).astype(np.float64)
    expected = np.exp2(x.astype(np.float64))
    normal = x >= -60
    assert (np.abs(got[normal] - expected[normal]) / expected[normal]).max() <= 2e-7
    below = got[x < -61]
    assert np.all((below > 2.0**-61 * 0.999) & (below <= 2.0**-60))  # normal numbers, never subnormal
    nan = np.array(exp2_shifted(mx.array([np.nan, -1.0, 0.0], dtype=mx.float32), mx.array(0.0)))
    assert np.isnan(nan[0]) and nan[1:].tolist() == pytest.approx([0.5, 1.0], rel=2e-7)


def test_exp2_shifted_broadcasts_the_shift_along_either_axis():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(2, 3, 17, 40)).astype(np.float32) * 8
    for axis in (-1, -2):
        shift = scores.max(axis=axis, keepdims=True)
        got = np.array(exp2_shifted(mx.array(scores), mx.array(shift)))
        expected = np.exp2((scores - shift).astype(np.float64))  # the float32 difference, as computed
        keep = expected > 2.0**-60
        assert (np.abs(got - expected) / expected)[keep].max() <= 2e-7
        assert np.all(got[~keep] <= 2.0**-60)


def test_the_long_text_path_starts_at_a_length_proportional_to_the_head_size():
    assert long_attention_length(32) == 128 and long_attention_length(64) == 256
    assert long_attention_length(128) == 2 * long_attention_length(64)


@pytest.mark.parametrize("heads,kv_heads,length,dim", [
    (14, 2, 37, 64), (4, 4, 8, 64), (2, 1, 1, 64),
    (4, 2, long_attention_length(64), 64), (2, 2, long_attention_length(64) + 3, 64),  # the long-text path
    (12, 12, long_attention_length(32) - 1, 32), (12, 12, long_attention_length(32), 32),  # either side
])
def test_cpu_attention_matches_sdpa(heads, kv_heads, length, dim):
    rng = np.random.default_rng(heads + length)
    batch = 3
    queries = mx.array(rng.normal(size=(batch, heads, length, dim)).astype(np.float32) * 2)
    keys = mx.array(rng.normal(size=(batch, kv_heads, length, dim)).astype(np.float32) * 2)
    values = mx.array(rng.normal(size=(batch, kv_heads, length, dim)).astype(np.float32))
    keep = np.ones((batch, 1, 1, length), dtype=bool)
    keep[1, ..., (length + 1) // 2:] = False
    mask = mx.where(mx.array(keep), 0.0, MASKED_SCORE)
    scale = dim**-0.5
    for key_mask in (mask, None):
        got = np.array(cpu_attention(queries, keys, values, scale, key_mask))
        expected = np.array(mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale,
                                                                  mask=key_mask))
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= 2e-5


def test_rope_tables_match_transformers():
    import torch
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    config = Qwen2Config(hidden_size=896, num_attention_heads=14, rope_theta=1_000_000.0)
    cos, sin = Qwen2RotaryEmbedding(config)(torch.zeros(1), torch.arange(512)[None])
    my_cos, my_sin = (np.array(t) for t in rope_tables(512, 64, 1_000_000.0))
    # Within an ulp of transformers; the sin table carries rotate_half's sign.
    np.testing.assert_allclose(my_cos.reshape(512, 64), cos[0].numpy(), rtol=0, atol=1.2e-7)
    np.testing.assert_allclose(my_sin[:, 0], -sin[0, :, :32].numpy(), rtol=0, atol=1.2e-7)
    np.testing.assert_allclose(my_sin[:, 1], sin[0, :, 32:].numpy(), rtol=0, atol=1.2e-7)


def test_runs_without_a_compiler(qwen2_gqa2, tmp_path):
    """With no g++ on PATH (mx.compile on the CPU would exit the process), the plain paths run."""
    import os
    import subprocess
    import sys

    # The interpreter itself (a symlink to a venv's python leaves the venv) with a PATH holding no g++.
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    folder, _ = qwen2_gqa2
    script = (
        "import sys, numpy as np, kalm_mlx\n"
        "from kalm_mlx._backend import cpu_compiler_available\n"
        "assert not cpu_compiler_available()\n"
        f"np.save(sys.argv[1], kalm_mlx.load({str(folder)!r}).encode(['Hello world', 'a b c d e f']))\n"
    )
    out = tmp_path / "vectors.npy"
    env = {**os.environ, "PATH": str(empty_bin)}
    result = subprocess.run([sys.executable, "-c", script, str(out)], env=env,
                            capture_output=True, text=True, timeout=300, cwd=os.getcwd())
    assert result.returncode == 0, result.stderr
    plain = np.load(out)
    fast = kalm_mlx.load(folder).encode(["Hello world", "a b c d e f"])
    assert np.abs(plain - fast).max() <= 1e-5


def exact_gelu(x: np.ndarray) -> np.ndarray:
    from math import erf

    x64 = x.astype(np.float64)
    return 0.5 * x64 * (1 + np.vectorize(erf)(x64 / np.sqrt(2)))


def test_gelu_matches_the_erf_gelu_on_a_dense_grid():
    from kalm_mlx.models.base import gelu

    x = np.linspace(-40, 40, 200_001, dtype=np.float32)
    got = np.array(gelu(mx.array(x)))
    assert got.dtype == np.float32
    # nn.gelu is within 1.7e-7 of it, torch within 3.5e-7; the rational erf adds ~3e-8.
    assert (np.abs(got - exact_gelu(x)) / np.maximum(np.abs(x), 1)).max() <= 2.5e-7


def test_gelu_saturates_and_propagates_nan():
    from kalm_mlx.models.base import gelu

    x = np.array([10.0, 1e4, 3e38, -10.0, -1e4, -3e38, np.nan], dtype=np.float32)
    got = np.array(gelu(mx.array(x)))
    np.testing.assert_allclose(got[:3], x[:3], rtol=1e-7)
    assert np.all(np.abs(got[3:6]) <= 2.5e-7 * np.abs(x[3:6])) and np.isnan(got[6])


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_gelu_half_precision(dtype):
    from kalm_mlx.models.base import gelu

    x = np.linspace(-60000, 60000, 10_001, dtype=np.float32)
    got = gelu(mx.array(x).astype(dtype))
    assert got.dtype == dtype
    values = np.array(got.astype(mx.float32)).astype(np.float64)
    rounded = np.array(mx.array(x).astype(dtype).astype(mx.float32))
    assert np.all(np.isfinite(values))
    assert (np.abs(values - exact_gelu(rounded)) / np.maximum(np.abs(rounded), 1)).max() <= 1e-2


def test_gelu_falls_back_to_nn_gelu_without_fast_paths(monkeypatch):
    import mlx.nn as nn

    from kalm_mlx.models import base

    x = mx.array(np.linspace(-5, 5, 101, dtype=np.float32))
    monkeypatch.setattr(base, "fast_cpu_paths", lambda: False)
    assert mx.array_equal(base.gelu(x), nn.gelu(x))


def test_additive_key_mask_fill():
    from kalm_mlx.models.base import additive_key_mask

    mask = mx.array([[1, 1, 0]])
    finite = np.array(additive_key_mask(mask, mx.float32, MASKED_SCORE))
    assert finite.shape == (1, 1, 1, 3) and finite[0, 0, 0].tolist() == [0.0, 0.0, MASKED_SCORE]
    assert np.isneginf(np.array(additive_key_mask(mask, mx.float32))[0, 0, 0, 2])
    assert additive_key_mask(None, mx.float32) is None


def test_padding_key_mask_and_attention_pick_the_path(monkeypatch):
    from kalm_mlx.models import base

    if not base.fast_cpu_paths():
        pytest.skip("no C++ compiler for MLX's CPU kernels: only the plain path exists")
    keep = mx.array([[1, 1, 0]])
    rng = np.random.default_rng(3)
    queries, keys, values = (mx.array(rng.normal(size=(1, 2, 3, 8)).astype(np.float32)) for _ in range(3))
    finite = base.padding_key_mask(keep, mx.float32)
    assert np.array(finite)[0, 0, 0].tolist() == [0.0, 0.0, MASKED_SCORE]
    assert base.padding_key_mask(None, mx.float32) is None
    fast = np.array(base.attention(queries, keys, values, 0.3, finite))
    monkeypatch.setattr(base, "fast_cpu_paths", lambda: False)
    plain_mask = base.padding_key_mask(keep, mx.float32)
    assert np.isneginf(np.array(plain_mask)[0, 0, 0, 2])
    plain = np.array(base.attention(queries, keys, values, 0.3, plain_mask))
    expected = np.array(mx.fast.scaled_dot_product_attention(queries, keys, values, scale=0.3, mask=plain_mask))
    assert np.array_equal(plain, expected)
    assert np.abs(fast - expected).max() <= 2e-6


def test_linear_adds_its_bias_after_the_matmul_as_nn_linear_does():
    from kalm_mlx.models.base import Linear

    layer = Linear(64, 40, bias=True)
    x = mx.random.normal((3, 5, 64), key=mx.random.key(0))
    expected = mx.addmm(layer.bias, x, layer.weight.T)
    assert np.abs(np.array(layer(x)) - np.array(expected)).max() <= 1e-5
    assert set(dict(tree_flatten(layer.parameters()))) == {"weight", "bias"}  # checkpoints load unchanged
    no_bias = Linear(64, 40, bias=False)
    assert np.abs(np.array(no_bias(x)) - np.array(x @ no_bias.weight.T)).max() == 0
    model = nn.Sequential(layer)
    nn.quantize(model, group_size=32, bits=8)
    assert isinstance(model.layers[0], nn.QuantizedLinear)


def test_row_means_is_each_rows_mean_as_a_column():
    from kalm_mlx.models.base import row_means

    rows = np.random.default_rng(5).normal(size=(7, 384)).astype(np.float32) + 20
    got = np.array(row_means(mx.array(rows)))
    assert got.shape == (7, 1)
    assert np.abs(got[:, 0] - rows.astype(np.float64).mean(axis=1)).max() <= 2e-5


def _layer_norm_float64(x: np.ndarray, weight, bias, eps: float) -> np.ndarray:
    x = x.astype(np.float64)
    centred = x - x.mean(axis=-1, keepdims=True)
    out = centred / np.sqrt((centred**2).mean(axis=-1, keepdims=True) + eps)
    return out * weight + bias


@pytest.mark.parametrize("shape", [(5, 384), (2, 3, 768), (1, 1, 96)])
def test_layer_norm_matches_float64_and_nn_layer_norm(shape):
    from kalm_mlx.models.base import LayerNorm

    rng = np.random.default_rng(shape[-1])
    norm = LayerNorm(shape[-1], eps=1e-12)
    norm.weight = mx.array(rng.normal(size=shape[-1]).astype(np.float32))
    norm.bias = mx.array(rng.normal(size=shape[-1]).astype(np.float32))
    x = (rng.normal(size=shape) * 3 + 5).astype(np.float32)  # rows far from zero mean
    got = np.array(norm(mx.array(x)))
    expected = _layer_norm_float64(x, np.array(norm.weight), np.array(norm.bias), 1e-12)
    assert got.shape == shape
    assert np.abs(got - expected).max() <= 1e-5 * max(1.0, np.abs(expected).max())
    plain = np.array(nn.LayerNorm.__call__(norm, mx.array(x)))
    assert np.abs(got - plain).max() <= 1e-5 * max(1.0, np.abs(expected).max())
    assert set(dict(tree_flatten(norm.parameters()))) == {"weight", "bias"}  # checkpoints load unchanged


def test_layer_norm_without_affine_and_outside_the_fast_paths(monkeypatch):
    from kalm_mlx.models import base

    x = mx.array(np.random.default_rng(2).normal(size=(4, 64)).astype(np.float32))
    bare = base.LayerNorm(64, eps=1e-5, affine=False)
    expected = _layer_norm_float64(np.array(x), 1.0, 0.0, 1e-5)
    assert np.abs(np.array(bare(x)) - expected).max() <= 1e-5
    half = base.LayerNorm(64)
    half.set_dtype(mx.float16)
    x16 = x.astype(mx.float16)
    assert mx.array_equal(half(x16), nn.LayerNorm.__call__(half, x16))  # other dtypes: nn.LayerNorm itself
    monkeypatch.setattr(base, "fast_cpu_paths", lambda: False)
    norm = base.LayerNorm(64)
    assert mx.array_equal(norm(x), nn.LayerNorm.__call__(norm, x))


def test_rms_norm_matches_float64_and_nn_rms_norm(monkeypatch):
    from kalm_mlx.models import base

    rng = np.random.default_rng(8)
    norm = base.RMSNorm(896, eps=1e-6)
    norm.weight = mx.array(rng.normal(size=896).astype(np.float32))
    x = rng.normal(size=(2, 5, 896)).astype(np.float32) * 4
    x64 = x.astype(np.float64)
    expected = x64 / np.sqrt((x64**2).mean(axis=-1, keepdims=True) + 1e-6) * np.array(norm.weight)
    got = np.array(norm(mx.array(x)))
    assert got.shape == x.shape and np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()
    assert set(dict(tree_flatten(norm.parameters()))) == {"weight"}
    monkeypatch.setattr(base, "fast_cpu_paths", lambda: False)
    assert mx.array_equal(norm(mx.array(x)), nn.RMSNorm.__call__(norm, mx.array(x)))


def test_cpu_attention_writes_its_output_token_major():
    # The division writes (B, L, H, D) rows, so the callers' transpose back to tokens is free:
    # the (B, H, L, D) result is a transposed view of a contiguous array.
    rng = np.random.default_rng(0)
    for length in (6, long_attention_length(16)):  # both paths
        queries, keys, values = (mx.array(rng.normal(size=(2, 4, length, 16)).astype(np.float32))
                                 for _ in range(3))
        out = cpu_attention(queries, keys, values, 0.25, None)
        mx.eval(out)
        assert out.shape == (2, 4, length, 16)
        assert memoryview(out).strides == (4 * length * 4 * 16, 4 * 16, 4 * 4 * 16, 4)


def test_cpu_weight_layout_stores_4kib_rows_column_major_and_keeps_the_values():
    from kalm_mlx.models.base import Linear

    model = nn.Sequential(Linear(1024, 8), Linear(8, 24), nn.Linear(2048, 4, bias=False),
                          nn.Linear(4096, 4), Linear(512, 4))
    model.layers[4].set_dtype(mx.float16)  # 512 float16 = 1 KiB rows: left as they are
    # Quantized: 4 KiB rows of packed uint32, not a float weight: left as they are.
    nn.quantize(model, group_size=32, bits=8, class_predicate=lambda path, _: path == "layers.3")
    assert isinstance(model.layers[3], nn.QuantizedLinear)
    before = {name: np.array(value) for name, value in tree_flatten(model.parameters())}
    x = mx.random.normal((3, 1024), key=mx.random.key(1))
    expected = np.array(model.layers[0](x))
    assert sorted(cpu_weight_layout(model)) == ["layers.0", "layers.2"]
    after = dict(tree_flatten(model.parameters()))
    assert set(after) == set(before)
    for name, value in after.items():
        assert np.array_equal(np.array(value), before[name]), name
    assert memoryview(model.layers[0].weight).strides == (4, 32)  # (8, 1024): column-major
    assert memoryview(model.layers[2].weight).strides == (4, 16)
    assert memoryview(model.layers[1].weight).strides == (32, 4)
    assert np.abs(np.array(model.layers[0](x)) - expected).max() <= 1e-5


def test_packed_tokens_pack_and_pad_the_real_rows():
    from kalm_mlx.models.base import PackedTokens, first_rows, pack_rows, pad_rows

    keep = mx.array([[1, 1, 1], [1, 0, 0], [1, 1, 0]], dtype=mx.bool_)
    padded = mx.arange(3 * 3 * 2, dtype=mx.float32).reshape(3, 3, 2)
    packed = PackedTokens(keep)
    assert packed.count == 6
    rows = np.array(packed.pack(padded))
    assert rows.tolist() == [[0, 1], [2, 3], [4, 5], [6, 7], [12, 13], [14, 15]]
    back = np.array(packed.pad(mx.array(rows)))
    assert back.shape == (3, 3, 2)
    assert np.array_equal(back[np.array(keep)], rows)
    assert np.array_equal(back[1, 1], rows[0])  # padding slots hold the first real row: finite
    assert pack_rows(None, padded) is padded and pad_rows(None, padded) is padded
    # Each text's first token: rows 0, 3 and 4 of the packed tokens, column 0 of the padded grid.
    assert np.array(first_rows(packed, mx.array(rows))).tolist() == [[[0, 1]], [[6, 7]], [[12, 13]]]
    assert np.array_equal(np.array(first_rows(None, padded)), np.array(padded)[:, :1])


def test_packed_tokens_only_for_padded_float32_batches_on_the_cpu_fast_paths(monkeypatch):
    from kalm_mlx.models import base

    padded = mx.array([[1, 1], [1, 0]], dtype=mx.bool_)
    if fast_cpu_paths():
        assert base.packed_tokens(padded, mx.float32) is not None
    assert base.packed_tokens(padded, mx.float16) is None
    assert base.packed_tokens(mx.ones((2, 2), dtype=mx.bool_), mx.float32) is None  # nothing to drop
    assert base.packed_tokens(None, mx.float32) is None
    monkeypatch.setattr(base, "fast_cpu_paths", lambda: False)
    assert base.packed_tokens(padded, mx.float32) is None


@pytest.mark.skipif(not fast_cpu_paths(), reason="packing runs with the CPU fast paths only")
def test_every_family_gives_the_same_vectors_packed_and_padded(tmp_path, monkeypatch):
    """A padded batch through each family with its real tokens packed, against the same batch
    kept padded: the token-wise layers compute each row alone, so the vectors agree."""
    from kalm_mlx.models import base, bert, nomic_bert, qwen2
    from tests.helpers import make_qwen2_checkpoint
    from tests.test_bert import make_bert_checkpoint
    from tests.test_nomic import V15_CONFIG, write_nomic_checkpoint

    make_bert_checkpoint(tmp_path / "bert")
    write_nomic_checkpoint(tmp_path / "nomic", V15_CONFIG)
    make_qwen2_checkpoint(tmp_path / "qwen2")
    texts = ["short", "a somewhat longer text, with a few more words in it than the others", "a text of middle length"]
    for family, module in (("bert", bert), ("nomic", nomic_bert), ("qwen2", qwen2)):
        model = kalm_mlx.load(tmp_path / family, dtype="float32")
        model.parallel_streams = 1  # one padded batch of three lengths
        calls = []
        real = base.packed_tokens
        monkeypatch.setattr(module, "packed_tokens", lambda *a: calls.append(real(*a)) or calls[-1])
        packed = model.encode(texts, batch_size=3)
        assert calls and calls[0] is not None and calls[0].count < calls[0].batch * calls[0].length, family
        monkeypatch.setattr(module, "packed_tokens", lambda *a: None)
        padded = model.encode(texts, batch_size=3)
        assert np.abs(packed - padded).max() <= 1e-6, family
