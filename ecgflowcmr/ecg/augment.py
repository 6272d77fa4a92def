"""Realistic ECG augmentation for stage 1: what real recordings do that clean training ECGs do not.

``augment_ecg(ecg, rpeaks, rng)`` takes one record ``(12, L)`` mV and its R-peaks and returns an
augmented record of the same shape with the R-peaks moved along, so the phase labels built from
them (``phase_from_rpeaks``) stay true to the signal. Each step fires with its probability in
``PROBABILITIES`` (per record), in this order:

- ``stretch``: heart-rate time-stretch to a rate drawn uniformly in 40-150 bpm (``HR_RANGE_BPM``).
  A piecewise-linear time warp: the +-40 ms around each R-peak keep their speed (QRS width does
  not follow the rate) and each R-R interval is stretched by the ratio of the rates; R-peaks are
  warp knots, so they map exactly. To speed up a record without running out of signal, its beats
  are first repeated (the stretch from the first to the last R-peak, appended at the last R-peak,
  so every seam is an R-peak); a random 10 s window of the result is kept.
- ``amplitude``: the whole record times a log-uniform factor in [0.5, 2].
- ``gain``: each lead times its own log-uniform factor in [0.8, 1.25] (electrode contact, body).
- ``polarity``: one random lead inverted (a swapped electrode pair).
- ``wander``: baseline wander: two sinusoids of 0.05-0.5 Hz (breathing, movement), up to 0.4 mV each,
  with a random weight and phase per lead.
- ``powerline``: 50 or 60 Hz at 0.01-0.1 mV, random phase per lead.
- ``muscle``: white Gaussian noise (broadband, as EMG) of 0.005-0.05 mV standard deviation, the
  level drawn per lead.
- ``missing``: 1 to ``MAX_MISSING_LEADS`` random leads zeroed (a lead off, or a record with only a
  few leads such as a two-lead Holter in the 12-lead layout); at least two leads always remain.

Written in numpy on the whole ``(12, L)`` array (neurokit2's ``signal_distort`` does one lead at
a time, about 2 ms each: 20x this module's cost per record).
"""
from __future__ import annotations

import numpy as np

from ..contract import ECG_FS as FS

HR_RANGE_BPM = (40.0, 150.0)
QRS_HALF_S = 0.04            # kept at its speed around each R-peak by the time-stretch
MAX_MISSING_LEADS = 10
PROBABILITIES = {"stretch": 0.7, "amplitude": 0.5, "gain": 0.5, "polarity": 0.1, "wander": 0.5,
                 "powerline": 0.3, "muscle": 0.4, "missing": 0.3}


def augment_ecg(ecg: np.ndarray, rpeaks: np.ndarray, rng: np.random.Generator,
                fs: float = FS, probabilities: dict | None = None, return_clean: bool = False):
    """(12, L) mV and R-peaks (K,) -> augmented float32 (12, L) and int64 R-peaks (K',) (see the
    module docstring). Negative R-peak entries (padding) are ignored. ``return_clean``: return
    (augmented, clean, R-peaks), clean being the record after the steps that change the heart's
    signal (stretch, amplitude, gain, polarity) and before noise and lead loss."""
    p = dict(PROBABILITIES, **(probabilities or {}))
    ecg = np.asarray(ecg, dtype=np.float64)
    if ecg.ndim != 2:
        raise ValueError(f"augment_ecg expects one record (leads, L), got shape {ecg.shape}")
    peaks = np.asarray(rpeaks, dtype=np.int64).reshape(-1)
    peaks = np.unique(peaks[peaks >= 0])
    leads, length = ecg.shape
    t = np.arange(length) / fs
    if rng.random() < p["stretch"] and len(peaks) >= 2:
        rate = 60.0 * fs / float(np.median(np.diff(peaks)))
        target = rng.uniform(*HR_RANGE_BPM)
        ecg, peaks = time_stretch(ecg, peaks, rate / target, rng.uniform(), fs)
    else:
        ecg = ecg.copy()
    if rng.random() < p["amplitude"]:
        ecg *= np.exp(rng.uniform(np.log(0.5), np.log(2.0)))
    if rng.random() < p["gain"]:
        ecg *= np.exp(rng.uniform(np.log(0.8), np.log(1.25), size=(leads, 1)))
    if rng.random() < p["polarity"]:
        ecg[rng.integers(leads)] *= -1
    clean = ecg.astype(np.float32) if return_clean else None
    if rng.random() < p["wander"]:
        freq = rng.uniform(0.05, 0.5, size=(1, 2, 1))
        amp = rng.uniform(0.0, 0.4, size=(1, 2, 1)) * rng.uniform(-1.0, 1.0, size=(leads, 2, 1))
        phase = rng.uniform(0, 2 * np.pi, size=(leads, 2, 1))
        ecg += (amp * np.sin(2 * np.pi * freq * t + phase)).sum(axis=1)
    if rng.random() < p["powerline"]:
        freq = 50.0 if rng.random() < 0.5 else 60.0
        ecg += rng.uniform(0.01, 0.1) * np.sin(2 * np.pi * freq * t + rng.uniform(0, 2 * np.pi, (leads, 1)))
    if rng.random() < p["muscle"]:
        ecg += rng.normal(size=ecg.shape) * rng.uniform(0.005, 0.05, size=(leads, 1))
    if rng.random() < p["missing"]:
        count = int(rng.integers(1, min(MAX_MISSING_LEADS, leads - 2) + 1))
        ecg[rng.choice(leads, size=count, replace=False)] = 0.0
    if return_clean:
        return ecg.astype(np.float32), clean, peaks
    return ecg.astype(np.float32), peaks


