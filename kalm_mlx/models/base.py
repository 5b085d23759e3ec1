"""Pieces shared by every encoder family: weight checks, prefixes, key masks, and the CPU fast paths
(compiled rational GELU and SwiGLU, an exp2 softmax attention) behind :func:`fast_cpu_paths`."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from .._backend import cpu_compiler_available


def check_weights(model: nn.Module, weights: dict[str, mx.array], source: str) -> None:
    """Raise ValueError unless ``weights`` holds exactly the model's tensors with the right shapes.

    ``source`` names where the weights came from (a file or folder) for the message.
    """
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"{source}: missing tensor '{missing[0]}'{more}")
    unexpected = sorted(set(weights) - set(expected))
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise ValueError(f"{source}: unexpected tensor '{unexpected[0]}'{more}")
    for name, param in expected.items():
        if tuple(weights[name].shape) != tuple(param.shape):
            raise ValueError(
                f"{source}: tensor '{name}' has shape {tuple(weights[name].shape)}, "
                f"the config implies {tuple(param.shape)}"
            )


def strip_prefix(weights: dict[str, mx.array], prefixes: tuple[str, ...]) -> dict[str, mx.array]:
    """Remove the first matching prefix (such as ``model.``) from every tensor name."""
    out = {}
    for name, value in weights.items():
        for prefix in prefixes:
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        out[name] = value
    return out


def additive_key_mask(attention_mask: mx.array | None, dtype: mx.Dtype,
                      fill: float = float("-inf")) -> mx.array | None:
    """Turn a (B, L) 0/1 mask into an additive (B, 1, 1, L) key mask in ``dtype``.

    Padding keys get ``fill`` (a finite one for the CPU softmax of :func:`cpu_attention`).
    The mask broadcasts over heads and queries; it is built in the activation dtype
    because ``mx.fast.scaled_dot_product_attention`` refuses a float32 mask with
    float16 queries.
    """
    if attention_mask is None:
        return None
    keep = attention_mask.astype(mx.bool_)[:, None, None, :]
    return mx.where(keep, 0.0, fill).astype(dtype)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same quantization) whose bias is added after the matmul on the CPU.

    MLX's CPU ``addmm`` broadcast-copies the bias into the output before the GEMM, which
    made a layer 2-6 % slower than the matmul followed by an add done in place (MiniLM's
    mixed corpus: 1.02x end to end). On a GPU ``addmm`` is fused, and stays.
    """

    def __call__(self, x: mx.array) -> mx.array:
        if "bias" in self and mx.default_device() == mx.cpu:
            return x @ self["weight"].T + self["bias"]
        return super().__call__(x)


_mean_columns: dict[tuple[int, mx.Dtype], mx.array] = {}


