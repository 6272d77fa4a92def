"""R-peaks and cardiac-phase labels (a stable API used by preparation, stage 1 and the checks).

- ``detect_rpeaks(ecg, fs)``: a consensus of several leads and detectors. Each of the first four
  usable leads (lead II first, then ``LEAD_PREFERENCE``; unusable: NaN/inf, flat, no plausible
  QRS (``has_plausible_qrs``: nothing but slow drift, as from a loose electrode), or no detector
  finds a plausible rhythm: fewer than 2 peaks, a median heart rate outside 25-250 bpm, or far
  fewer peaks than the median R-R predicts) is cleaned (``nk.ecg_clean``) and run through three
  neurokit2 detectors (``DETECTORS``); a beat is kept when at least half of these (lead, detector)
  runs find it within 50 ms. Each kept beat is then placed on the R apex of lead II (so frame 0
  of a cine is the top of the R wave, where the phantom puts it) or, when lead II is unusable, of
  the first usable lead, and an ``RPeakWarning`` names that lead and why lead II was not used.
  ``return_info=True`` also says which leads and detectors voted (the prepared dataset's
  ``provenance.csv`` keeps it per record).
  ``RPeakError`` when no lead gives a plausible rhythm.
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

from ..contract import LEADS

TWO_PI = 2.0 * np.pi
LEAD_INDEX = {name: i for i, name in enumerate(LEADS)}
# Lead II first (the usual rhythm lead), then leads whose R wave is usually tall and upright.
LEAD_PREFERENCE = ("II", "I", "V5", "V6", "V4", "aVF", "III", "V3", "V2", "aVL", "V1", "aVR")
MIN_HR_BPM = 25.0
MAX_HR_BPM = 250.0
FLAT_STD = 1e-3             # mV: below this a lead carries no signal
# A QRS puts its steep deflections in 5-25 Hz; drift, wander and breathing put almost nothing there.
QRS_BAND_HZ = (5.0, 25.0)
QRS_PERCENTILE = 99.0       # inside the QRS complexes at any rate of 25-250 bpm (they fill > 2 %)
# Smallest QRS-band amplitudes measured: real leads (examples/ecg, tests/data/mitdb-100) 0.096 mV
# and 0.26 of the record's median lead; phantom leads 0.020 mV and 0.048; a lead II replaced by a
# 0.1 mV/s ramp 4e-5 mV (7e-5 of the median). The limits sit well below every ECG lead.
QRS_MIN_MV = 0.01
QRS_MIN_FRACTION = 0.02
# neurokit2 detectors that vote. On the 30-min MIT-BIH record 100 (MLII, 10 s windows at 500 Hz)
# alone they score F1 0.990 (misses beats in the first 0.5 s: filter start-up), 0.9998 and 0.987
# (extra peaks): they fail in different places, so a majority fixes each one's errors.
DETECTORS = ("neurokit", "martinez2004", "rodrigues2021")
VOTING_LEADS = 4            # usable leads that vote, from `lead` on in LEAD_PREFERENCE order
VOTE_TOLERANCE_S = 0.05     # candidates within 50 ms of a group's first one are the same beat
APEX_WINDOW_S = 0.06        # the R apex is searched within +-60 ms of the voted beat
MIN_R_FRACTION = 0.3        # an R wave smaller than this fraction of the S depth: keep the voted time
MIN_RR_S = 0.2              # placed peaks closer than this are one beat


class RPeakError(ValueError):
    """No lead of the ECG gives a plausible series of R-peaks."""


class RPeakWarning(UserWarning):
    """R-peaks were placed on a lead other than II (the message names it and why II was not used)."""


def detect_rpeaks(ecg: np.ndarray, fs: float = 500, lead: str = "II", return_info: bool = False):
    """R-peak sample indices, int64 ``(K,)``, ascending: the consensus of the module docstring.

    ``ecg``: ``(12, L)`` in the lead order I II III aVR aVL aVF V1-V6, or a single lead ``(L,)``.
    ``lead``: the lead whose R apex the peaks are placed on (default II); when it is unusable, the
    first usable lead of ``LEAD_PREFERENCE``, with an ``RPeakWarning`` naming it and why.
    ``return_info``: return ``(peaks, info)``; ``info`` says how they were found: ``placed_on``
    (lead), ``voters`` (comma-separated leads), ``detectors``, ``runs`` ((lead, detector) runs that
    voted), ``min_votes`` (fewest votes of an accepted peak).
    Raises ``RPeakError`` if no lead gives a plausible rhythm.
    """
    ecg = np.asarray(ecg)
    if ecg.ndim == 1:
        peaks, info = _consensus({"signal": ecg}, "signal", fs)
        if peaks is None:
            raise RPeakError(f"no plausible R-peaks: {info}")
        return (peaks, info) if return_info else peaks
    if ecg.ndim != 2 or ecg.shape[0] != 12:
        raise ValueError(f"detect_rpeaks expects (12, L) or (L,), got shape {ecg.shape}")
    order = [lead] + [name for name in LEAD_PREFERENCE if name != lead]
    peaks, info = _consensus({name: ecg[LEAD_INDEX[name]] for name in order}, lead, fs)
    if peaks is None:
        raise RPeakError(f"no plausible R-peaks in any lead: {info}")
    if info["placed_on"] != lead:
        warnings.warn(f"R-peaks placed on lead {info['placed_on']}: " + "; ".join(info["unusable"][:3]),
                      RPeakWarning, stacklevel=2)
    return (peaks, info) if return_info else peaks


def _unusable(signal: np.ndarray) -> str:
    """Why a lead cannot carry R-peaks ("" if it can)."""
    if not np.all(np.isfinite(signal)):
        return "NaN/inf samples"
    if signal.std() < FLAT_STD:
        return "flat line"
    return ""


def qrs_amplitude(signal: np.ndarray, fs: float) -> float:
    """QRS-band amplitude of one lead ``(L,)`` in mV: the ``QRS_PERCENTILE`` (99th) percentile of
    ``|x|`` after a zero-phase 2nd-order Butterworth band-pass over ``QRS_BAND_HZ`` (5-25 Hz)."""
    from scipy.signal import butter, sosfiltfilt

    high = min(QRS_BAND_HZ[1], 0.45 * fs)
    sos = butter(2, [QRS_BAND_HZ[0], high], btype="bandpass", fs=fs, output="sos")
    if len(signal) <= 3 * (2 * len(sos) + 1):        # shorter than the filter's padding: cannot tell
        return float("inf")
    band = sosfiltfilt(sos, np.asarray(signal, dtype=np.float64))
    return float(np.percentile(np.abs(band), QRS_PERCENTILE))


def has_plausible_qrs(amplitude: float, typical: float) -> tuple[bool, str]:
    """Whether a lead of ``qrs_amplitude`` ``amplitude`` mV can hold QRS complexes; ``typical``: the
    median ``qrs_amplitude`` of the record's finite, non-flat leads. Plausible means at least
    ``QRS_MIN_MV`` (0.01 mV, a tenth of the smallest real lead measured) and at least
    ``QRS_MIN_FRACTION`` (0.02) of ``typical`` (the same test in a record of large complexes).
    Slow signals hardly reach the band: a 0.1 mV/s ramp gives 4e-5 mV, a 0.3 mV 1 Hz wave 7e-4 mV.
    Noise does (white noise of 0.05 mV SD: 0.035 mV): this tells drift from ECG, not noise.
    Returns (ok, the reason when not)."""
    if amplitude >= QRS_MIN_MV and amplitude >= QRS_MIN_FRACTION * typical:
        return True, ""
    return False, (f"no plausible QRS: QRS-band amplitude {amplitude:.2g} mV, {amplitude / max(typical, 1e-12):.2g} "
                   "of the median lead")


def _detector_runs(signal: np.ndarray, fs: float) -> tuple[np.ndarray | None, list[np.ndarray], str]:
    """(cleaned lead, plausible peak series of each detector, reason if none) for one lead."""
    import neurokit2 as nk

    rate = int(round(fs))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cleaned = nk.ecg_clean(signal, sampling_rate=rate, method="neurokit")
    except Exception as err:  # neurokit raises on degenerate input
        return None, [], f"neurokit2 failed: {type(err).__name__}"
    runs, reason = [], ""
    for method in DETECTORS:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _, info = nk.ecg_peaks(cleaned, sampling_rate=rate, method=method)
        except Exception as err:  # some detectors fail on odd input: that detector does not vote
            reason = f"{method} failed: {type(err).__name__}"
            continue
        peaks = np.unique(np.asarray(info["ECG_R_Peaks"], dtype=np.int64))
        ok, why = rhythm_is_plausible(peaks, len(signal), fs)
        if ok:
            runs.append(peaks)
        else:
            reason = why
    return cleaned, runs, reason


def _consensus(leads: dict, place: str, fs: float) -> tuple[np.ndarray | None, dict | str]:
    """Vote over the first ``VOTING_LEADS`` usable leads (in the order of ``leads``) x ``DETECTORS``,
    then place each accepted beat on the R apex of ``place`` (or of the first voter)."""
    signals = {name: np.asarray(sig, dtype=np.float64) for name, sig in leads.items()}
    length = len(next(iter(signals.values())))
    amplitude = {name: qrs_amplitude(sig, fs) for name, sig in signals.items() if not _unusable(sig)}
    typical = float(np.median(list(amplitude.values()))) if amplitude else 0.0
    unusable, voters, runs, cleaned = [], [], [], {}
    for name, signal in signals.items():
        reason = _unusable(signal) or has_plausible_qrs(amplitude[name], typical)[1]
        if not reason:
            cleaned[name], lead_runs, reason = _detector_runs(signal, fs)
            if lead_runs:
                voters.append(name)
                runs.extend(lead_runs)
                if len(voters) == VOTING_LEADS:
                    break
                continue
            reason = reason or "no plausible rhythm"
        unusable.append(f"lead {name} unusable ({reason})")
    if not runs:
        return None, "; ".join(unusable[:3]) + (" ..." if len(unusable) > 3 else "")
    beats, votes = _vote(runs, fs)
    placed_on = place if place in voters else voters[0]
    peaks = _place_on_apex(beats, votes, cleaned[placed_on], fs)
    ok, reason = rhythm_is_plausible(peaks, length, fs)
    if not ok:
        return None, f"consensus of {', '.join(voters)}: {reason}"
    info = {"placed_on": placed_on, "voters": ",".join(voters), "detectors": ",".join(DETECTORS),
            "runs": len(runs), "min_votes": int(votes.min()) if len(votes) else 0, "unusable": unusable}
    return peaks, info


def _vote(runs: list[np.ndarray], fs: float) -> tuple[np.ndarray, np.ndarray]:
    """Beats found by at least half of the runs: (float times (K,), votes (K,)).

    Candidates are grouped greedily in time: a group holds the candidates within
    ``VOTE_TOLERANCE_S`` of its first one; a run votes at most once per group; the beat time is the
    median of the group (detectors disagree by a few samples on where the QRS peaks)."""
    times = np.concatenate(runs).astype(np.float64)
    run_id = np.concatenate([np.full(len(r), k) for k, r in enumerate(runs)])
    order = np.argsort(times, kind="stable")
    times, run_id = times[order], run_id[order]
    tol = VOTE_TOLERANCE_S * fs
    beats, votes = [], []
    i = 0
    while i < len(times):
        j = int(np.searchsorted(times, times[i] + tol, side="right"))
        group_runs = np.unique(run_id[i:j])
        if len(group_runs) >= 0.5 * len(runs):
            beats.append(float(np.median(times[i:j])))
            votes.append(len(group_runs))
        i = j
    return np.asarray(beats), np.asarray(votes, dtype=np.int64)


def _place_on_apex(beats: np.ndarray, votes: np.ndarray, cleaned: np.ndarray, fs: float) -> np.ndarray:
    """Each beat moved to the top of the R wave of ``cleaned`` within ``APEX_WINDOW_S``; a beat
    where that lead has no R wave (its top is below ``MIN_R_FRACTION`` of the QRS depth, a QS
    complex) keeps the voted time. Beats that land closer than ``MIN_RR_S`` keep the better voted."""
    half = int(round(APEX_WINDOW_S * fs))
    placed = []
    for beat in beats:
        centre = int(round(beat))
        lo, hi = max(centre - half, 0), min(centre + half + 1, len(cleaned))
        window = cleaned[lo:hi]
        top = int(np.argmax(window))
        has_r = window[top] > 0 and window[top] >= MIN_R_FRACTION * max(-window.min(), 0.0)
        placed.append(lo + top if has_r else centre)
    placed = np.asarray(placed, dtype=np.int64)
    keep: list[int] = []
    for k in np.argsort(placed, kind="stable"):
        if keep and placed[k] - placed[keep[-1]] < MIN_RR_S * fs:
            if votes[k] > votes[keep[-1]]:
                keep[-1] = k
            continue
        keep.append(k)
    return np.unique(placed[keep])


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
