"""Frechet distance: closed forms."""
from __future__ import annotations

import math

import numpy as np
import pytest

from ecgflowcmr.metrics.frechet import fd, fd_from_features, mean_cov, trace_sqrt_product


def test_identical_gaussians_give_zero():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 6))
    sigma = a @ a.T + 0.1 * np.eye(6)
    mu = rng.normal(size=6)
    assert fd(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)


def test_identical_feature_sets_give_zero():
    x = np.random.default_rng(1).normal(size=(200, 16))
    assert fd_from_features(x, x.copy()) == pytest.approx(0.0, abs=1e-9)


def test_one_dimensional_closed_form():
    # N(1, 4) vs N(3, 9): (1 - 3)^2 + 4 + 9 - 2 * sqrt(4 * 9) = 5
    assert fd([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(5.0, abs=1e-12)
    assert fd(1.0, 4.0, 3.0, 9.0) == pytest.approx(5.0, abs=1e-12)


def test_identity_vs_correlated_equal_means():
    # tr(I) + tr(S) - 2 tr(S^(1/2)), S eigenvalues 3 and 1 -> 2 + 4 - 2 (sqrt 3 + 1) = 4 - 2 sqrt 3
    s = np.array([[2.0, 1.0], [1.0, 2.0]])
    assert fd(np.zeros(2), np.eye(2), np.zeros(2), s) == pytest.approx(4 - 2 * math.sqrt(3), abs=1e-12)


def test_shift_adds_squared_norm():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(500, 8)) @ rng.normal(size=(8, 8))
    c = rng.normal(size=8)
    assert fd_from_features(x, x + c) == pytest.approx(float(c @ c), rel=1e-8, abs=1e-8)


@pytest.mark.parametrize("a", [0.5, 2.0, 3.0])
def test_scaling_closed_form(a):
    # FD(X, aX) = (1 - a)^2 (|mu|^2 + tr Sigma) for a > 0
    rng = np.random.default_rng(3)
    x = rng.normal(loc=1.5, size=(400, 5)) @ rng.normal(size=(5, 5))
    mu, sigma = mean_cov(x)
    expected = (1 - a) ** 2 * (mu @ mu + np.trace(sigma))
    assert fd_from_features(x, a * x) == pytest.approx(expected, rel=1e-8)


def test_unbiased_covariance():
    x = np.array([[0.0], [2.0]])
    mu, sigma = mean_cov(x)
    assert mu[0] == 1.0 and sigma[0, 0] == pytest.approx(2.0)  # divides by N - 1


def test_rank_deficient_covariances_are_fine():
    # Fewer samples than dimensions (FVD with few videos): PSD, singular, still finite and >= 0.
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(5, 50)), rng.normal(size=(6, 50))
    value = fd_from_features(x, y)
    assert np.isfinite(value) and value >= 0
    assert trace_sqrt_product(np.zeros((3, 3)), np.eye(3)) == 0.0


def test_float64_and_symmetric_product_agree_with_eigenvalues():
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(4, 4)), rng.normal(size=(4, 4))
    s1, s2 = a @ a.T, b @ b.T
    expected = np.sqrt(np.clip(np.linalg.eigvals(s1 @ s2).real, 0, None)).sum()
    assert trace_sqrt_product(s1, s2) == pytest.approx(expected, rel=1e-9)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError):
        fd(np.zeros(2), np.eye(3), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError):
        mean_cov(np.zeros((1, 4)))
    with pytest.raises(ValueError):
        fd_from_features(np.full((3, 2), np.nan), np.zeros((3, 2)))
