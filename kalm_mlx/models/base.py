"""Pieces shared by every encoder family: weight checking and the family table."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten


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


def additive_key_mask(attention_mask: mx.array | None, dtype: mx.Dtype) -> mx.array | None:
    """Turn a (B, L) 0/1 mask into an additive (B, 1, 1, L) key mask in ``dtype``.

    The mask broadcasts over heads and queries; it is built in the activation dtype
    because ``mx.fast.scaled_dot_product_attention`` refuses a float32 mask with
    float16 queries.
    """
    if attention_mask is None:
        return None
    keep = attention_mask.astype(mx.bool_)[:, None, None, :]
    return mx.where(keep, 0.0, float("-inf")).astype(dtype)
