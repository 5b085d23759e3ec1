"""kalm_mlx.fusion: the fused-vector arithmetic (rank fusion is covered in test_ensemble)."""

import numpy as np
import pytest

from kalm_mlx.fusion import fuse_vectors, fused_vector_scales
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
