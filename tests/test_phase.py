"""R-peak detection and cardiac-phase labels."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from tests.conftest import EXAMPLE_ECG_DIR, PTBXL_RECORDS
from ecgflowcmr.data.ecg_io import read_ecg
from ecgflowcmr.ecg.phase import (TWO_PI, RPeakError, RPeakWarning, detect_rpeaks, heart_rate,
                                  phase_batch, phase_from_rpeaks, phase_from_targets, phase_targets)

BRADYCARDIA, TACHYCARDIA = "426177001", "427084000"  # SNOMED-CT codes in the PTB-XL headers


def header_dx(name: str) -> set[str]:
    for line in (EXAMPLE_ECG_DIR / f"{name}.hea").read_text().splitlines():
        if line.startswith("# Dx:"):
            return set(line.split(":", 1)[1].strip().split(","))
    return set()


@pytest.fixture(scope="module")
def ptbxl_ecgs():
    return {name: read_ecg(EXAMPLE_ECG_DIR / f"{name}.hea") for name in PTBXL_RECORDS}


# ----------------------------------------------------------------------------------------------
# R-peaks on real records
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PTBXL_RECORDS)
def test_rpeak_count_plausible_for_heart_rate(ptbxl_ecgs, name):
    ecg = ptbxl_ecgs[name]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RPeakWarning)  # lead II is fine in all five
        peaks = detect_rpeaks(ecg, fs=500)
    assert peaks.dtype == np.int64 and np.all(np.diff(peaks) > 0)
    assert peaks.min() >= 0 and peaks.max() < 5000
    hr = heart_rate(peaks, 500)
    dx = header_dx(name)
    if BRADYCARDIA in dx:
        assert 30 <= hr < 60, hr
    elif TACHYCARDIA in dx:
        assert 100 < hr <= 180, hr
    else:
        assert 50 <= hr <= 100, hr
    # The count matches the rate: 10 s of beats at the median R-R, +- one beat at each edge.
    expected = 10.0 * hr / 60.0
    assert expected - 2 <= len(peaks) <= expected + 1.5, (len(peaks), expected)
    # Peaks sit on R waves: the largest |lead II| within 50 ms of each detected peak is close to it.
    lead_ii = ecg[1]
    for p in peaks:
        window = lead_ii[max(p - 25, 0):p + 26]
        assert abs(lead_ii[p]) >= 0.5 * np.abs(window).max()


def test_falls_back_to_another_lead_and_says_so(ptbxl_ecgs):
    ecg = ptbxl_ecgs[PTBXL_RECORDS[0]].copy()
    reference = detect_rpeaks(ecg)
    ecg[1] = 0.0
    with pytest.warns(RPeakWarning, match=r"lead I\b.*lead II unusable \(flat line\)"):
        peaks = detect_rpeaks(ecg)
    assert len(peaks) == len(reference)
    assert np.abs(peaks - reference).max() <= 15  # within 30 ms of the lead-II peaks
    ecg[0] = np.nan
    with pytest.warns(RPeakWarning, match=r"lead I unusable \(NaN/inf"):
        detect_rpeaks(ecg)


def test_no_plausible_rhythm_is_an_error():
    with pytest.raises(RPeakError, match="no plausible R-peaks"):
        detect_rpeaks(np.zeros((12, 5000)))
    with pytest.raises(RPeakError):
        detect_rpeaks(np.random.default_rng(0).normal(size=5000) * 1e-5)
    with pytest.raises(ValueError):
        detect_rpeaks(np.zeros((3, 5000)))


def test_a_beat_found_by_exactly_half_of_the_runs_is_kept():
    """The vote counts runs per 50 ms group: half of them suffice, one less does not."""
    from ecgflowcmr.ecg.phase import _vote

    runs = [np.array([100, 1000, 2000, 3000]),
            np.array([104, 1000, 2002]),
            np.array([1000, 3010]),
            np.array([1002, 4000])]
    beats, votes = _vote(runs, fs=500)
    # 100/104: 2 of 4 runs; 1000: all 4; 2000/2002: 2; 3000/3010 (20 ms apart): 2; 4000: 1 -> dropped
    np.testing.assert_allclose(beats, [102.0, 1000.0, 2001.0, 3005.0])
    np.testing.assert_array_equal(votes, [2, 4, 2, 2])
    # with three runs half is 1.5: two runs keep a beat, one does not
    beats, votes = _vote(runs[:3], fs=500)
    np.testing.assert_allclose(beats, [102.0, 1000.0, 2001.0, 3005.0])
    np.testing.assert_array_equal(votes, [2, 3, 2, 2])
    beats, _ = _vote([np.array([100, 600]), np.array([600]), np.array([600, 900])], fs=500)
    np.testing.assert_allclose(beats, [600.0])


def test_single_lead_input(ptbxl_ecgs):
    ecg = ptbxl_ecgs[PTBXL_RECORDS[1]]
    np.testing.assert_array_equal(detect_rpeaks(ecg[1]), detect_rpeaks(ecg))


# ----------------------------------------------------------------------------------------------
# Phase labels
# ----------------------------------------------------------------------------------------------


def test_phase_regular_rhythm_exact():
    rr, first, length = 400, 300, 5000
    peaks = np.arange(first, length, rr)
    phase = phase_from_rpeaks(peaks, length)
    assert phase.shape == (length,) and phase.dtype == np.float64
    assert np.all(phase[peaks] == 0.0)
    assert np.all((phase >= 0) & (phase < TWO_PI))
    # Everywhere (extrapolated edges included) the phase is exactly the regular sawtooth.
    expected = TWO_PI * np.mod((np.arange(length) - first) / rr, 1.0)
    np.testing.assert_allclose(phase, expected, atol=1e-9)
    assert phase[0] == pytest.approx(TWO_PI * (rr - first) / rr)


def test_phase_properties_irregular_rhythm():
    peaks = np.array([700, 1100, 1650, 2000, 2500, 2880, 3600, 4100])
    length = 5000
    phase = phase_from_rpeaks(peaks, length)
    assert np.all((phase >= 0) & (phase < TWO_PI))
    assert np.all(phase[peaks] == 0.0)
    # Zero only at R-peaks and at the extrapolated beats (every median R-R = 500 beyond the ends).
    np.testing.assert_array_equal(np.flatnonzero(phase == 0.0), [200, *peaks, 4600])
    for a, b in zip(peaks[:-1], peaks[1:]):  # linear and increasing within each R-R interval
        segment = phase[a:b]
        assert np.all(np.diff(segment) > 0)
        np.testing.assert_allclose(segment, TWO_PI * np.arange(b - a) / (b - a), atol=1e-9)
    median_rr = np.median(np.diff(peaks))  # 500
    head = np.arange(0, peaks[0])
    np.testing.assert_allclose(phase[head], TWO_PI * np.mod((head - peaks[0]) / median_rr, 1.0), atol=1e-9)
    tail = np.arange(peaks[-1], length)
    np.testing.assert_allclose(phase[tail], TWO_PI * np.mod((tail - peaks[-1]) / median_rr, 1.0), atol=1e-9)


def test_phase_ignores_padding_and_needs_two_peaks():
    padded = np.array([250, 750, 1250, -1, -1])
    np.testing.assert_array_equal(phase_from_rpeaks(padded, 2000), phase_from_rpeaks(padded[:3], 2000))
    with pytest.raises(ValueError, match="at least 2"):
        phase_from_rpeaks(np.array([100, -1]), 1000)


def test_phase_on_real_record(ptbxl_ecgs):
    ecg = ptbxl_ecgs[PTBXL_RECORDS[3]]
    peaks = detect_rpeaks(ecg)
    phase = phase_from_rpeaks(peaks, ecg.shape[1])
    assert np.all(phase[peaks] == 0)
    assert np.count_nonzero(phase == 0) <= len(peaks) + 2  # + at most one extrapolated beat per edge
    assert np.all((phase >= 0) & (phase < TWO_PI))


def test_phase_is_vectorised(monkeypatch):
    """One ``np.interp`` over all samples, however many beats (no Python loop per beat; speed
    itself belongs in benchmarks/), and the hand values: 0 at each R-peak, pi half way."""
    calls = []
    interp = np.interp

    def counting_interp(*args, **kwargs):
        calls.append(len(args[0]))
        return interp(*args, **kwargs)

    monkeypatch.setattr(np, "interp", counting_interp)
    peaks = np.cumsum(2 * np.random.default_rng(0).integers(150, 350, size=20000))   # even R-R
    phase = phase_from_rpeaks(peaks, int(peaks[-1]) + 1000)
    assert calls == [int(peaks[-1]) + 1000]
    assert np.all(phase[peaks] == 0)
    np.testing.assert_allclose(phase[(peaks[:-1] + peaks[1:]) // 2], np.pi, atol=1e-9)


def test_targets_and_batch():
    rows = np.array([[100, 600, 1100, -1], [50, 450, 850, 1250]])
    batch = phase_batch(rows, 1500)
    assert batch.shape == (2, 1500)
    np.testing.assert_array_equal(batch[1], phase_from_rpeaks(rows[1], 1500))
    targets = phase_targets(batch)
    assert targets.shape == (2, 2, 1500) and targets.dtype == np.float32
    np.testing.assert_allclose(targets[:, 0], np.sin(batch), atol=1e-6)
    np.testing.assert_allclose(targets[:, 1], np.cos(batch), atol=1e-6)
    back = phase_from_targets(targets * 3.0)  # scale does not matter
    assert np.all((back >= 0) & (back < TWO_PI))
    diff = np.angle(np.exp(1j * (back - batch)))
    assert np.abs(diff).max() < 1e-5
    tensor = torch.from_numpy(batch)
    t_targets = phase_targets(tensor)
    assert isinstance(t_targets, torch.Tensor) and t_targets.shape == (2, 2, 1500)
    t_back = phase_from_targets(t_targets)
    assert isinstance(t_back, torch.Tensor) and float(t_back.max()) < TWO_PI
    assert float(t_back.min()) >= 0
