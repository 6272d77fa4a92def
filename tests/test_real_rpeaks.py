"""R-peak labels on real records with reference annotations (MIT-BIH record 100, first 3 minutes)."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from ecgflowcmr.data.annotated import annotated_windows
from ecgflowcmr.data.ecg_io import ECGReadError, read_ecg
from ecgflowcmr.data.phase import (
    FLAT_STD,
    LEAD_INDEX,
    QRS_MIN_FRACTION,
    QRS_MIN_MV,
    RPeakWarning,
    detect_rpeaks,
    qrs_amplitude,
)
from ecgflowcmr.ecg.metrics import match_peaks
from tests.conftest import EXAMPLE_ECG_DIR, PTBXL_RECORDS, ROOT

MITDB = ROOT / "tests" / "data" / "mitdb-100" / "100"


@pytest.fixture(scope="module")
def mitdb():
    return annotated_windows(MITDB)


def f1_against(reference: list[np.ndarray], found: list[np.ndarray]) -> float:
    """F1 within 50 ms over all windows, every reference beat counted (none left out at the edges)."""
    tp = n_ref = n_pred = 0
    for ref, pred in zip(reference, found):
        a, b, c = match_peaks(pred, ref, 5000, edge_s=0.0)
        tp, n_ref, n_pred = tp + a, n_ref + b, n_pred + c
    return 2 * tp / (n_ref + n_pred)


def test_windows_of_an_annotated_record(mitdb):
    import wfdb

    ecgs, peaks = mitdb
    assert ecgs.shape == (18, 12, 5000) and ecgs.dtype == np.float32      # 3 min = 18 x 10 s
    present = np.flatnonzero(np.abs(ecgs).max(axis=(0, 2)) > 0)
    np.testing.assert_array_equal(present, [LEAD_INDEX["II"], LEAD_INDEX["V5"]])   # MLII, V5
    ann = wfdb.rdann(str(MITDB), "atr")
    # 224 annotations: a rhythm mark ("+", not a beat) at the start, then 223 beats
    assert len(ann.sample) == 224 and ann.symbol[0] == "+" and sum(len(p) for p in peaks) == 223
    # the annotations, at 500 Hz, land on the top of the R wave of the resampled MLII
    for ecg, ref in zip(ecgs, peaks):
        assert np.all((ref >= 0) & (ref < 5000)) and np.all(np.diff(ref) > 0)
        for r in ref[(ref > 10) & (ref < 4990)]:
            assert abs(int(np.argmax(ecg[1, r - 10:r + 11])) - 10) <= 3


def test_consensus_labels_match_the_annotations(mitdb):
    ecgs, reference = mitdb
    found = []
    for ecg in ecgs:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RPeakWarning)              # lead II is fine throughout
            peaks, info = detect_rpeaks(ecg, 500, return_info=True)
        assert info["placed_on"] == "II" and info["voters"] == "II,V5" and info["runs"] == 6
        found.append(peaks)
    assert f1_against(reference, found) >= 0.99
    # placed on the apex: the median distance to the annotated R-peak is at most 2 ms
    offsets = [np.min(np.abs(p - r)) for p, ref in zip(found, reference) for r in ref]
    assert np.median(offsets) <= 1


def test_consensus_without_lead_ii_places_on_the_next_lead(mitdb):
    ecgs, reference = mitdb
    found = []
    for ecg in ecgs[:6]:
        ecg = ecg.copy()
        ecg[LEAD_INDEX["II"]] = 0.0
        with pytest.warns(RPeakWarning, match=r"placed on lead V5: lead II unusable \(flat line\)"):
            peaks, info = detect_rpeaks(ecg, 500, return_info=True)
        assert info["placed_on"] == "V5" and info["voters"] == "V5"
        found.append(peaks)
    assert f1_against(reference[:6], found) >= 0.99


def test_every_real_lead_has_a_plausible_qrs_with_room_to_spare(mitdb):
    """The QRS limits never drop a lead of a real record: every lead of the five PTB-XL records and
    of the MIT-BIH windows is at least 5x above both (smallest: 0.096 mV, 0.26 of the median lead)."""
    records = [read_ecg(EXAMPLE_ECG_DIR / f"{name}.hea") for name in PTBXL_RECORDS] + list(mitdb[0])
    smallest, smallest_fraction = np.inf, np.inf
    for ecg in records:
        amplitudes = np.array([qrs_amplitude(lead, 500) for lead in ecg if lead.std() >= FLAT_STD])
        smallest = min(smallest, amplitudes.min())
        smallest_fraction = min(smallest_fraction, (amplitudes / np.median(amplitudes)).min())
    assert smallest >= 5 * QRS_MIN_MV and smallest_fraction >= 5 * QRS_MIN_FRACTION, (smallest, smallest_fraction)


def test_an_artefact_in_one_lead_is_outvoted():
    """A sharp 3 mV spike mid-beat in lead II only: the other leads vote it down, the beats stay."""
    ecg = read_ecg(EXAMPLE_ECG_DIR / f"{PTBXL_RECORDS[2]}.hea")
    clean = detect_rpeaks(ecg)
    spiked = ecg.copy()
    for a, b in zip(clean[:-1], clean[1:]):
        spiked[1, (a + b) // 2 - 3:(a + b) // 2 + 4] += 3.0 * np.hanning(7)
    assert len(detect_rpeaks(spiked[1])) > len(clean)        # lead II alone takes spikes for beats
    np.testing.assert_array_equal(detect_rpeaks(spiked), clean)


def test_annotated_windows_refuses_bad_input(tmp_path):
    with pytest.raises(ECGReadError, match="nothing"):
        annotated_windows(tmp_path / "nothing")
    import shutil

    shutil.copy(str(MITDB) + ".hea", tmp_path / "100.hea")
    shutil.copy(str(MITDB) + ".dat", tmp_path / "100.dat")
    with pytest.raises(ECGReadError, match=r"annotations .*100\.atr.* unreadable"):
        annotated_windows(tmp_path / "100")
    with pytest.raises(ECGReadError, match="shorter than one 400 s window"):
        annotated_windows(MITDB, seconds=400)
