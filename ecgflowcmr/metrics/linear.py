"""Linear readers of the ECG: the ceiling a generator is judged against (``benchmarks/ecg_ceiling.py``).

- ``median_beat_features`` (``data/beats.py``): the R-aligned median beat of each of the 12 leads,
  -250..+550 ms around the R-peaks, averaged into 40 points a lead (20 ms bins), each lead's beat minus its
  first 20 ms (baseline), plus the heart rate: ``12 * 40 + 1 = 481`` numbers per ECG. No label enters them.
- ``Standardiser``, ``fit_ridge`` (closed form, L2 on the weights, not the intercept) and
  ``fit_logistic`` (L2 logistic regression by Newton's method), ``cv_select`` (the L2 strength chosen by
  k-fold cross-validation on the training rows only).
- ``auc`` (Mann-Whitney, ties counted half), ``pearson``, ``bootstrap_ci``.
numpy only.
"""
from __future__ import annotations

import numpy as np

from ..data.beats import POINTS, POST_S, PRE_S, median_beat_features  # noqa: F401 (re-exported)

LAMBDAS = (0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0)


class Standardiser:
    """Column means and standard deviations of the training rows (constant columns: sd 1)."""

    def __init__(self, x: np.ndarray):
        x = np.asarray(x, dtype=np.float64)
        self.mean = x.mean(0)
        sd = x.std(0)
        self.sd = np.where(sd > 1e-12, sd, 1.0)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, dtype=np.float64) - self.mean) / self.sd


def fit_ridge(x: np.ndarray, y: np.ndarray, lam: float):
    """Ridge regression on standardised features: returns ``predict(x_new)``. ``lam`` is per row
    (the penalty is ``lam * n * |w|^2`` on the mean squared error), the intercept is not penalised."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    xm, ym = x.mean(0), y.mean()
    xc = x - xm
    n, d = xc.shape
    if d > n:   # dual form: cheaper when features outnumber rows
        w = xc.T @ np.linalg.solve(xc @ xc.T + lam * n * np.eye(n), y - ym)
    else:
        w = np.linalg.solve(xc.T @ xc + lam * n * np.eye(d), xc.T @ (y - ym))
    return lambda xn: (np.asarray(xn, dtype=np.float64) - xm) @ w + ym


def fit_logistic(x: np.ndarray, y: np.ndarray, lam: float, iters: int = 50):
    """L2 logistic regression (Newton / IRLS), penalty ``lam * n * |w|^2 / 2`` besides the mean
    log-loss times n, intercept free; returns ``predict_proba(x_new)`` (probability of ``y == 1``)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n, d = x.shape
    xa = np.hstack([np.ones((n, 1)), x])
    w = np.zeros(d + 1)
    prior = np.clip(y.mean(), 1e-3, 1 - 1e-3)
    w[0] = np.log(prior / (1 - prior))
    reg = lam * n * np.eye(d + 1)
    reg[0, 0] = 0.0
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-np.clip(xa @ w, -30, 30)))
        grad = xa.T @ (p - y) + reg @ w
        hess = (xa * (p * (1 - p))[:, None]).T @ xa + reg + 1e-9 * np.eye(d + 1)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.max(np.abs(step)) < 1e-8:
            break

    def proba(xn):
        xn = np.asarray(xn, dtype=np.float64)
        return 1.0 / (1.0 + np.exp(-np.clip(w[0] + xn @ w[1:], -30, 30)))

    return proba


def auc(score: np.ndarray, label: np.ndarray) -> float:
    """Area under the ROC curve of ``score`` for ``label`` (1 = case): the Mann-Whitney probability that
    a case scores above a control, ties counted half. nan without both classes."""
    s, lab = np.asarray(score, dtype=np.float64), np.asarray(label).astype(bool)
    pos, neg = s[lab], s[~lab]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    if len(a) < 3 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def calibrated_draws(pred: np.ndarray, y: np.ndarray, low: np.ndarray, k: int = 1, draws: int = 200,
                     seed: int = 0) -> dict:
    """What a generator calibrated to a reader would score: each subject's value drawn (the mean of ``k``
    draws) from N(m, s^2), m = a + b * pred the reader's prediction rescaled to ``y`` by least squares (ridge
    shrinks its predictions toward the mean; a calibrated sampler's mean would not be), s the SD of
    ``y - m``. A single draw then correlates with ``y`` at r^2 (r: the reader's correlation), not r: the
    ECG leaves the rest of the heart open, and a faithful sampler draws it; the mean of k draws at
    r^2 / sqrt(r^2 + (1 - r^2) / k). The rescaling uses ``y``: an oracle's calibration, for a ceiling.
    Returns the means over ``draws`` of Pearson r (draw vs ``y``) and of the AUC of minus the draw for
    ``low`` (bool (N,)), and s."""
    rng = np.random.default_rng(seed)
    b, a = np.polyfit(pred, y, 1)
    pred = a + b * pred
    sd = float(np.std(y - pred))
    r, aucs = [], []
    for _ in range(draws):
        draw = pred + sd * rng.standard_normal((k, len(pred))).mean(0)
        r.append(pearson(draw, y))
        aucs.append(auc(-draw, low))
    return {"r": float(np.mean(r)), "auc": float(np.mean(aucs)), "residual_sd": sd}


def bootstrap_ci(fn, *arrays, n_boot: int = 1000, seed: int = 0) -> list[float]:
    """95 % percentile interval of ``fn(*arrays)`` over subjects resampled with replacement."""
    rng = np.random.default_rng(seed)
    n = len(arrays[0])
    vals = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        v = fn(*(np.asarray(a)[idx] for a in arrays))
        if np.isfinite(v):
            vals.append(v)
    return [float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))] if vals else [float("nan")] * 2


def folds(n: int, k: int = 5, seed: int = 0) -> list[np.ndarray]:
    """``k`` disjoint index sets covering ``range(n)``, shuffled with ``seed``."""
    return np.array_split(np.random.default_rng(seed).permutation(n), k)


def cv_predict(x: np.ndarray, y: np.ndarray, fit, lam: float, k: int = 5, seed: int = 0) -> np.ndarray:
    """Out-of-fold predictions of ``fit(x_train, y_train, lam)`` (standardised within each fold)."""
    out = np.empty(len(y))
    for test in folds(len(y), k, seed):
        train = np.setdiff1d(np.arange(len(y)), test)
        st = Standardiser(x[train])
        out[test] = fit(st(x[train]), y[train], lam)(st(x[test]))
    return out


def cv_select(x: np.ndarray, y: np.ndarray, fit, score, lambdas=LAMBDAS, k: int = 5, seed: int = 0):
    """The L2 strength of ``lambdas`` whose out-of-fold predictions score best (``score(pred, y)``,
    higher is better); returns ``(lam, {lam: score})``."""
    scores = {lam: score(cv_predict(x, y, fit, lam, k, seed), y) for lam in lambdas}
    best = max(scores, key=lambda lam: -np.inf if not np.isfinite(scores[lam]) else scores[lam])
    return best, scores
