"""Frechet distance between two Gaussians (FID / FVD), in float64.

    FD = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr( (S1 S2)^(1/2) )

The trace term is computed from the symmetric product ``sqrt(S1) S2 sqrt(S1)``: it has the same
eigenvalues as ``S1 S2`` but is symmetric positive semi-definite, so ``numpy.linalg.eigh`` is exact
and stable, with no complex parts to discard (unlike ``scipy.linalg.sqrtm`` of the non-symmetric
``S1 S2``, whose ``disp`` argument is deprecated). Tiny negative eigenvalues from round-off are
clipped to zero. Covariances are unbiased (divide by N - 1).

Note: Frechet distances are biased upwards at small N (few videos / frames); always report N.
"""
from __future__ import annotations

import numpy as np


def _as_f64(x, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or inf")
    return arr


def _sqrt_psd(mat: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix (via eigh)."""
    sym = (mat + mat.T) / 2.0
    eigvals, eigvecs = np.linalg.eigh(sym)
    eigvals = np.clip(eigvals, 0.0, None)
    return (eigvecs * np.sqrt(eigvals)) @ eigvecs.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((S1 S2)^(1/2)) = sum of sqrt of the eigenvalues of sqrt(S1) S2 sqrt(S1)."""
    root1 = _sqrt_psd(sigma1)
    product = root1 @ sigma2 @ root1
    product = (product + product.T) / 2.0
    eigvals = np.clip(np.linalg.eigvalsh(product), 0.0, None)
    return float(np.sqrt(eigvals).sum())


def fd(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

    mu: (D,) means; sigma: (D, D) covariances (a scalar / (1,) / (1, 1) works for D = 1).
    """
    mu1, mu2 = np.atleast_1d(_as_f64(mu1, "mu1")), np.atleast_1d(_as_f64(mu2, "mu2"))
    sigma1, sigma2 = np.atleast_2d(_as_f64(sigma1, "sigma1")), np.atleast_2d(_as_f64(sigma2, "sigma2"))
    if mu1.shape != mu2.shape or mu1.ndim != 1:
        raise ValueError(f"means must be vectors of one length, got {mu1.shape} and {mu2.shape}")
    d = mu1.shape[0]
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"covariances must be ({d}, {d}), got {sigma1.shape} and {sigma2.shape}")
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2)
    # Round-off can leave a tiny negative number for identical distributions.
    return float(max(value, 0.0))


def mean_cov(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of a (N, D) feature matrix, float64. Needs N >= 2."""
    x = _as_f64(features, "features")
    if x.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {x.shape}")
    if x.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {x.shape[0]}")
    mu = x.mean(axis=0)
    centred = x - mu
    sigma = centred.T @ centred / (x.shape[0] - 1)
    return mu, sigma


def fd_from_features(features1, features2) -> float:
    """Frechet distance between the Gaussians fitted to two (N, D) feature matrices."""
    mu1, sigma1 = mean_cov(features1)
    mu2, sigma2 = mean_cov(features2)
    return fd(mu1, sigma1, mu2, sigma2)
