"""ECG readers: real PTB-XL records (WFDB), UK Biobank XML, .npy, .csv, resampling, refusals."""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pytest

from ecgflowcmr.data import ecg_io
from ecgflowcmr.data.ecg_io import LEADS, ECGReadError, ECGReadWarning, read_ecg
from tests.conftest import EXAMPLE_ECG_DIR, PTBXL_RECORDS

# ----------------------------------------------------------------------------------------------
# Fixture writers (UK Biobank CardioSoft layout, CSV)
# ----------------------------------------------------------------------------------------------


def write_ukb_xml(path: Path, ecg_mv: np.ndarray, fs: float = 500, resolution_uv: float = 5.0,
                  leads=LEADS, root: str = "CardiologyXML", median: bool = True) -> Path:
    """Write ``(n_leads, L)`` mV as a UK Biobank resting-ECG XML (field 20205 layout): integer
    samples in ``StripData``, a decoy ``MedianSamples`` block that must not be read."""

    def waveforms(signals, indent="\t\t"):
        out = []
        for lead, values in zip(leads, signals):
            ints = np.rint(np.asarray(values) * 1000.0 / resolution_uv).astype(int)
            lines = [",".join(str(v) for v in ints[k:k + 16]) for k in range(0, len(ints), 16)]
            body = (",\n" + indent + "\t").join(lines)
            out.append(f'{indent}<WaveformData lead="{lead}">\n{indent}\t{body}\n{indent}</WaveformData>')
        return "\n".join(out)

    medians = ""
    if median:
        decoy = np.full((len(leads), 600), 3.0)  # a flat 3 mV "median beat"
        medians = (f"\t<RestingECGMeasurements>\n\t\t<MedianSamples>\n"
                   f"\t\t<NumberOfLeads>{len(leads)}</NumberOfLeads>\n"
                   f'\t\t<SampleRate units="Hz">{fs:g}</SampleRate>\n'
                   f"\t\t<ChannelSampleCountTotal>600</ChannelSampleCountTotal>\n"
                   f'\t\t<Resolution units="uVperLsb">{resolution_uv:g}</Resolution>\n'
                   f"{waveforms(decoy)}\n\t\t</MedianSamples>\n\t</RestingECGMeasurements>\n")
    text = (f'<?xml version="1.0" encoding="UTF-8"?>\n<{root}>\n'
            f"\t<ObservationType>RestECG</ObservationType>\n{medians}"
            f"\t<StripData>\n\t\t<NumberOfLeads>{len(leads)}</NumberOfLeads>\n"
            f'\t\t<SampleRate units="Hz">{fs:g}</SampleRate>\n'
            f"\t\t<ChannelSampleCountTotal>{ecg_mv.shape[1]}</ChannelSampleCountTotal>\n"
            f'\t\t<Resolution units="uVperLsb">{resolution_uv:g}</Resolution>\n'
            f"{waveforms(ecg_mv)}\n\t</StripData>\n</{root}>\n")
    path.write_text(text)
    return path


def write_csv(path: Path, ecg_mv: np.ndarray, names) -> Path:
    header = ",".join(names)
    np.savetxt(path, np.asarray(ecg_mv).T, delimiter=",", header=header, comments="", fmt="%.6f")
    return path


def synthetic_ecg(fs: float, seconds: float = 10.0, n_leads: int = 12) -> np.ndarray:
    """Smooth multi-sine signals (band-limited far below 125 Hz), distinct per lead, in mV."""
    t = np.arange(int(round(fs * seconds))) / fs
    return np.stack([0.5 * np.sin(2 * np.pi * (1.1 + 0.1 * k) * t) + 0.2 * np.sin(2 * np.pi * 7.0 * t + k)
                     + 0.05 * np.cos(2 * np.pi * 23.0 * t) for k in range(n_leads)])


def analytic_500(seconds: float = 10.0) -> np.ndarray:
    return synthetic_ecg(500.0, seconds)


def ptbxl(name: str) -> np.ndarray:
    import wfdb

    return wfdb.rdrecord(str(EXAMPLE_ECG_DIR / name)).p_signal.T


def assert_read_error(path, *patterns, **kwargs):
    with pytest.raises(ECGReadError) as info:
        read_ecg(path, **kwargs)
    message = str(info.value)
    assert Path(path).name in message, message
    for pattern in patterns:
        assert re.search(pattern, message, re.IGNORECASE), message
    return message


# ----------------------------------------------------------------------------------------------
# Real records
# ----------------------------------------------------------------------------------------------


def test_leads_constant_matches_dataset_contract():
    from ecgflowcmr.data.datasets import LEADS as DATASET_LEADS

    assert LEADS == DATASET_LEADS