def row_means(x: mx.array) -> mx.array:
    """The mean over the last axis, kept as an axis of size 1 (``x.mean(-1, keepdims=True)``):
    one matrix-vector product over the rows.

    MLX's CPU reductions over the contiguous axis run at about a third of memory speed
    (a sum over 1024 x 384 float32 values: 0.47 ms); OpenBLAS's product with a column of
    ``1 / width`` reads the rows at full speed (0.30 ms), as accurately.
    """
    width = x.shape[-1]
    key = (width, x.dtype)
    column = _mean_columns.get(key)
    if column is None:
        column = mx.full((width, 1), 1.0 / width, dtype=x.dtype)
        mx.eval(column)
        _mean_columns[key] = column
    return (x.reshape(-1, width) @ column).reshape(*x.shape[:-1], 1)


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` (same parameters) whose row statistics are matrix-vector products on the CPU.

    On the CPU backend ``mx.fast.layer_norm`` falls back to separate ops, two of them
    reductions over the contiguous axis; here both statistics come from :func:`row_means`:
    the mean of the rows, then the mean of the centred rows' squares (two passes, as the
    fallback, so no cancellation). 1024 x 384 float32 rows: 0.77 ms against 1.71, and 2.2e-6
    from float64 where the fallback is 3.4e-6 off (normal rows, a random affine). Elsewhere,
    and for other dtypes, ``nn.LayerNorm`` itself. The same steps fused with ``mx.compile`` (with
    the residual and bias adds before them) took 1.7-1.8x as long on AMD Zen 3: a compiled CPU
    kernel with a broadcast input (the row statistics, the affine) runs MLX's strided loop.
    """

    def __call__(self, x: mx.array) -> mx.array:
        if not float32_fast_paths(x.dtype):
            return super().__call__(x)
        centred = x - row_means(x)
        out = centred * mx.rsqrt(row_means(mx.square(centred)) + self.eps)
        if "weight" in self:
            out = out * self.weight
        if "bias" in self:
            out = out + self.bias
        return out


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` (same parameters) whose mean square is a matrix-vector product on the CPU.

    The same change as :class:`LayerNorm` for the one reduction of ``mx.fast.rms_norm``'s CPU
    fallback: 1024 x 896 float32 rows 1.85 ms against 2.29, 2.3e-6 from float64 against 5.6e-6.
    Elsewhere, and for other dtypes, ``nn.RMSNorm`` itself.
    """

    def __call__(self, x: mx.array) -> mx.array:
        if not float32_fast_paths(x.dtype):
            return super().__call__(x)
        return x * mx.rsqrt(row_means(mx.square(x)) + self.eps) * self.weight


_ALIASING_ROW_BYTES = 4096


def cpu_weight_layout(model: nn.Module) -> list[str]:
    """Store, column-major, the float Linear weights whose rows are a multiple of 4 KiB; returns their paths.

    ``x @ W.T`` with ``W`` (out, in) row-major has OpenBLAS pack ``W`` by reading it across rows;
    when a row is a multiple of 4 KiB long those reads alias in the CPU caches, and few-row
    products ran 1.4-2.1x slower than on the same weight stored column-major (AMD Zen 4, 16
    rows: bge-base's 3072-wide output projection 1.5 ms against 1.0; from 256 rows on, the
    same speed). Other widths gain nothing, or lose. The weight keeps its shape, values and
    dtype: it becomes the transposed view of a contiguous (in, out) copy, so ``x @ W.T`` reads
    that copy as it lies. Made for the CPU device; harmless on a GPU.
    """
    changed = []
    for path, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        weight = module.weight
        if not mx.issubdtype(weight.dtype, mx.floating) or weight.shape[1] * weight.dtype.size % _ALIASING_ROW_BYTES:
            continue
        module.weight = mx.contiguous(weight.T).T
        mx.eval(module.weight)  # one layer at a time: the row-major copy is freed at once
        changed.append(path)
    return changed


def fast_cpu_paths() -> bool:
    """True when compiled CPU fast paths run: CPU device and a C++ compiler for MLX."""
    return mx.default_device() == mx.cpu and cpu_compiler_available()


def float32_fast_paths(dtype: mx.Dtype) -> bool:
    """True when the float32-only CPU paths (attention, norms, packed tokens) run for ``dtype``."""
    return dtype == mx.float32 and fast_cpu_paths()


# MLX's CPU backend evaluates erf one element at a time (about 30 M/s): the exact GELU
# took half of a MiniLM layer. erf(z) ~ z P(z^2) / Q(z^2) on |z| <= 4 (beyond, erf is
# +-1 in float32), degree 5 each, Q(0) = 1, max abs error 2.1e-8 in float64; see
# `python -m benchmarks.fit_approximations`. Rewritten for z = x / sqrt(2) in powers of
# t = x^2: _GELU_NUM[k] = P[k] / (sqrt(2) * 2^k), _GELU_DEN[k] = Q[k] / 2^k.
_ERF_P = (1.1283789764303598, 0.19625078038413776, 0.0534677719469457, 0.004003738112339333,
          0.0002880458019502369, 1.9748455348846534e-06)
_ERF_Q = (1.0, 0.5072538843708366, 0.11647722091000115, 0.015444605520075524,
          0.001216386577160025, 3.748125442920167e-05)
_GELU_NUM = tuple(p / (math.sqrt(2) * 2**k) for k, p in enumerate(_ERF_P))
_GELU_DEN = tuple(q / 2**k for k, q in enumerate(_ERF_Q))
_GELU_CLIP = 4 * math.sqrt(2)


@mx.compile
def _clip_for_gelu(x: mx.array) -> mx.array:
    return mx.clip(x.astype(mx.float32), -_GELU_CLIP, _GELU_CLIP)


@mx.compile
def _gelu_from_clipped(x: mx.array, c: mx.array) -> mx.array:
    # c = clip(x) comes from its own kernel (minimum/maximum keep a compiled loop scalar;
    # this one vectorizes without them). Float32 inside; Estrin's scheme keeps the graph
    # shallow enough for MLX to fuse all of it into one kernel.
    t = c * c
    t2 = t * t
    t4 = t2 * t2
    p, q = _GELU_NUM, _GELU_DEN
    num = (p[0] + p[1] * t) + t2 * (p[2] + p[3] * t) + t4 * (p[4] + p[5] * t)
    den = (q[0] + q[1] * t) + t2 * (q[2] + q[3] * t) + t4 * (q[4] + q[5] * t)
    h = 0.5 * x.astype(mx.float32)
    return (h + h * (c * num / den)).astype(x.dtype)


def gelu(x: mx.array) -> mx.array:
    """The exact (erf) GELU, ``x * (1 + erf(x / sqrt(2))) / 2``, as Hugging Face's ``"gelu"``.

    On the CPU with a compiler: two compiled kernels from the rational erf above (a clip,
    then the rest, which vectorizes), about 18x faster than ``nn.gelu`` and within
    2e-7 * max(|x|, 1) of the exact value (``nn.gelu``: 1.7e-7, torch: 3.5e-7).
    Elsewhere ``nn.gelu``.
    """
    if fast_cpu_paths():
        return _gelu_from_clipped(x, _clip_for_gelu(x))
    return nn.gelu(x)


# --- Qwen2's SwiGLU and the exp2 softmax attention (used by every family on the CPU) -------

# MLX's CPU backend evaluates exp one element at a time (about 60 M/s), which made the
# SwiGLU activation and the attention softmax a third of this encoder's time. The fast
# paths below use only multiply, add, divide and integer ops, which the C++ compiler
# behind mx.compile vectorizes; `python -m benchmarks.fit_approximations` prints the
# coefficients and explains the fits.
# tanh(x) ~ x * P(x^2) / Q(x^2) on |x| <= 9 (beyond, tanh is 1 in float32), P(0) = Q(0) = 1,
# max abs error 2e-8 in float64. Rewritten below for silu(g) * u = h + h * tanh(g / 2)
# with h = g * u / 2, in powers of t = g^2: _SILU_NUM[k] = P[k] / (2 * 4^k), _SILU_DEN[k] = Q[k] / 4^k.
_TANH_P = (1.0, 0.1338033348464446, 0.003494777239618474, 2.059639317701987e-05,
           1.3338481846575577e-08)
_TANH_Q = (1.0, 0.46713650911332033, 0.02587386386232405, 0.000328433537487109,
           7.769632935510917e-07)
_SILU_NUM = tuple(p / (2 * 4**k) for k, p in enumerate(_TANH_P))
_SILU_DEN = tuple(q / 4**k for k, q in enumerate(_TANH_Q))
_SILU_CLIP = 18.0
# 2^r ~ _EXP2_POLY(r) on |r| <= 1/2, max relative error 1.9e-9 in float64.
_EXP2_POLY = (1.0000000005536407, 0.6931472057107597, 0.2402264689207387, 0.05550328831931149,
              0.009618489028715845, 0.0013399909805402034, 0.00015345737063210925)
_LOG2E = 1.4426950408889634
MASKED_SCORE = -1e9
"""Additive score of a padding key: finite, for the CPU softmax's integer exponent (:func:`exp2_shifted`)."""


