"""Fusion arithmetic for an ensemble: pure functions over numpy arrays, no model in sight.

Reciprocal rank fusion and weighted score fusion turn per-model scores into one score
per document; :func:`fused_vector_scales` gives the factors that make one concatenated
vector's dot product the weighted mean of the models' cosines.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

RRF_K = 60
"""The ``k`` of reciprocal rank fusion (Cormack et al.'s value, as engram uses)."""
FUSIONS = ("rrf", "score")


def _check_scores(scores: Mapping[str, np.ndarray], weights: Mapping[str, float]) -> dict:
    if not scores:
        raise ValueError("no scores to fuse")
    arrays = {name: np.asarray(values, dtype=np.float64) for name, values in scores.items()}
    lengths = {name: values.shape for name, values in arrays.items()}
    if any(len(shape) != 1 for shape in lengths.values()) or len(set(lengths.values())) != 1:
        raise ValueError(f"scores must be 1-D arrays of one length; got shapes {lengths}")
    missing = [name for name in arrays if name not in weights]
    if missing:
        raise ValueError(f"no weight for {', '.join(missing)}")
    return arrays


def competition_ranks(scores: np.ndarray) -> np.ndarray:
    """1-based ranks, highest score first; equal scores share the better rank (1, 2, 2, 4)."""
    descending = np.sort(-np.asarray(scores, dtype=np.float64))
    return np.searchsorted(descending, -np.asarray(scores, dtype=np.float64), side="left") + 1


def fuse_rrf(scores: Mapping[str, np.ndarray], weights: Mapping[str, float], k: float = RRF_K) -> np.ndarray:
    """Weighted reciprocal rank fusion: ``sum over models of w_m / (k + rank_m(doc))``.

    ``scores`` maps each model to its score per document (higher is better); ranks
    start at 1 and ties share a rank. Returns one fused score per document.
    """
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not math.isfinite(k) or k < 0:
        raise ValueError(f"k must be a non-negative number, not {k!r}")
    arrays = _check_scores(scores, weights)
    fused = sum(weights[name] / (k + competition_ranks(values)) for name, values in arrays.items())
    return np.asarray(fused, dtype=np.float64)


def fuse_scores(scores: Mapping[str, np.ndarray], weights: Mapping[str, float]) -> np.ndarray:
    """Weighted mean of the models' scores (cosines): ``sum w_m s_m / sum w_m`` per document."""
    arrays = _check_scores(scores, weights)
    total = sum(weights[name] for name in arrays)
    return sum(weights[name] * values for name, values in arrays.items()) / total


def fuse_ranking(scores: Mapping[str, np.ndarray], weights: Mapping[str, float], fusion: str = "rrf",
                 k: float = RRF_K, top_k: int | None = None) -> list[tuple[int, float]]:
    """Documents ranked by fused scores, best first: ``[(index, fused score), ...]``.

    ``fusion`` is ``"rrf"`` (:func:`fuse_rrf` with ``k``) or ``"score"`` (:func:`fuse_scores`);
    ``top_k`` keeps the best (all when None); ties keep document order.
    """
    if fusion not in FUSIONS:
        raise ValueError(f"fusion must be one of {', '.join(FUSIONS)}, not {fusion!r}")
    fused = fuse_rrf(scores, weights, k) if fusion == "rrf" else fuse_scores(scores, weights)
    order = np.argsort(-fused, kind="stable")[:top_k]
    return [(int(index), float(fused[index])) for index in order]


def fused_vector_scales(weights: Mapping[str, float]) -> dict[str, float]:
    """Per-model factors ``sqrt(w_m / sum w)`` for concatenating normalised vectors.

    Scaled so, the dot product of two concatenated vectors is the weighted mean of the
    models' cosines.
    """
    total = sum(weights.values())
    return {name: math.sqrt(weight / total) for name, weight in weights.items()}


def fuse_vectors(per_model: Mapping[str, np.ndarray], weights: Mapping[str, float],
                 order: Sequence[str]) -> np.ndarray:
    """Concatenate the models' normalised vectors in ``order``, each scaled by :func:`fused_vector_scales`."""
    scales = fused_vector_scales({name: weights[name] for name in order})
    parts = [per_model[name] * np.float32(scales[name]) for name in order]
    return np.concatenate(parts, axis=1).astype(np.float32, copy=False)
