"""Bidirectional Qwen2 encoder (KaLM-Embedding-V2 and V2.5).

The Qwen2 decoder with the causal mask removed: every token attends to every
real token of its own text, padding is hidden by an additive mask on the keys.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import numpy as np

import mlx.core as mx
import mlx.nn as nn

from .._backend import cpu_compiler_available
from .base import check_weights, strip_prefix

MODEL_TYPES = ("qwen2",)
DEFAULT_POOLING = "mean"


def default_max_tokens(config: dict) -> int:
    """Token limit when the checkpoint names none: KaLM was trained on 512 tokens."""
    return 512


@dataclass
class ModelArgs:
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_config(cls, config: dict) -> "ModelArgs":
        """Build the arguments from a Hugging Face ``config.json`` dict (transformers 4 or 5)."""
        try:
            args = cls(
                hidden_size=int(config["hidden_size"]),
                num_hidden_layers=int(config["num_hidden_layers"]),
                intermediate_size=int(config["intermediate_size"]),
                num_attention_heads=int(config["num_attention_heads"]),
                num_key_value_heads=int(
                    config.get("num_key_value_heads") or config["num_attention_heads"]
                ),
                vocab_size=int(config["vocab_size"]),
                rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
                rope_theta=_rope_theta(config),
            )
        except KeyError as err:
            raise ValueError(f"Qwen2 config lacks the key {err.args[0]!r}") from None
        if args.hidden_size % args.num_attention_heads:
            raise ValueError(
                f"Qwen2 config: hidden_size {args.hidden_size} is not a multiple of "
                f"num_attention_heads {args.num_attention_heads}"
            )
        if args.num_attention_heads % args.num_key_value_heads:
            raise ValueError(
                f"Qwen2 config: num_attention_heads {args.num_attention_heads} is not a "
                f"multiple of num_key_value_heads {args.num_key_value_heads}"
            )
        head_dim = config.get("head_dim")
        if head_dim is not None and int(head_dim) != args.head_dim:
            raise ValueError(
                f"Qwen2 config: head_dim {head_dim} differs from hidden_size / heads = {args.head_dim}"
            )
        return args


def _rope_theta(config: dict) -> float:
    """RoPE base: top level (transformers 4) or under ``rope_parameters`` (transformers 5)."""
    rope_parameters = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or rope_parameters
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in (None, "default"):
        raise ValueError(f"Qwen2 config: RoPE scaling {rope_type!r} is not supported")
    theta = config.get("rope_theta", rope_parameters.get("rope_theta"))
    if theta is None:
        warnings.warn(
            "Qwen2 config has no rope_theta; using transformers' default 10000",
            stacklevel=3,
        )
        theta = 10000.0
    return float(theta)


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
_ROUND_MAGIC = 12582912.0  # 1.5 * 2^23: (x + it) - it rounds a float32 to an integer
_LOG2E = 1.4426950408889634
MASKED_SCORE = -1e9
"""Additive score of a padding key: finite, for the CPU softmax's integer exponent trick."""


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


def fast_cpu_paths() -> bool:
    """True when the compiled CPU fast paths below run: CPU device and a C++ compiler for MLX."""
    return mx.default_device() == mx.cpu and cpu_compiler_available()


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


@mx.compile
def _exp2_fraction(x: mx.array) -> mx.array:
    # 2^(x - round(x)), Estrin's scheme.
    r = x - ((x + _ROUND_MAGIC) - _ROUND_MAGIC)
    r2 = r * r
    r4 = r2 * r2
    a = _EXP2_POLY
    return ((a[0] + a[1] * r) + r2 * (a[2] + a[3] * r)) + r4 * ((a[4] + a[5] * r) + a[6] * r2)


