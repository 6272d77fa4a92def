"""Improved precision and recall of generated samples (Kynkaanniemi et al., "Improved Precision and
Recall Metric for Assessing Generative Models", NeurIPS 2019).

Each set of feature vectors estimates its manifold as the union of balls around its points, each ball
reaching that point's k-th nearest neighbour within the same set (k = 3 in the paper; the point itself
is not its own neighbour). Then
- precision = share of generated points inside the real manifold (are the samples realistic?);
- recall    = share of real points inside the generated manifold (is the real variety covered?).
A point lies inside a manifold when its distance to some point of it is <= that point's radius.
Euclidean distances, computed in float64 blocks, so N up to a few 10 000 fit in memory.
"""
from __future__ import annotations

import numpy as np

K_DEFAULT = 3


def _pairwise(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances (len(a), len(b))."""
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.sqrt(np.maximum(d2, 0.0))


def knn_radii(feats: np.ndarray, k: int = K_DEFAULT, block: int = 2048) -> np.ndarray:
    """Distance of each row to its k-th nearest other row: ``(N,)``."""
    x = np.asarray(feats, dtype=np.float64)
    if len(x) <= k:
        raise ValueError(f"k-NN radii need more than k = {k} points, got {len(x)}")
    out = np.empty(len(x))
    for s in range(0, len(x), block):
        d = _pairwise(x[s:s + block], x)
        d[np.arange(len(d)), np.arange(s, s + len(d))] = np.inf      # not its own neighbour
        out[s:s + block] = np.partition(d, k - 1, axis=1)[:, k - 1]
    return out


def coverage_of(manifold: np.ndarray, radii: np.ndarray, queries: np.ndarray, block: int = 2048) -> np.ndarray:
    """For each query row, whether it lies in some ball (manifold row, its radius): ``(Nq,)`` bool."""
    m = np.asarray(manifold, dtype=np.float64)
    q = np.asarray(queries, dtype=np.float64)
    inside = np.zeros(len(q), dtype=bool)
    for s in range(0, len(q), block):
        inside[s:s + block] = (_pairwise(q[s:s + block], m) <= radii[None, :]).any(axis=1)
    return inside


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = K_DEFAULT) -> dict:
    """``real`` (N, D), ``fake`` (M, D) features -> {"precision", "recall", "k", "n_real", "n_fake"}."""
    real = np.asarray(real, dtype=np.float64).reshape(len(real), -1)
    fake = np.asarray(fake, dtype=np.float64).reshape(len(fake), -1)
    precision = float(coverage_of(real, knn_radii(real, k), fake).mean())
    recall = float(coverage_of(fake, knn_radii(fake, k), real).mean())
    return {"precision": precision, "recall": recall, "k": int(k), "n_real": int(len(real)), "n_fake": int(len(fake))}


def precision_recall_by_frame(real: np.ndarray, fake: np.ndarray, k: int = K_DEFAULT) -> dict:
    """``real (V, F, D)``, ``fake (V', F, D)``: features of F frames of each video -> precision and recall
    with one frame per video, computed at each of the F frame positions and averaged.

    Frames of one video are near-duplicates: pooled into one set, a real frame's k nearest neighbours
    are its own video's other frames, the balls shrink to the video's own spread and almost no generated
    frame lands inside one (precision and recall near 0 whatever the generator). One frame per video
    keeps the neighbours other subjects, as the metric intends."""
    real, fake = np.asarray(real, dtype=np.float64), np.asarray(fake, dtype=np.float64)
    if real.ndim != 3 or fake.ndim != 3 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"expected (videos, frames, dim) with equal frames, got {real.shape} and {fake.shape}")
    per = [precision_recall(real[:, j], fake[:, j], k) for j in range(real.shape[1])]
    return {"precision": float(np.mean([p["precision"] for p in per])),
            "recall": float(np.mean([p["recall"] for p in per])), "k": int(k), "n_real": int(len(real)),
            "n_fake": int(len(fake)), "frames": int(real.shape[1])}
