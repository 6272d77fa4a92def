"""R-peak detection and cardiac-phase labels."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from ecgflowcmr.data.ecg_io import read_ecg
from ecgflowcmr.data.phase import (
    QRS_MIN_FRACTION,
    QRS_MIN_MV,
    TWO_PI,
    RPeakError,
    RPeakWarning,
    detect_rpeaks,
    has_plausible_qrs,
    heart_rate,
    phase_batch,
    phase_from_rpeaks,
    phase_from_targets,
    phase_targets,
    qrs_amplitude,
)
from tests.conftest import EXAMPLE_ECG_DIR, PTBXL_RECORDS

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


DRIFT = 0.1 * np.arange(5000) / 500        # 0.1 mV/s for 10 s: a loose electrode, no ECG


@pytest.fixture(scope="module")
def simulated_ecg():
    """A 12-lead record from neurokit2's simulator (10 s at 500 Hz, 70 bpm): (12, 5000) mV."""
    import neurokit2 as nk

    frame = nk.ecg_simulate(duration=10, sampling_rate=500, method="multileads", random_state=0)
    return frame[["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]].to_numpy().T


def test_qrs_band_amplitude_by_hand():
    t = np.arange(5000) / 500
    # mid-band (sqrt(5 * 25) = 11.2 Hz) a sinusoid passes whole: its 99th percentile of |x| is ~A
    assert qrs_amplitude(0.4 * np.sin(2 * np.pi * 11.2 * t), 500) == pytest.approx(0.4, rel=0.02)
    # drift does not reach the band: a ramp, a 0.3 mV 1 Hz wave (breathing, movement)
    assert qrs_amplitude(DRIFT, 500) < 0.01 * QRS_MIN_MV
    assert qrs_amplitude(0.3 * np.sin(2 * np.pi * 1.0 * t), 500) < 0.1 * QRS_MIN_MV
    # the limits: 0.01 mV, and 0.02 of the median lead
    assert has_plausible_qrs(QRS_MIN_MV, 0.4)[0] and not has_plausible_qrs(0.99 * QRS_MIN_MV, 0.4)[0]
    assert has_plausible_qrs(QRS_MIN_FRACTION * 2.0, 2.0)[0]
    ok, why = has_plausible_qrs(0.99 * QRS_MIN_FRACTION * 2.0, 2.0)
    assert not ok and why.startswith("no plausible QRS")


def test_a_lead_ii_of_drift_neither_votes_nor_receives_the_peaks(simulated_ecg):
    """Lead II replaced by a 0.1 mV/s ramp: the peaks go on lead I, within 10 ms of those found with
    lead II intact, with a warning naming lead I and why lead II was not used."""
    ecg = simulated_ecg.copy()
    intact, info = detect_rpeaks(ecg, return_info=True)
    assert info["placed_on"] == "II" and info["voters"].startswith("II,")
    ecg[1] = DRIFT
    with pytest.warns(RPeakWarning, match=r"placed on lead I: lead II unusable \(no plausible QRS"):
        peaks, info = detect_rpeaks(ecg, return_info=True)
    assert info["placed_on"] == "I" and "II" not in info["voters"].split(",")
    assert len(peaks) == len(intact) and np.abs(peaks - intact).max() <= 5           # 10 ms at 500 Hz
    ecg[1] = 0.0                                                                 # as if lead II were off
    with pytest.warns(RPeakWarning, match="flat line"):
        np.testing.assert_array_equal(detect_rpeaks(ecg), peaks)
    with pytest.raises(RPeakError, match="no plausible QRS"):                    # the ramp alone
        detect_rpeaks(DRIFT)


def test_a_lead_ii_that_did_not_vote_does_not_receive_the_peaks(ptbxl_ecgs):
    """Lead II finite, not flat, with QRS complexes, but only for 3 s: no detector finds a plausible
    rhythm in it, so it does not vote, and the peaks are placed as if it were off (on lead I)."""
    ecg = ptbxl_ecgs[PTBXL_RECORDS[0]].astype(np.float64)
    off = ecg.copy()
    off[1] = 0.0
    with pytest.warns(RPeakWarning, match="flat line"):
        reference = detect_rpeaks(off)
    ecg[1, 1500:] = 0.0
    with pytest.warns(RPeakWarning, match=r"placed on lead I: lead II unusable \(\d+ R-peaks where"):
        peaks, info = detect_rpeaks(ecg, return_info=True)
    assert info["placed_on"] == "I" and info["voters"] == "I,V5,V6,V4"
    np.testing.assert_array_equal(peaks, reference)


def test_no_plausible_rhythm_is_an_error():
    with pytest.raises(RPeakError, match="no plausible R-peaks"):
        detect_rpeaks(np.zeros((12, 5000)))
    with pytest.raises(RPeakError):
        detect_rpeaks(np.random.default_rng(0).normal(size=5000) * 1e-5)
    with pytest.raises(ValueError):
        detect_rpeaks(np.zeros((3, 5000)))


def test_a_beat_found_by_exactly_half_of_the_runs_is_kept():
    """The vote counts runs per 50 ms group: half of them suffice, one less does not."""
    from ecgflowcmr.data.phase import _vote

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