@mx.compile
def _exp2_integer_bits(x: mx.array) -> mx.array:
    # The float32 bits of 2^round(x), and 0 (the bits of 0.0) where round(x) < -60: far
    # below float32's resolution next to the row's largest weight, 1, and it keeps
    # subnormal numbers (slow on x86) out of the weights.
    n = ((x + _ROUND_MAGIC) - _ROUND_MAGIC).astype(mx.int32)
    keep = -mx.minimum(mx.maximum(n + 61, 0), 1)  # all ones or all zeros
    return mx.bitwise_and(mx.left_shift(n + 127, 23), keep)


@mx.compile
def _multiply(a: mx.array, b: mx.array) -> mx.array:
    return a * b


def exp2_nonpositive(x: mx.array) -> mx.array:
    """``2 ** x`` for float32 ``x <= 0``, within 2e-7 relative, exactly 0 below ``2 ** -60``.

    Three compiled elementwise kernels (fraction, exponent bits, product) that vectorize,
    about 5x faster than ``mx.exp`` on the CPU backend. ``x`` must be finite or NaN (NaN
    stays NaN); values below -2^31 are out of range.
    """
    return _multiply(_exp2_fraction(x), _exp2_integer_bits(x).view(mx.float32))


def cpu_attention(queries: mx.array, keys: mx.array, values: mx.array, scale: float,
                  mask: mx.array | None) -> mx.array:
    """Softmax attention for float32 on the CPU, as ``mx.fast.scaled_dot_product_attention``.

    queries (B, H, L, D), keys and values (B, KV, L, D) with H a multiple of KV, ``mask``
    additive and finite ((B, 1, 1, L), :data:`MASKED_SCORE` on padding keys) or None.
    The queries sharing a key/value head are stacked along the length, so each product
    is one batched matmul (no repeated keys), and the softmax uses
    :func:`exp2_nonpositive` on scores in base-2 units: 2x faster than MLX's CPU sdpa
    at 128 tokens, whose softmax calls ``exp`` one element at a time.
    """
    batch, n_heads, length, head_dim = queries.shape
    n_kv_heads = keys.shape[1]
    grouped = (queries * (scale * _LOG2E)).reshape(
        batch, n_kv_heads, (n_heads // n_kv_heads) * length, head_dim
    )
    scores = grouped @ keys.swapaxes(-1, -2)
    if mask is not None:
        scores = scores + mask
    weights = exp2_nonpositive(scores - scores.max(axis=-1, keepdims=True))
    out = (weights @ values) / weights.sum(axis=-1, keepdims=True)
    return out.reshape(batch, n_heads, length, head_dim)


@functools.lru_cache(maxsize=64)
def rope_tables(length: int, head_dim: int, theta: float) -> tuple[mx.array, mx.array]:
    """cos and signed sin for RoPE over ``length`` positions, each (length, 2, head_dim / 2).

    As transformers computes them: float32 inverse frequencies, angles rounded to float32
    (at position 500 that rounding alone moves cos by up to 3e-5), then cos and sin of
    those angles, here in float64 rounded once (numpy's float32 pow and cos are not
    correctly rounded; torch's are within an ulp). The tables match transformers' to an
    ulp; mx.fast.rope's rotation differs by ~1e-5. The sin table carries rotate_half's
    sign. Cached per length: a batch builds them once for all its layers.
    """
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    powers = np.power(np.float64(theta), exponents.astype(np.float64)).astype(np.float32)
    inv_freq = np.float32(1.0) / powers  # float32 pow, then a float32 division, as torch does
    angles = (np.arange(length, dtype=np.float32)[:, None] * inv_freq[None, :]).astype(np.float64)
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    cos_table = np.stack([cos, cos], axis=1)  # (length, 2, head_dim / 2)
    sin_table = np.stack([-sin, sin], axis=1)
    return mx.array(cos_table), mx.array(sin_table)


@mx.compile
def _rotate(halves: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    # halves (B, H, L, 2, D/2): x * cos + rotate_half(x) * sin, with rotate_half as the
    # two halves swapped (a reversed view) and its sign folded into the sin table.
    return halves * cos + halves[..., ::-1, :] * sin


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        self.head_dim = args.head_dim
        self.scale = self.head_dim**-0.5
        self.rope_theta = args.rope_theta
        dim = args.hidden_size
        self.q_proj = nn.Linear(dim, self.n_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, dim, bias=False)

    def _heads(self, x: mx.array, n_heads: int) -> mx.array:
        batch, length, _ = x.shape
        return x.reshape(batch, length, n_heads, self.head_dim).transpose(0, 2, 1, 3)

    def _rope(self, x: mx.array, n_heads: int, tables: tuple[mx.array, mx.array] | None) -> mx.array:
        """Project-then-rotate input (B, L, n_heads * D) -> rotated heads (B, n_heads, L, D)."""
        batch, length, _ = x.shape
        if tables is None:
            # Hugging Face rotates halves (rotate_half), which is traditional=False.
            return mx.fast.rope(self._heads(x, n_heads), self.head_dim, traditional=False,
                                base=self.rope_theta, scale=1.0, offset=0)
        halves = x.reshape(batch, length, n_heads, 2, self.head_dim // 2).transpose(0, 2, 1, 3, 4)
        return _rotate(halves, *tables).reshape(batch, n_heads, length, self.head_dim)

    def __call__(self, x: mx.array, mask: mx.array | None,
                 rope: tuple[mx.array, mx.array] | None = None) -> mx.array:
        """Attention over ``x`` (B, L, H).

        ``rope`` is :func:`rope_tables` in x's dtype, or None for ``mx.fast.rope``.
        """
        batch, length, _ = x.shape
        queries = self._rope(self.q_proj(x), self.n_heads, rope)
        keys = self._rope(self.k_proj(x), self.n_kv_heads, rope)
        values = self._heads(self.v_proj(x), self.n_kv_heads)
        if queries.dtype == mx.float32 and fast_cpu_paths():
            out = cpu_attention(queries, keys, values, self.scale, mask)
        else:
            out = mx.fast.scaled_dot_product_attention(
                queries, keys, values, scale=self.scale, mask=mask
            )
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(batch, length, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, mask: mx.array | None,
                 rope: tuple[mx.array, mx.array] | None = None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, rope)
        return h + self.mlp(self.post_attention_layernorm(h))


class Model(nn.Module):
    """Qwen2 without a causal mask: token ids (B, L) -> last hidden states (B, L, H)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [TransformerBlock(args) for _ in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, input_ids: mx.array, attention_mask: mx.array | None = None) -> mx.array:
        h = self.embed_tokens(input_ids)
        mask = None
        if attention_mask is not None:
            # Additive key mask (B, 1, 1, L) in the activation dtype: it broadcasts over
            # heads and queries, and sdpa refuses a float32 mask with float16 queries.
            # Finite for cpu_attention; in float16 it becomes -inf, which sdpa takes.
            keep = attention_mask.astype(mx.bool_)[:, None, None, :]
            mask = mx.where(keep, 0.0, MASKED_SCORE).astype(h.dtype)
        rope = None
        if fast_cpu_paths():
            # Tables once per batch: faster than mx.fast.rope on the CPU, and closer to
            # transformers (see rope_tables).
            args = self.args
            rope = tuple(t.astype(h.dtype) for t in rope_tables(input_ids.shape[1], args.head_dim,
                                                                 args.rope_theta))
        for layer in self.layers:
            h = layer(h, mask, rope)
        return self.norm(h)

    def sanitize(self, weights: dict[str, mx.array], source: str = "checkpoint") -> dict[str, mx.array]:
        """Map Hugging Face Qwen2 tensor names to this module's, checking names and shapes.

        Accepts names with or without the ``model.`` prefix, drops ``lm_head`` and
        rotary buffers, and raises ValueError naming any other unexpected tensor.
        """
        weights = strip_prefix(weights, ("model.",))
        weights = {
            name: value
            for name, value in weights.items()
            if not name.startswith("lm_head.") and "rotary_emb" not in name
        }
        check_weights(self, weights, source)
        return weights
