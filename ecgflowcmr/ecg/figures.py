"""Stage-1 figures: reconstructed vs real leads; predicted vs true phase with the chosen cycle."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..contract import ECG_FS as FS
from ..contract import LEADS


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: str | Path) -> Path:
    """Lay out, write (creating the folder) and close ``fig``; returns the path."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_reconstruction(path: str | Path, target: np.ndarray, recon: np.ndarray, mask: np.ndarray,
                        stride: int = 8, leads=("I", "II", "V1", "V5"), seconds: float = 4.0,
                        title: str = "") -> Path:
    """target / recon (12, L) normalised ECG, mask (L / stride,) bool: masked stretches shaded."""
    plt = _pyplot()
    n = int(seconds * FS)
    t = np.arange(n) / FS
    fig, axes = plt.subplots(len(leads), 1, figsize=(10, 1.8 * len(leads)), sharex=True)
    for ax, name in zip(np.atleast_1d(axes), leads):
        i = LEADS.index(name)
        for p in np.flatnonzero(mask[: n // stride + 1]):
            ax.axvspan(p * stride / FS, (p + 1) * stride / FS, color="0.9", lw=0)
        ax.plot(t, target[i, :n], color="k", lw=0.8, label="real")
        ax.plot(t, recon[i, :n], color="tab:red", lw=0.8, label="reconstructed")
        ax.set_ylabel(name)
    np.atleast_1d(axes)[0].legend(loc="upper right", fontsize=8)
    np.atleast_1d(axes)[-1].set_xlabel("time (s); grey = masked positions")
    fig.suptitle(title or "PA-MAE reconstruction (lead-normalised)")
    return _save(plt, fig, path)


def plot_phase(path: str | Path, ecg_lead: np.ndarray, true_phase: np.ndarray, pred_phase: np.ndarray,
               start: int, end: int, rpeaks: np.ndarray, pred_rpeaks=(), fallback: bool = False,
               title: str = "") -> Path:
    """Lead II on top, true and predicted phase below; the chosen cycle shaded on both."""
    plt = _pyplot()
    t = np.arange(len(true_phase)) / FS
    fig, (ax0, ax1) = plt.subplots(2, 1, figsize=(12, 5), sharex=True)
    for ax in (ax0, ax1):
        ax.axvspan(start / FS, end / FS, color="tab:green" if not fallback else "tab:orange", alpha=0.2,
                   lw=0, label="chosen cycle" if not fallback else "fallback window")
    ax0.plot(t, ecg_lead, color="k", lw=0.7)
    ax0.plot(np.asarray(rpeaks) / FS, ecg_lead[np.asarray(rpeaks, dtype=int)], "v", color="tab:blue",
             ms=4, label="reference R-peaks")
    ax0.set_ylabel("lead II (mV)")
    ax0.legend(loc="upper right", fontsize=8)
    ax1.plot(t, true_phase, color="k", lw=1.0, label="true phase")
    ax1.plot(t, pred_phase, color="tab:red", lw=0.8, label="predicted phase")
    for r in pred_rpeaks:
        ax1.axvline(r / FS, color="tab:red", lw=0.5, ls=":")
    ax1.set_ylabel("phase (rad)")
    ax1.set_xlabel("time (s); dotted = R-peaks from predicted phase wraps")
    ax1.set_ylim(-0.2, 2 * np.pi + 0.2)
    ax1.legend(loc="upper right", fontsize=8)
    fig.suptitle(title or "predicted vs true cardiac phase")
    return _save(plt, fig, path)