def time_stretch(ecg: np.ndarray, rpeaks: np.ndarray, factor: float, position: float = 0.0,
                 fs: float = FS, qrs_half_s: float = QRS_HALF_S) -> tuple[np.ndarray, np.ndarray]:
    """Slow a record down (``factor`` > 1: each R-R interval ``factor`` times longer) or speed it up,
    keeping +-``qrs_half_s`` around each R-peak at its speed. ``ecg`` (C, L), ``rpeaks`` (K >= 2,)
    ascending; ``position`` in [0, 1] picks where the output window lies in the stretched record.
    Returns float64 (C, L) and the int64 R-peaks inside it (exact up to rounding to a sample)."""
    ecg = np.asarray(ecg, dtype=np.float64)
    peaks = np.asarray(rpeaks, dtype=np.int64)
    if len(peaks) < 2 or factor <= 0:
        raise ValueError(f"time_stretch needs >= 2 R-peaks and factor > 0, got {len(peaks)}, {factor}")
    length = ecg.shape[1]
    span = int(peaks[-1] - peaks[0])
    # repeat beats until the stretched record covers the output window with a beat to spare
    needed = (length + 2 * span / len(peaks)) / factor - length
    repeats = int(np.ceil(max(needed, 0) / span))
    if repeats:
        body = ecg[:, peaks[0]:peaks[-1]]
        ecg = np.concatenate([ecg[:, :peaks[-1]], *([body] * repeats), ecg[:, peaks[-1]:]], axis=1)
        peaks = np.concatenate([peaks[:-1], *[peaks[:-1] - peaks[0] + peaks[-1] + k * span for k in range(repeats)],
                                [peaks[-1] + repeats * span]])
    half = qrs_half_s * fs
    rr = np.diff(peaks).astype(np.float64)
    # in each R-R interval the part between the QRS halves takes the rest of factor * rr
    between = np.maximum(rr - 2 * half, 1.0)
    slow = np.maximum(factor * rr - 2 * half, 0.05 * between) / between
    edge_slope = float(np.median(slow))                # before the first / after the last R-peak
    # knots: input time -> output time, slope 1 within +-half of each peak
    in_knots = np.stack([peaks - half, peaks + half], axis=1).reshape(-1).astype(np.float64)
    steps = np.empty_like(in_knots)
    steps[0] = 0.0
    steps[2::2] = between * slow
    steps[1::2] = 2 * half
    out_knots = np.cumsum(steps)
    in_end = ecg.shape[1] - 1.0
    head = min(0.0, in_knots[0]) - 1.0                # knots beyond the record keep np.interp linear
    tail = max(in_end, in_knots[-1]) + 1.0
    in_knots = np.concatenate([[head], in_knots, [tail]])
    out_knots = np.concatenate([[out_knots[0] - (in_knots[1] - head) * edge_slope], out_knots,
                                [out_knots[-1] + (tail - in_knots[-2]) * edge_slope]])
    out_peaks = out_knots[1:-1].reshape(-1, 2).mean(axis=1)
    first, last = np.interp([0.0, in_end], in_knots, out_knots)
    start = first + position * max(last - first + 1 - length, 0.0)
    source = np.clip(np.interp(start + np.arange(length, dtype=np.float64), out_knots, in_knots), 0, in_end)
    i0 = np.minimum(np.floor(source).astype(np.int64), ecg.shape[1] - 2)
    w = source - i0
    out = ecg[:, i0] * (1 - w) + ecg[:, i0 + 1] * w
    out_peaks = np.round(out_peaks - start).astype(np.int64)
    return out, out_peaks[(out_peaks >= 0) & (out_peaks < length)]


def augment_batch(ecg, rpeaks, rng: np.random.Generator, probabilities: dict | None = None,
                  fraction: float = 1.0):
    """A training batch through ``augment_ecg``: ecg (B, 12, L) and R-peak rows (B, K) padded with
    -1 (tensors) -> augmented ecg (B, 12, L) float32, the phase labels (B, L / 8, 2) of the moved
    R-peaks (as ``dataset.ECGPhaseDataset`` builds them) and the clean records (B, 12, L) (see
    ``augment_ecg``'s ``return_clean``). Each record is augmented with probability ``fraction``;
    the others pass unchanged."""
    import torch

    from ..data.phase import phase_from_rpeaks
    from .dataset import phase_labels

    ecgs, cleans, labels = [], [], []
    length = ecg.shape[-1]
    for record, row in zip(ecg.cpu().numpy(), rpeaks.cpu().numpy()):
        if rng.random() < fraction:
            out, clean, peaks = augment_ecg(record, row, rng, probabilities=probabilities, return_clean=True)
        else:
            out, clean, peaks = record, record, row[row >= 0]
        if len(peaks) < 2:   # cannot happen with a stretch window covering >= 2 R-R; keep the record then
            out, clean, peaks = record, record, row[row >= 0]
        ecgs.append(out)
        cleans.append(clean)
        labels.append(phase_labels(phase_from_rpeaks(peaks, length)))
    return (torch.from_numpy(np.stack(ecgs).astype(np.float32)), torch.from_numpy(np.stack(labels)),
            torch.from_numpy(np.stack(cleans).astype(np.float32)))
