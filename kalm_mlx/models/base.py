"""Pieces shared by every encoder family: weight checks, prefixes, key masks, and the CPU GELU."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
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

    Padding keys get ``fill`` (a finite one for the CPU softmax of ``qwen2.cpu_attention``).
    The mask broadcasts over heads and queries; it is built in the activation dtype
    because ``mx.fast.scaled_dot_product_attention`` refuses a float32 mask with
    float16 queries.
    """
    if attention_mask is None:
        return None
    keep = attention_mask.astype(mx.bool_)[:, None, None, :]
    return mx.where(keep, 0.0, fill).astype(dtype)


def fast_cpu_paths() -> bool:
    """True when compiled CPU fast paths run: CPU device and a C++ compiler for MLX."""
    return mx.default_device() == mx.cpu and cpu_compiler_available()


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
