"""Stage-1 metrics, shared by the validation in ``train_ecg.py`` and ``benchmarks/ecg_metrics.py``.

For a PA-MAE and ECGs with reference R-peaks:

- ``rec_mse``: reconstruction MSE of the lead-normalised ECG (units of the training set's per-lead
  RMS, so predicting a flat line scores about 1), with the training mask ratio and a fixed seed;
- ``phase_mae``: mean absolute circular error (rad) of the predicted phase against
  ``phase_from_rpeaks(reference)``, over all 5000 samples (``phase_mae_inner``: only between the
  first and last reference R-peak, where the label is not extrapolated);
- ``sensitivity`` / ``ppv``: R-peaks from the predicted phase wraps against the reference, a match
  within +-50 ms. Reference peaks within 0.1 s of the record ends are left out (the cycle detector
  puts no R-peak there, see ``cycles.EDGE_S``); predicted ones are counted inside the span of the
  reference (+-50 ms): ``detect_rpeaks`` often misses a beat cut by the record edge (filter
  transients), where the phase labels extrapolate with the median R-R, so a predicted wrap before
  the first / after the last reference peak is not judged against a reference that says nothing;
- ``start_offset_ms``: median over records of |chosen cycle start - nearest reference R-peak|
  (``start_offset_p90_ms``: its 90th percentile; ``end_offset_ms`` likewise for the end; records
  on the fallback path are left out and counted in ``fallback``);
- ``f1``: 2 sensitivity PPV / (sensitivity + PPV) of the wraps.
"""
from __future__ import annotations

import numpy as np
import torch

from ..contract import ECG_FS as FS
from ..data.phase import phase_from_rpeaks
from .cycles import EDGE_S, select_cycles
from .pamae import PAMAE, circular_abs_error, sincos_to_phase

TOLERANCE_S = 0.05
VAL_MASK_SEED = 1234


