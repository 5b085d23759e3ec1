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

from .base import (Linear, PackedTokens, RMSNorm, attention, check_weights, fast_cpu_paths, pack_rows,
                   packed_tokens, pad_rows, padding_key_mask, strip_prefix, swiglu)

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
        self.q_proj = Linear(dim, self.n_heads * self.head_dim, bias=True)
        self.k_proj = Linear(dim, self.n_kv_heads * self.head_dim, bias=True)
        self.v_proj = Linear(dim, self.n_kv_heads * self.head_dim, bias=True)
        self.o_proj = Linear(self.n_heads * self.head_dim, dim, bias=False)

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
                 rope: tuple[mx.array, mx.array] | None = None, packed: PackedTokens | None = None) -> mx.array:
        """Attention over ``x`` (B, L, H), or (N, H) real tokens when ``packed`` (attention runs padded).

        ``rope`` is :func:`rope_tables` in x's dtype, or None for ``mx.fast.rope``.
        """
        queries = self._rope(pad_rows(packed, self.q_proj(x)), self.n_heads, rope)
        keys = self._rope(pad_rows(packed, self.k_proj(x)), self.n_kv_heads, rope)
        values = self._heads(pad_rows(packed, self.v_proj(x)), self.n_kv_heads)
        out = attention(queries, keys, values, self.scale, mask)
        batch, _, length, _ = out.shape
        return self.o_proj(pack_rows(packed, out.transpose(0, 2, 1, 3).reshape(batch, length, -1)))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = Linear(args.intermediate_size, args.hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, mask: mx.array | None,
                 rope: tuple[mx.array, mx.array] | None = None, packed: PackedTokens | None = None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, rope, packed)
        return h + self.mlp(self.post_attention_layernorm(h))


class Model(nn.Module):
    """Qwen2 without a causal mask: token ids (B, L) -> last hidden states (B, L, H)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [TransformerBlock(args) for _ in range(args.num_hidden_layers)]
        self.norm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, input_ids: mx.array, attention_mask: mx.array | None = None) -> mx.array:
        h = self.embed_tokens(input_ids)
        mask = padding_key_mask(attention_mask, h.dtype)
        rope = None
        if fast_cpu_paths():
            # Tables once per batch: faster than mx.fast.rope on the CPU, and closer to
            # transformers (see rope_tables).
            args = self.args
            rope = tuple(t.astype(h.dtype) for t in rope_tables(input_ids.shape[1], args.head_dim,
                                                                 args.rope_theta))
        packed = packed_tokens(attention_mask, h.dtype)
        h = pack_rows(packed, h)
        for layer in self.layers:
            h = layer(h, mask, rope, packed)
        return pad_rows(packed, self.norm(h))

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
