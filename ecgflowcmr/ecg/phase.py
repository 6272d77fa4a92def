"""R-peaks and cardiac-phase labels (a stable API used by preparation, stage 1 and the checks).

- ``detect_rpeaks(ecg, fs)``: neurokit2 (``ecg_clean`` + ``ecg_peaks``, method "neurokit") on lead II.
  When lead II is unusable (NaN/inf, flat, or no plausible rhythm: fewer than 2 peaks, a median
  heart rate outside 25-250 bpm, or far fewer peaks than the median R-R predicts) the next lead in
  ``LEAD_PREFERENCE`` is tried and an ``RPeakWarning`` names the lead used. ``RPeakError`` when no
  lead gives a plausible rhythm.
- ``phase_from_rpeaks(rpeaks, length)``: the cardiac phase in [0, 2*pi): 0 at each R-peak, linear
  within each R-R interval; before the first and after the last R-peak the phase continues with
  the median R-R interval (so it is never stuck at zero). Vectorised with ``np.interp``.
- ``phase_targets(phase)``: ``(..., L)`` -> ``(..., 2, L)`` = (sin, cos), the regression target of
  the stage-1 phase head; ``phase_from_targets`` inverts it; ``phase_batch`` builds phases for a
  batch of padded R-peak rows as stored in ``rpeaks.npy``.
"""
from __future__ import annotations

import warnings

import numpy as np

