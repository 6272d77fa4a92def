"""Fine-tuning scores: ACC, AUC (rank form, ties count half), MAE, R^2, and fold mean +- std."""
from __future__ import annotations

import math

import numpy as np

from ..metrics.linear import auc


def accuracy(true: np.ndarray, pred: np.ndarray) -> float:
    true, pred = np.asarray(true), np.asarray(pred)
    return float((true == pred).mean())


def binary_auc(positive: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC = P(score of a random positive > score of a random negative) + 0.5 P(tie);
    NaN when one class is absent."""
    return auc(score, positive)


def macro_auc(true: np.ndarray, probs: np.ndarray, classes: list) -> float:
    """Mean one-vs-rest AUC over the classes present with both signs (``probs (n, n_classes)``)."""
    values = [binary_auc(np.asarray(true) == c, probs[:, j]) for j, c in enumerate(classes)]
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def mae(true: np.ndarray, pred: np.ndarray) -> float:
    return float(np.abs(np.asarray(true, np.float64) - np.asarray(pred, np.float64)).mean())


def r2(true: np.ndarray, pred: np.ndarray) -> float:
    """1 - SS_res / SS_tot (SS_tot about the mean of ``true``); NaN when ``true`` is constant."""
    true, pred = np.asarray(true, np.float64), np.asarray(pred, np.float64)
    ss_tot = ((true - true.mean()) ** 2).sum()
    if ss_tot == 0:
        return float("nan")
    return float(1.0 - ((true - pred) ** 2).sum() / ss_tot)


def fold_summary(values: list[float]) -> dict:
    """``{"mean", "std", "n"}`` over folds; std is the sample std (ddof 1), 0 for one fold; NaN
    folds are left out (and counted out of n)."""
    finite = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not finite:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    std = float(np.std(finite, ddof=1)) if len(finite) > 1 else 0.0
    return {"mean": float(np.mean(finite)), "std": std, "n": len(finite)}
