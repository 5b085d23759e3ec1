"""Fit the approximations behind kalm-mlx's CPU fast paths, and print their coefficients.

    python -m benchmarks.fit_approximations

MLX's CPU backend evaluates ``exp`` one element at a time (about 60 M/s), which made the
SwiGLU activation and the attention softmax a third of the Qwen2 encoder's time. Written
with multiply, add and divide only, the C++ compiler behind ``mx.compile`` vectorizes them.

- SwiGLU: tanh(x) ~ x P(x^2) / Q(x^2) on 0 <= x <= 9 (beyond, tanh(x) is 1 in float32),
  P(0) = Q(0) = 1 so that tanh(x) ~ x near 0 exactly, degree 4 in x^2 each; absolute
  error is what counts, since SwiGLU computes h + h tanh(g / 2). These are
  ``kalm_mlx.models.base._TANH_P`` and ``_TANH_Q``.
- Softmax: 2^r ~ A(r) on -1/2 <= r <= 1/2, degree 6, relative error; for x <= 0, 2^x is then
  2^-1/2 A(x - trunc(x) + 1/2) times 2^trunc(x), the latter added to the exponent bits. These are
  ``kalm_mlx.models.base._EXP2_POLY``.
- GELU (BERT's exact, erf-based one): erf(z) ~ z P(z^2) / Q(z^2) on 0 <= z <= 4 (beyond,
  erf(z) is 1 in float32), Q(0) = 1, degree 5 each, absolute error (GELU computes
  h + h erf(x / sqrt(2))). These are ``kalm_mlx.models.base._ERF_P`` and ``_ERF_Q``.

Both fits are linearised least-squares problems re-weighted towards the worst points
until the largest error stops falling (a Lawson-style route to the minimax fit).
"""

from __future__ import annotations

import math

import numpy as np


def _reweighted_fit(design, target, error_of, iterations: int = 60):
    """Least squares ``design @ c ~ target`` re-weighted by ``error_of(c)``; the best c and its max error."""
    weights = np.ones(len(target))
    best = None
    for _ in range(iterations):
        solution, *_ = np.linalg.lstsq(design * weights[:, None], target * weights, rcond=None)
        error = error_of(solution)
        if best is None or error.max() < best[1]:
            best = (solution, float(error.max()))
        weights = weights * np.sqrt(error / error.max()) + 1e-3 * weights
        weights /= weights.mean()
    return best


def fit_tanh(degree: int = 4, bound: float = 9.0, points: int = 20000) -> tuple[np.ndarray, np.ndarray, float]:
    """tanh(x) ~ x P(x^2) / Q(x^2): return (P, Q, max abs error), lowest power first."""
    x = np.linspace(0.0, bound, points)[1:]
    t = x * x
    target = np.tanh(x)
    # x P(t) - tanh(x) Q(t) = 0 with P(0) = Q(0) = 1, linear in the other coefficients.
    design = np.stack([x * t**k for k in range(1, degree + 1)]
                      + [-target * t**k for k in range(1, degree + 1)], axis=1)

    def split(solution):
        return (np.concatenate([[1.0], solution[:degree]]), np.concatenate([[1.0], solution[degree:]]))

    def error_of(solution):
        p, q = split(solution)
        return np.abs(x * np.polyval(p[::-1], t) / np.polyval(q[::-1], t) - target)

    solution, error = _reweighted_fit(design, target - x, error_of)
    return (*split(solution), error)


def fit_exp2(degree: int = 6, points: int = 20001) -> tuple[np.ndarray, float]:
    """2^r ~ A(r) on [-1/2, 1/2]: return (A, max relative error), lowest power first."""
    r = np.linspace(-0.5, 0.5, points)
    target = np.exp2(r)
    design = np.stack([r**k / target for k in range(degree + 1)], axis=1)

    def error_of(solution):
        return np.abs(np.polyval(solution[::-1], r) / target - 1)

    return _reweighted_fit(design, np.ones_like(r), error_of)


def fit_erf(degree: int = 5, bound: float = 4.0, points: int = 40000) -> tuple[np.ndarray, np.ndarray, float]:
    """erf(z) ~ z P(z^2) / Q(z^2): return (P, Q, max abs error), lowest power first."""
    z = np.linspace(0.0, bound, points)[1:]
    t = z * z
    target = np.array([math.erf(v) for v in z])
    # z P(t) - erf(z) (Q(t) - 1) = erf(z) with Q(0) = 1, linear in the coefficients.
    design = np.stack([z * t**k for k in range(degree + 1)]
                      + [-target * t**k for k in range(1, degree + 1)], axis=1)

    def split(solution):
        return solution[:degree + 1], np.concatenate([[1.0], solution[degree + 1:]])

    def error_of(solution):
        p, q = split(solution)
        return np.abs(z * np.polyval(p[::-1], t) / np.polyval(q[::-1], t) - target)

    solution, error = _reweighted_fit(design, target, error_of, iterations=100)
    return (*split(solution), error)


def main() -> None:
    """Print the coefficients and the errors of every fit."""
    p, q, error = fit_tanh()
    print(f"tanh: max |error| in float64 {error:.2e}")
    print("_TANH_P =", tuple(float(c) for c in p))
    print("_TANH_Q =", tuple(float(c) for c in q))
    a, error = fit_exp2()
    print(f"exp2: max relative error in float64 {error:.2e}")
    print("_EXP2_POLY =", tuple(float(c) for c in a))
    p, q, error = fit_erf()
    print(f"erf: max |error| in float64 {error:.2e}")
    print("_ERF_P =", tuple(float(c) for c in p))
    print("_ERF_Q =", tuple(float(c) for c in q))


if __name__ == "__main__":
    main()
