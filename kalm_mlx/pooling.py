"""Pooling of hidden states into one vector per text, normalisation and Matryoshka truncation."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

POOLING_METHODS = ("mean", "cls", "last")


def pool(hidden: mx.array, attention_mask: mx.array, method: str) -> mx.array:
    """Pool hidden states (B, L, H) over the real tokens given by ``attention_mask`` (B, L).

    ``mean`` averages real tokens, ``cls`` takes the first token, ``last`` the last
    real token (right padding). Pooling runs in float32 whatever the activation dtype.
    """
    hidden = hidden.astype(mx.float32)
    mask = attention_mask.astype(mx.bool_)
    if method == "mean":
        # where(), not a multiply: a NaN or inf in a padded row must not leak in.
        summed = mx.where(mask[..., None], hidden, 0.0).sum(axis=1)
        counts = mx.maximum(mask.sum(axis=1, keepdims=True), 1).astype(mx.float32)
        return summed / counts
    if method == "cls":
        return hidden[:, 0, :]
    if method == "last":
        last = mx.maximum(mask.astype(mx.int32).sum(axis=1) - 1, 0)
        return mx.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0, :]
    raise ValueError(f"unknown pooling {method!r}; expected one of {', '.join(POOLING_METHODS)}")


def normalize(vectors: np.ndarray) -> np.ndarray:
    """L2-normalise rows; an all-zero row stays zero."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def layer_norm(vectors: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """Weightless layer norm over each row (zero mean, unit variance)."""
    centered = vectors - vectors.mean(axis=1, keepdims=True)
    return centered / np.sqrt((centered**2).mean(axis=1, keepdims=True) + eps)


def truncate(vectors: np.ndarray, dim: int, renormalize: bool = True,
             pre_layer_norm: bool = False) -> np.ndarray:
    """Keep the first ``dim`` components (Matryoshka), then renormalise unless told not to.

    ``pre_layer_norm`` first applies a weightless layer norm to the full vectors, as
    nomic-embed-text-v1.5's Matryoshka recipe does.
    """
    if pre_layer_norm:
        vectors = layer_norm(vectors)
    out = np.ascontiguousarray(vectors[:, :dim])
    return normalize(out) if renormalize else out