def match_peaks(pred: np.ndarray, ref: np.ndarray, length: int, fs: float = FS,
                tolerance_s: float = TOLERANCE_S, edge_s: float = EDGE_S) -> tuple[int, int, int]:
    """(true positives, reference count, predicted count): one-to-one matches within the tolerance;
    reference peaks within ``edge_s`` of the record ends are not counted (the cycle detector never
    puts an R-peak there), predicted ones only inside the span of the remaining reference peaks
    (first - tolerance to last + tolerance)."""
    tol = tolerance_s * fs
    edge = edge_s * fs
    pred = np.asarray(pred, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    ref = ref[(ref > edge) & (ref < length - edge)]
    if len(ref):
        pred = pred[(pred >= ref[0] - tol) & (pred <= ref[-1] + tol)]
    used = np.zeros(len(pred), dtype=bool)
    tp = 0
    for r in ref:                       # peaks are >= 250 ms apart: greedy nearest is one-to-one
        if not len(pred):
            break
        dist = np.abs(pred - r)
        dist[used] = np.inf
        j = int(np.argmin(dist))
        if dist[j] <= tol:
            used[j] = True
            tp += 1
    return tp, len(ref), len(pred)


def nearest_offset(sample: int, ref: np.ndarray) -> float:
    ref = np.asarray(ref)
    return float(np.min(np.abs(ref - sample))) if len(ref) else float("nan")


class Accumulator:
    """Collects per-batch results and summarises them into the metrics dict."""

    def __init__(self):
        self.sq_err, self.count = 0.0, 0
        self.phase_err, self.phase_n, self.inner_err, self.inner_n = 0.0, 0, 0.0, 0
        self.tp = self.n_ref = self.n_pred = 0
        self.start_off, self.end_off = [], []
        self.fallback = self.records = 0

    def add_reconstruction(self, recon: torch.Tensor, target: torch.Tensor) -> None:
        self.sq_err += float((recon.float() - target.float()).pow(2).sum())
        self.count += target.numel()

    def add_phase(self, phase: np.ndarray, ref_peaks: list[np.ndarray], selection) -> None:
        """phase (B, L) predicted; ref_peaks: reference R-peaks per record."""
        length = phase.shape[1]
        wraps = selection.wraps.as_lists() if selection.wraps is not None else [[] for _ in ref_peaks]
        for b, ref in enumerate(ref_peaks):
            self.records += 1
            true = phase_from_rpeaks(ref, length)
            err = circular_abs_error(phase[b].astype(np.float64), true)
            self.phase_err += float(err.sum())
            self.phase_n += length
            inner = err[int(ref[0]): int(ref[-1]) + 1]
            self.inner_err += float(inner.sum())
            self.inner_n += len(inner)
            tp, nr, npred = match_peaks(np.asarray(wraps[b]), ref, length)
            self.tp += tp
            self.n_ref += nr
            self.n_pred += npred
            if bool(selection.fallback[b]):
                self.fallback += 1
            else:
                self.start_off.append(nearest_offset(int(selection.start[b]), ref) * 1000 / FS)
                self.end_off.append(nearest_offset(int(selection.end[b]), ref) * 1000 / FS)

    def summary(self) -> dict:
        nan = float("nan")
        sens = self.tp / self.n_ref if self.n_ref else nan
        ppv = self.tp / self.n_pred if self.n_pred else nan
        return {
            "records": self.records,
            "rec_mse": self.sq_err / self.count if self.count else nan,
            "phase_mae": self.phase_err / self.phase_n if self.phase_n else nan,
            "phase_mae_inner": self.inner_err / self.inner_n if self.inner_n else nan,
            "sensitivity": sens,
            "ppv": ppv,
            "f1": 2 * sens * ppv / (sens + ppv) if sens + ppv > 0 else nan,
            "start_offset_ms": float(np.median(self.start_off)) if self.start_off else nan,
            "start_offset_p90_ms": float(np.percentile(self.start_off, 90)) if self.start_off else nan,
            "end_offset_ms": float(np.median(self.end_off)) if self.end_off else nan,
            "fallback": self.fallback,
        }


@torch.no_grad()
def evaluate(model: PAMAE, batches, device: torch.device, cycle_mode: str = "median",
             mask_ratio: float | None = None, phase_weight: float | None = None) -> dict:
    """Metrics of the module docstring. ``batches`` yields (ecg (B, 12, L), list of B reference
    R-peak arrays, phase labels (B, P, 2) or None); reconstruction uses ``mask_ratio`` (default: the
    model's) with a fixed seed. With labels and ``phase_weight``, the losses ``loss`` / ``loss_rec``
    / ``loss_phase`` (batch means, averaged over batches) are added."""
    from .pamae import pamae_losses

    model.eval()
    acc = Accumulator()
    generator = torch.Generator().manual_seed(VAL_MASK_SEED)
    losses, n_batches = {}, 0
    for ecg, ref_peaks, labels in batches:
        ecg = ecg.to(device, non_blocking=True).float()
        out = model(ecg, mask_ratio=mask_ratio, generator=generator)
        if labels is not None and phase_weight is not None:
            for key, value in pamae_losses(out, labels.to(device), phase_weight).items():
                losses[key] = losses.get(key, 0.0) + float(value)
            n_batches += 1
        acc.add_reconstruction(out["recon"], out["target"])
        phase = sincos_to_phase(out["sincos"], ecg.shape[-1])
        selection = select_cycles(phase, cycle_mode, 50, FS)
        acc.add_phase(phase.cpu().numpy(), ref_peaks, selection)
    summary = acc.summary()
    if n_batches:
        summary.update({"loss": losses["loss"] / n_batches, "loss_rec": losses["rec"] / n_batches,
                        "loss_phase": losses["phase"] / n_batches})
    return summary


def markdown_table(rows: dict[str, dict], keys=None) -> str:
    """{name: metrics} -> a markdown table with one column per data set."""
    keys = keys or ["records", "rec_mse", "phase_mae", "phase_mae_inner", "sensitivity", "ppv", "f1",
                    "start_offset_ms", "start_offset_p90_ms", "end_offset_ms", "fallback"]
    names = list(rows)
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key in keys:
        cells = []
        for name in names:
            value = rows[name].get(key, float("nan"))
            cells.append(f"{value:d}" if isinstance(value, int) else f"{value:.4g}")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
