"""kalm_mlx.fusion: the fused-vector arithmetic (rank fusion is covered in test_ensemble)."""

import numpy as np
import pytest

from kalm_mlx.fusion import fuse_ranking, fuse_vectors, fused_vector_scales
from kalm_mlx.pooling import normalize


def test_fused_vector_scales_square_to_the_weight_shares():
    scales = fused_vector_scales({"a": 3.0, "b": 1.0})
    assert scales == pytest.approx({"a": np.sqrt(0.75), "b": np.sqrt(0.25)})


def test_fused_vectors_dot_to_the_weighted_mean_cosine():
    rng = np.random.default_rng(0)
    per_model = {"a": normalize(rng.normal(size=(3, 8)).astype(np.float32)),
                 "b": normalize(rng.normal(size=(3, 5)).astype(np.float32))}
    weights = {"a": 2.0, "b": 0.5}
    fused = fuse_vectors(per_model, weights, ["b", "a"])
    assert fused.dtype == np.float32 and fused.shape == (3, 13)
    np.testing.assert_allclose(fused[:, :5], per_model["b"] * np.sqrt(0.5 / 2.5), rtol=1e-6)
    expected = (2.0 * per_model["a"] @ per_model["a"].T + 0.5 * per_model["b"] @ per_model["b"].T) / 2.5
    np.testing.assert_allclose(fused @ fused.T, expected, atol=1e-6)


def test_fuse_ranking_orders_best_first_and_keeps_ties_in_order():
    scores = {"a": np.array([0.1, 0.9, 0.9, 0.5]), "b": np.array([0.2, 0.8, 0.8, 0.9])}
    weights = {"a": 1.0, "b": 1.0}
    assert fuse_ranking(scores, weights, "score") == [(1, pytest.approx(0.85)), (2, pytest.approx(0.85)),
                                                      (3, pytest.approx(0.7)), (0, pytest.approx(0.15))]
    top = fuse_ranking(scores, weights, "rrf", k=0, top_k=2)
    assert top == [(1, pytest.approx(1 + 1 / 2)), (2, pytest.approx(1 + 1 / 2))]
    with pytest.raises(ValueError, match="fusion must be one of rrf, score"):
        fuse_ranking(scores, weights, "max")