@pytest.mark.parametrize("name", PTBXL_RECORDS)
def test_ptbxl_records(name):
    import wfdb

    record = wfdb.rdrecord(str(EXAMPLE_ECG_DIR / name))
    ecg = read_ecg(EXAMPLE_ECG_DIR / f"{name}.hea")
    assert ecg.shape == (12, 5000) and ecg.dtype == np.float32
    # Lead order: each output lead equals the header's lead of that name (header order may differ).
    for k, lead in enumerate(LEADS):
        np.testing.assert_allclose(ecg[k], record.p_signal[:, record.sig_name.index(lead)], atol=1e-6)
    # Units mV: QRS amplitudes of a resting ECG are 0.2-5 mV, and no lead is microvolt-scaled.
    peak_to_peak = np.ptp(ecg, axis=1)
    assert np.all(peak_to_peak > 0.1) and np.all(peak_to_peak < 10), peak_to_peak
    assert 0.5 < np.abs(ecg).max() < 10


@pytest.mark.parametrize("suffix", ["", ".mat", ".hea"])
def test_wfdb_path_forms(suffix):
    ecg = read_ecg(str(EXAMPLE_ECG_DIR / PTBXL_RECORDS[0]) + suffix)
    np.testing.assert_allclose(ecg, ptbxl(PTBXL_RECORDS[0]), atol=1e-6)


# ----------------------------------------------------------------------------------------------
# UK Biobank XML, npy, csv
# ----------------------------------------------------------------------------------------------


def test_ukb_xml_round_trip_within_resolution(tmp_path):
    source = ptbxl(PTBXL_RECORDS[1])
    path = write_ukb_xml(tmp_path / "1000001_20205_2_0.xml", source, resolution_uv=5.0)
    ecg = read_ecg(path)
    assert ecg.shape == (12, 5000) and ecg.dtype == np.float32
    # Quantised to 5 uV: within half an LSB (+ float32 rounding); the median-beat decoy is ignored.
    assert np.abs(ecg - source).max() <= 0.0025 + 1e-5


def test_ukb_xml_lead_names_any_order_and_case(tmp_path):
    source = ptbxl(PTBXL_RECORDS[2])
    order = [11, 0, 3, 1, 2, 4, 5, 6, 7, 8, 9, 10]
    names = [LEADS[k].upper() if k % 2 else LEADS[k].lower() for k in order]
    path = write_ukb_xml(tmp_path / "mixed.xml", source[order], leads=names)
    np.testing.assert_allclose(read_ecg(path), source, atol=0.003)


@pytest.mark.parametrize("fs", [250, 1000, 257])
def test_xml_resampled_to_500(tmp_path, fs):
    path = write_ukb_xml(tmp_path / f"rate{fs}.xml", synthetic_ecg(fs), fs=fs, resolution_uv=1.0)
    ecg = read_ecg(path)
    assert ecg.shape == (12, 5000)
    inner = slice(100, 4900)  # edges of a polyphase filter are approximate
    assert np.abs(ecg[:, inner] - analytic_500()[:, inner]).max() < 0.01


def test_npy_both_orientations(tmp_path):
    source = ptbxl(PTBXL_RECORDS[3]).astype(np.float32)
    ecg_io.write_ecg_npy(tmp_path / "a.npy", source)
    np.save(tmp_path / "b.npy", source.T)
    np.testing.assert_array_equal(read_ecg(tmp_path / "a.npy"), source)
    np.testing.assert_array_equal(read_ecg(tmp_path / "b.npy"), source)


def test_npy_and_csv_take_fs(tmp_path):
    np.save(tmp_path / "r.npy", synthetic_ecg(1000))
    ecg = read_ecg(tmp_path / "r.npy", fs=1000)
    assert np.abs(ecg[:, 100:4900] - analytic_500()[:, 100:4900]).max() < 0.01
    write_csv(tmp_path / "r.csv", synthetic_ecg(250), LEADS)
    ecg = read_ecg(tmp_path / "r.csv", fs=250)
    assert np.abs(ecg[:, 100:4900] - analytic_500()[:, 100:4900]).max() < 0.01


def test_csv_names_case_insensitive_any_order_time_column(tmp_path):
    source = ptbxl(PTBXL_RECORDS[4])
    order = list(range(12))[::-1]
    names = ["lead " + LEADS[k].upper() for k in order]
    table = np.vstack([np.arange(5000) / 500.0, source[order]])
    path = write_csv(tmp_path / "rec.csv", table, ["time"] + names)
    np.testing.assert_allclose(read_ecg(path), source, atol=1e-5)
    import pandas as pd

    pd.DataFrame(source.T, columns=LEADS).to_csv(tmp_path / "pandas.csv")  # with its index column
    np.testing.assert_allclose(read_ecg(tmp_path / "pandas.csv"), source, atol=1e-5)


def test_missing_limb_leads_are_derived_with_a_warning(tmp_path):
    source = ptbxl(PTBXL_RECORDS[0])
    keep = [0, 1] + list(range(6, 12))  # I, II, V1-V6
    path = write_csv(tmp_path / "eight.csv", source[keep], [LEADS[k] for k in keep])
    with pytest.warns(ECGReadWarning, match=r"eight\.csv.*III, aVR, aVL, aVF"):
        ecg = read_ecg(path)
    lead_i, lead_ii = ecg[0], ecg[1]
    np.testing.assert_allclose(ecg[2], lead_ii - lead_i, atol=1e-5)
    np.testing.assert_allclose(ecg[3], -(lead_i + lead_ii) / 2, atol=1e-5)
    # PTB-XL's own limb leads are (up to rounding) the same derivation.
    np.testing.assert_allclose(ecg[2:6], source[2:6], atol=0.02)