@mx.compile
def _clip_for_silu(gate: mx.array) -> mx.array:
    return mx.clip(gate.astype(mx.float32), -_SILU_CLIP, _SILU_CLIP)


@mx.compile
def _swiglu_from_clipped(gate: mx.array, up: mx.array, s: mx.array) -> mx.array:
    # s = clip(gate) comes from its own kernel: minimum/maximum check for NaN, which keeps
    # a compiled loop scalar, and this one vectorizes without them. Float32 inside (t^2
    # would overflow float16). Estrin's scheme keeps the graph shallow enough (MLX fuses
    # at most 11 ops deep) for all of it to compile into one kernel.
    t = s * s
    t2 = t * t
    p, q = _SILU_NUM, _SILU_DEN
    num = (p[0] + p[1] * t) + t2 * ((p[2] + p[3] * t) + p[4] * t2)
    den = (q[0] + q[1] * t) + t2 * ((q[2] + q[3] * t) + q[4] * t2)
    h = (0.5 * gate.astype(mx.float32)) * up.astype(mx.float32)
    return (h + h * (s * num / den)).astype(gate.dtype)


def _swiglu_rational(gate: mx.array, up: mx.array) -> mx.array:
    return _swiglu_from_clipped(gate, up, _clip_for_silu(gate))