TWO_PI = 2.0 * np.pi
LEAD_INDEX = {name: i for i, name in enumerate(
    ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"])}
# Lead II first (the usual rhythm lead), then leads whose R wave is usually tall and upright.
LEAD_PREFERENCE = ("II", "I", "V5", "V6", "V4", "aVF", "III", "V3", "V2", "aVL", "V1", "aVR")
MIN_HR_BPM = 25.0
MAX_HR_BPM = 250.0
FLAT_STD = 1e-3             # mV: below this a lead carries no signal


class RPeakError(ValueError):
    """No lead of the ECG gives a plausible series of R-peaks."""


class RPeakWarning(UserWarning):
    """R-peaks came from a lead other than II."""


def detect_rpeaks(ecg: np.ndarray, fs: float = 500, lead: str = "II") -> np.ndarray:
    """R-peak sample indices, int64 ``(K,)``, ascending.

    ``ecg``: ``(12, L)`` in the lead order I II III aVR aVL aVF V1-V6, or a single lead ``(L,)``.
    ``lead``: the lead tried first (default II); the others follow ``LEAD_PREFERENCE``.
    Raises ``RPeakError`` if no lead gives a plausible rhythm.
    """
    ecg = np.asarray(ecg)
    if ecg.ndim == 1:
        peaks, reason = _peaks_in_lead(ecg, fs)
        if peaks is None:
            raise RPeakError(f"no plausible R-peaks: {reason}")
        return peaks
    if ecg.ndim != 2 or ecg.shape[0] != 12:
        raise ValueError(f"detect_rpeaks expects (12, L) or (L,), got shape {ecg.shape}")
    order = [lead] + [name for name in LEAD_PREFERENCE if name != lead]
    reasons = []
    for name in order:
        peaks, reason = _peaks_in_lead(ecg[LEAD_INDEX[name]], fs)
        if peaks is not None:
            if reasons:
                warnings.warn(f"R-peaks from lead {name}: " + "; ".join(reasons), RPeakWarning,
                              stacklevel=2)
            return peaks
        reasons.append(f"lead {name} unusable ({reason})")
    raise RPeakError("no plausible R-peaks in any lead: " + "; ".join(reasons[:3]) + " ...")


def _peaks_in_lead(signal: np.ndarray, fs: float) -> tuple[np.ndarray | None, str]:
    """(peaks, "") or (None, reason) for one lead."""
    signal = np.asarray(signal, dtype=np.float64)
    if not np.all(np.isfinite(signal)):
        return None, "NaN/inf samples"
    if signal.std() < FLAT_STD:
        return None, "flat line"
    import neurokit2 as nk

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cleaned = nk.ecg_clean(signal, sampling_rate=int(round(fs)), method="neurokit")
            _, info = nk.ecg_peaks(cleaned, sampling_rate=int(round(fs)), method="neurokit")
    except Exception as err:  # neurokit raises on degenerate input
        return None, f"neurokit2 failed: {type(err).__name__}"
    peaks = np.unique(np.asarray(info["ECG_R_Peaks"], dtype=np.int64))
    ok, reason = rhythm_is_plausible(peaks, len(signal), fs)
    return (peaks, "") if ok else (None, reason)


def rhythm_is_plausible(rpeaks: np.ndarray, length: int, fs: float) -> tuple[bool, str]:
    """At least 2 peaks, median heart rate within 25-250 bpm, and at least half as many peaks as
    the median R-R interval predicts over the record (no long stretches without beats)."""
    rpeaks = np.asarray(rpeaks)
    if len(rpeaks) < 2:
        return False, f"{len(rpeaks)} R-peak(s)"
    median_rr = float(np.median(np.diff(rpeaks)))
    hr = 60.0 * fs / median_rr
    if not MIN_HR_BPM <= hr <= MAX_HR_BPM:
        return False, f"median heart rate {hr:.0f} bpm"
    expected = length / median_rr
    if len(rpeaks) < 0.5 * expected:
        return False, f"{len(rpeaks)} R-peaks where the R-R interval predicts {expected:.0f}"
    return True, ""


def heart_rate(rpeaks: np.ndarray, fs: float = 500) -> float:
    """Median heart rate in bpm from R-peak indices (NaN with fewer than 2 peaks)."""
    rpeaks = np.asarray(rpeaks)
    rpeaks = rpeaks[rpeaks >= 0]
    if len(rpeaks) < 2:
        return float("nan")
    return 60.0 * fs / float(np.median(np.diff(rpeaks)))


def phase_from_rpeaks(rpeaks: np.ndarray, length: int) -> np.ndarray:
    """Cardiac phase, float64 ``(length,)`` in [0, 2*pi).

    0 exactly at each R-peak, rising linearly to 2*pi across each R-R interval. Before the first
    and after the last R-peak the phase continues as if beats kept coming every median R-R
    interval. ``rpeaks``: sample indices (negative entries, e.g. the -1 padding of ``rpeaks.npy``,
    are ignored; duplicates are merged). Needs at least 2 R-peaks (ValueError otherwise).
    """
    peaks = np.asarray(rpeaks, dtype=np.float64).reshape(-1)
    peaks = np.unique(peaks[peaks >= 0])
    if len(peaks) < 2:
        raise ValueError(f"phase_from_rpeaks needs at least 2 R-peaks, got {len(peaks)}")
    median_rr = float(np.median(np.diff(peaks)))
    # Virtual beats every median R-R before the first and after the last peak, enough to cover
    # [0, length - 1]; the phase is the fractional part of the interpolated beat count.
    n_before = int(np.ceil(peaks[0] / median_rr)) + 1
    n_after = int(np.ceil(max(length - 1 - peaks[-1], 0) / median_rr)) + 1
    knots = np.concatenate([peaks[0] - median_rr * np.arange(n_before, 0, -1), peaks,
                            peaks[-1] + median_rr * np.arange(1, n_after + 1)])
    beats = np.interp(np.arange(length, dtype=np.float64), knots, np.arange(len(knots), dtype=np.float64))
    phase = TWO_PI * (beats - np.floor(beats))
    phase[phase >= TWO_PI] = 0.0
    return phase


def phase_batch(rpeaks: np.ndarray, length: int) -> np.ndarray:
    """``(B, K)`` R-peak rows padded with -1 (as in ``rpeaks.npy``) -> float64 ``(B, length)``."""
    rpeaks = np.asarray(rpeaks)
    if rpeaks.ndim != 2:
        raise ValueError(f"phase_batch expects (B, K) R-peak rows, got shape {rpeaks.shape}")
    return np.stack([phase_from_rpeaks(row, length) for row in rpeaks]) if len(rpeaks) else \
        np.zeros((0, length))


def phase_targets(phase):
    """Phase ``(..., L)`` -> float32 ``(..., 2, L)`` = (sin, cos). Works on numpy arrays and torch
    tensors (returns the same kind)."""
    if _is_torch(phase):
        import torch

        return torch.stack([phase.sin(), phase.cos()], dim=-2).float()
    phase = np.asarray(phase)
    return np.stack([np.sin(phase), np.cos(phase)], axis=-2).astype(np.float32)


def phase_from_targets(targets):
    """``(..., 2, L)`` (sin, cos), not necessarily unit length -> phase ``(..., L)`` in [0, 2*pi)."""
    if _is_torch(targets):
        import torch

        angle = torch.remainder(torch.atan2(targets[..., 0, :], targets[..., 1, :]), TWO_PI)
        return torch.where(angle >= TWO_PI, torch.zeros_like(angle), angle)
    targets = np.asarray(targets)
    angle = np.arctan2(targets[..., 0, :], targets[..., 1, :])
    out = np.mod(angle, TWO_PI)
    out[out >= TWO_PI] = 0.0
    return out


def _is_torch(value) -> bool:
    return type(value).__module__.split(".")[0] == "torch"