def test_length_tolerance_crop_and_pad(tmp_path):
    long = synthetic_ecg(500, seconds=10.3)
    short = synthetic_ecg(500, seconds=9.7)
    np.save(tmp_path / "long.npy", long)
    np.save(tmp_path / "short.npy", short)
    np.testing.assert_allclose(read_ecg(tmp_path / "long.npy"), long[:, :5000], atol=1e-6)
    padded = read_ecg(tmp_path / "short.npy")
    np.testing.assert_allclose(padded[:, :4850], short, atol=1e-6)
    np.testing.assert_allclose(padded[:, 4850:], np.repeat(short[:, -1:], 150, axis=1), atol=1e-6)
    assert_read_error(tmp_path / "short.npy", "too short", tolerance_s=0.2)


# ----------------------------------------------------------------------------------------------
# Refusals: ECGReadError naming the file and the reason
# ----------------------------------------------------------------------------------------------


def test_unreadable_files(tmp_path):
    (tmp_path / "garbage.xml").write_bytes(b"\x00\x01 not xml <<<")
    assert_read_error(tmp_path / "garbage.xml", "unreadable")
    (tmp_path / "garbage.npy").write_bytes(b"definitely not numpy")
    assert_read_error(tmp_path / "garbage.npy", "unreadable")
    assert_read_error(tmp_path / "absent.xml", "not found")
    assert_read_error(tmp_path / "absent.npy", "not found")
    (tmp_path / "broken.hea").write_text("broken 12 500 5000\nnonsense line\n")
    assert_read_error(tmp_path / "broken.hea", "unreadable")
    (tmp_path / "notes.txt").write_text("hello")
    assert_read_error(tmp_path / "notes.txt", "unsupported")
    (tmp_path / "muse.xml").write_text("<RestingECG><Waveform/></RestingECG>")
    assert_read_error(tmp_path / "muse.xml", "unsupported XML", "CardiologyXML")
    (tmp_path / "nostrip.xml").write_text("<CardiologyXML><ObservationType/></CardiologyXML>")
    assert_read_error(tmp_path / "nostrip.xml", "StripData")


def test_unknown_and_missing_leads(tmp_path):
    source = synthetic_ecg(500)
    names = list(LEADS)
    names[11] = "V7"
    assert_read_error(write_csv(tmp_path / "v7.csv", source, names), "unknown lead", "V7")
    keep = [k for k in range(12) if LEADS[k] != "V3"]
    assert_read_error(write_ukb_xml(tmp_path / "nov3.xml", source[keep], leads=[LEADS[k] for k in keep]),
                      "missing leads V3")
    keep = [k for k in range(12) if LEADS[k] != "II"]
    assert_read_error(write_csv(tmp_path / "noii.csv", source[keep], [LEADS[k] for k in keep]),
                      "missing leads II")
    names = list(LEADS)
    names[1] = "i"
    assert_read_error(write_csv(tmp_path / "twice.csv", source, names), "appears twice")


def test_nan_inf_flat_short_dims(tmp_path):
    source = synthetic_ecg(500)
    bad = source.copy()
    bad[4, 100:110] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    assert_read_error(tmp_path / "nan.npy", "NaN", "aVL")
    bad = source.copy()
    bad[7, 5] = np.inf
    assert_read_error(write_csv(tmp_path / "inf.csv", bad, LEADS), "NaN/inf", "V2")
    flat = source.copy()
    flat[8] = 0.12
    assert_read_error(write_ukb_xml(tmp_path / "flat.xml", flat), "flat", "V3")
    np.save(tmp_path / "short.npy", source[:, :2500])
    assert_read_error(tmp_path / "short.npy", "too short", r"5\.00 s")
    np.save(tmp_path / "long.npy", synthetic_ecg(500, seconds=12))
    assert_read_error(tmp_path / "long.npy", "too long")
    np.save(tmp_path / "dims.npy", source[:3])
    assert_read_error(tmp_path / "dims.npy", "wrong dimensions")
    np.save(tmp_path / "dims3.npy", source[None])
    assert_read_error(tmp_path / "dims3.npy", "wrong dimensions")
    write_ukb_xml(tmp_path / "rate.xml", source)
    assert_read_error(tmp_path / "rate.xml", "fs=250", fs=250)
    np.save(tmp_path / "microvolts.npy", source * 1000)
    assert_read_error(tmp_path / "microvolts.npy", "implausible amplitude", "uV")
    np.save(tmp_path / "slow.npy", source[:, :500])
    assert_read_error(tmp_path / "slow.npy", "sampling rate", fs=50)


def test_no_warning_on_clean_input(tmp_path):
    path = write_ukb_xml(tmp_path / "ok.xml", ptbxl(PTBXL_RECORDS[0]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_ecg(path)