@mx.compile
def _swiglu_exact(gate: mx.array, up: mx.array) -> mx.array:
    return nn.silu(gate) * up


def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """``silu(gate) * up``, the SwiGLU activation.

    On the CPU, from the rational tanh above: two compiled kernels (a clip, then the rest,
    which vectorizes), about 6x faster than the exp-based form and within
    2.2e-7 * max(|gate|, 1) * |up| of the exact value (the exp-based form: 1.2e-7).
    On a GPU, the exact form, compiled; on a CPU without a compiler, the exact form.
    """
    if fast_cpu_paths():
        return _swiglu_rational(gate, up)
    if mx.default_device() == mx.gpu:
        return _swiglu_exact(gate, up)
    return nn.silu(gate) * up


# 2^r on |r| <= 1/2 scaled by 2^-1/2, for r = x - trunc(x) + 1/2 (see exp2_shifted).
_EXP2_HALF_POLY = tuple(a * 2**-0.5 for a in _EXP2_POLY)
_EXP2_LOWEST_EXPONENT = -60
_FLOAT32_EXPONENT_BITS = 0x7F800000


@mx.compile
def _exp2_shifted_fraction(scores: mx.array, shift: mx.array) -> tuple[mx.array, mx.array]:
    # x = scores - shift <= 0 as n + f with n = trunc(x), an integer, and f in (-1, 0]: returns
    # 2^f (in (1/2, 1]) and n, as float32. Float ops only: where `shift` broadcasts this kernel
    # takes MLX's strided loop, which vectorizes only without integer ops. Estrin's scheme.
    x = scores - shift
    n = x.astype(mx.int32).astype(mx.float32)
    r = (x - n) + 0.5
    r2 = r * r
    r4 = r2 * r2
    a = _EXP2_HALF_POLY
    return ((a[0] + a[1] * r) + r2 * (a[2] + a[3] * r)) + r4 * ((a[4] + a[5] * r) + a[6] * r2), n


@mx.compile
def _exp2_scaled_bits(fraction_bits: mx.array, n: mx.array) -> mx.array:
    # 2^n * 2^f: n added to the float32 exponent of 2^f, n below -60 counted as -60 (so the result
    # stays a normal number: subnormals are slow on x86). A NaN fraction (from a NaN or infinite
    # x) keeps its bits: all of its exponent bits are set.
    finite = mx.bitwise_and(fraction_bits, _FLOAT32_EXPONENT_BITS) != _FLOAT32_EXPONENT_BITS
    exponent = mx.maximum(n.astype(mx.int32), _EXP2_LOWEST_EXPONENT) * finite
    return fraction_bits + exponent * (1 << 23)


def exp2_shifted(scores: mx.array, shift: mx.array) -> mx.array:
    """``2 ** (scores - shift)`` for float32 ``scores <= shift`` (``shift`` broadcasts, as a row maximum).

    Within 2e-7 relative down to ``2 ** -60``; below that the result is between ``2 ** -61`` and
    ``2 ** -60`` rather than the true value (nothing next to a softmax row's largest weight, 1,
    and never a subnormal number). NaN and infinite differences give NaN. Two compiled kernels that vectorize: the
    fraction, then its exponent set by integer addition; about 4x faster than ``mx.exp`` of the
    difference on the CPU backend. ``scores - shift`` must be at least -2^31.
    """
    fraction, n = _exp2_shifted_fraction(scores, shift)
    return _exp2_scaled_bits(fraction.view(mx.int32), n).view(mx.float32)


LONG_ATTENTION_TOKENS_PER_HEAD_DIM = 4
"""From ``this x head_dim`` tokens on, :func:`cpu_attention` takes its long-text path."""


def long_attention_length(head_dim: int) -> int:
    """Text length from which :func:`cpu_attention` takes its long-text path, for ``head_dim``.

    That path saves passes over the (L x L) scores and pays extra copies of the (L x head_dim)
    queries, keys and values, so it pays off from a length proportional to the head size.
    Measured on one core (AMD Zen 5, OpenBLAS): at head size 32 it wins from about 96 tokens
    (1.15-1.3x at 128), at 64 from about 160 (1.1x); hence 128 for MiniLM, 256 for KaLM and bge-base.
    On AMD Zen 3 (AVX2 only) the long path alone is slower below 512 tokens (head size 32: 0.86x
    at 128, 0.97x at 256, 1.04x at 512), yet a threshold of 16 x head_dim changed MiniLM's
    mixed corpus and fixed 128 / 256 / 512-token batches by no more than the noise (0.98-1.01x),
    so one threshold serves both.
    """
    return LONG_ATTENTION_TOKENS_PER_HEAD_DIM * head_dim


def cpu_attention(queries: mx.array, keys: mx.array, values: mx.array, scale: float,
                  mask: mx.array | None) -> mx.array:
    """Softmax attention for float32 on the CPU, as ``mx.fast.scaled_dot_product_attention``.

    queries (B, H, L, D), keys and values (B, KV, L, D) with H a multiple of KV, ``mask``
    additive and finite ((B, 1, 1, L), :data:`MASKED_SCORE` on padding keys) or None.
    MLX's CPU sdpa calls ``exp`` one element at a time; here the softmax uses
    :func:`exp2_shifted` on scores in base-2 units, computed transposed (keys by queries),
    and the queries sharing a key/value head are stacked along the length, so
    each product is one batched matmul (no repeated keys). Texts of
    :func:`long_attention_length` tokens or more take a path with fewer passes over the
    (L x L) scores (see :func:`_long_attention`); below that its extra ops cost more
    than they save.
    """
    batch, n_heads, length, head_dim = queries.shape
    n_kv_heads = keys.shape[1]
    grouped = (queries * (scale * _LOG2E)).reshape(
        batch, n_kv_heads, (n_heads // n_kv_heads) * length, head_dim
    )
    if length >= long_attention_length(head_dim):
        weighted, sums = _long_attention(grouped, keys, values, mask)
    else:
        weighted, sums = _short_attention(grouped, keys, values, mask)

    def by_token(x: mx.array) -> mx.array:  # (B, KV, G x L, n) -> a (B, L, H, n) view
        return x.reshape(batch, n_heads, length, -1).transpose(0, 2, 1, 3)

    # The division reads both as (B, L, H, .) views and writes (B, L, H, D) contiguous, so the
    # caller's transpose back to tokens by heads costs no copy (a separate copy pass before).
    return (by_token(weighted) / by_token(sums)).transpose(0, 2, 1, 3)


def _short_attention(grouped: mx.array, keys: mx.array, values: mx.array,
                     mask: mx.array | None) -> tuple[mx.array, mx.array]:
    # Returns the unnormalised weighted values and the softmax row sums (see cpu_attention).
    # Scores transposed (keys by queries), as in _long_attention: the max reduces over rows,
    # which MLX's CPU reductions do faster than over the contiguous axis, and the max then
    # broadcasts along rows, where exp2_shifted's strided kernel vectorizes (a row-wise
    # broadcast, stride 0 in the inner loop, does not).
    batch, _, length, _ = keys.shape
    scores_t = keys @ grouped.swapaxes(-1, -2)
    if mask is not None:
        scores_t = scores_t + mask.reshape(batch, 1, length, 1)
    weights_t = exp2_shifted(scores_t, scores_t.max(axis=-2, keepdims=True))
    return weights_t.swapaxes(-1, -2) @ values, weights_t.sum(axis=-2)[..., None]


def _long_attention(grouped: mx.array, keys: mx.array, values: mx.array,
                    mask: mx.array | None) -> tuple[mx.array, mx.array]:
    # At hundreds of tokens the scores no longer fit in cache and every elementwise pass
    # over them costs memory bandwidth, so fewer passes:
    # - scores transposed (keys by queries): the max reduces over rows, which MLX's
    #   CPU reductions do about 2x faster than over the contiguous axis;
    # - the mask rides in the matmul: keys get a column holding it, queries a column of
    #   ones, so q . k + mask comes out of BLAS;
    # - values get a column of ones, so weights @ values also yields the row sums.
    # About 10-20 % less attention time at 256-512 tokens.
    batch, n_kv_heads, length, head_dim = keys.shape
    if mask is not None:
        mask_column = mx.broadcast_to(mask.reshape(batch, 1, length, 1),
                                      (batch, n_kv_heads, length, 1))
        keys = mx.concatenate([keys, mask_column], axis=-1)
        grouped = mx.concatenate([grouped, mx.ones(grouped.shape[:-1] + (1,), grouped.dtype)], axis=-1)
    scores_t = keys @ grouped.swapaxes(-1, -2)
    weights_t = exp2_shifted(scores_t, scores_t.max(axis=-2, keepdims=True))
    values = mx.concatenate([values, mx.ones(values.shape[:-1] + (1,), values.dtype)], axis=-1)
    weighted = weights_t.swapaxes(-1, -2) @ values
    return weighted[..., :head_dim], weighted[..., head_dim:]


class PackedTokens:
    """The real tokens of a padded batch, packed: token-wise layers (the Linear layers,
    LayerNorms, activations) run on (N, E) rows of real tokens only, attention on the padded grid.

    A padded batch of texts sorted by length still holds some padding (2.8 % in the
    benchmarks' MiniLM mixed corpus, 20 % in a batch of 32 texts of 8-24 tokens); every
    Linear layer would compute it. :meth:`pad` fills padding slots with the first real row
    (finite, and masked out as keys); :meth:`pack` drops them again.
    """

    def __init__(self, attention_mask: mx.array):
        keep = np.array(attention_mask).astype(bool)
        self.batch, self.length = keep.shape
        rows = np.flatnonzero(keep.reshape(-1))
        slots = np.zeros(keep.size, dtype=np.int32)
        slots[rows] = np.arange(rows.size, dtype=np.int32)
        self.count = rows.size
        self._rows = mx.array(rows.astype(np.int32))
        self._slots = mx.array(slots)
        lengths = keep.sum(axis=1)
        self._first_rows = mx.array((np.cumsum(lengths) - lengths).astype(np.int32))

    def pack(self, padded: mx.array) -> mx.array:
        """(B, L, E) -> (N, E): the rows of the real tokens, in order."""
        return mx.take(padded.reshape(self.batch * self.length, -1), self._rows, axis=0)

    def pad(self, packed: mx.array) -> mx.array:
        """(N, E) -> (B, L, E): real rows in their places, padding slots holding the first real row."""
        return mx.take(packed, self._slots, axis=0).reshape(self.batch, self.length, -1)

    def first(self, packed: mx.array) -> mx.array:
        """(N, E) -> (B, 1, E): each text's first token."""
        return mx.take(packed, self._first_rows, axis=0)[:, None]


def packed_tokens(attention_mask: mx.array | None, dtype: mx.Dtype) -> PackedTokens | None:
    """A :class:`PackedTokens` for a padded float32 batch where the CPU fast paths run, else None.

    CPU only: on a GPU the gathers are not measured yet, and a padded batch costs less there.
    """
    if attention_mask is None or not float32_fast_paths(dtype):
        return None
    packed = PackedTokens(attention_mask)
    return packed if packed.count < packed.batch * packed.length else None


def pad_rows(packed: PackedTokens | None, x: mx.array) -> mx.array:
    """``packed.pad(x)``, or ``x`` itself (already padded) when ``packed`` is None."""
    return x if packed is None else packed.pad(x)


def pack_rows(packed: PackedTokens | None, x: mx.array) -> mx.array:
    """``packed.pack(x)``, or ``x`` itself (the batch stays padded) when ``packed`` is None."""
    return x if packed is None else packed.pack(x)


def first_rows(packed: PackedTokens | None, x: mx.array) -> mx.array:
    """Each text's first token as (B, 1, E): ``packed.first(x)``, or ``x[:, :1]`` when ``packed`` is None."""
    return x[:, :1] if packed is None else packed.first(x)


def padding_key_mask(attention_mask: mx.array | None, dtype: mx.Dtype) -> mx.array | None:
    """:func:`additive_key_mask` as :func:`attention` takes it: padding keys get
    :data:`MASKED_SCORE` (finite) where :func:`cpu_attention` will run, ``-inf`` for sdpa."""
    fill = MASKED_SCORE if float32_fast_paths(dtype) else float("-inf")
    return additive_key_mask(attention_mask, dtype, fill)


def attention(queries: mx.array, keys: mx.array, values: mx.array, scale: float,
              mask: mx.array | None) -> mx.array:
    """Scaled dot-product attention over (B, H, L, D) queries and (B, KV, L, D) keys and values:
    :func:`cpu_attention` for float32 where the fast paths run, ``mx.fast`` sdpa elsewhere.
    ``mask`` is additive (B, 1, 1, L), as :func:`padding_key_mask` builds it, or None."""
    if float32_fast_paths(queries.dtype):
        return cpu_attention(queries, keys, values, scale, mask)
    return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)
