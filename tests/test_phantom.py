"""The paired ECG-cine phantom: files, determinism, resume, and the physiology it promises."""
from __future__ import annotations

import json
import math
import warnings
import xml.etree.ElementTree as ET

import neurokit2 as nk
import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from ecgflowcmr.data import ecg_io, phase
from ecgflowcmr.phantom import build
from ecgflowcmr.phantom import figure as phantom_figure
from ecgflowcmr.phantom import v1 as ph

SEED = 0
N = 5            # indices 0-3 form one class block: 2 normal, 1 dilated, 1 hypertrophic


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom")
    manifest = build.generate(out, N, seed=SEED, workers=1, progress=False)
    return out, pd.read_csv(manifest, dtype={"subject_id": str})


def _load(path):
    img = nib.load(path)
    return img, np.asarray(img.dataobj)


def _lv_curve(out, row) -> np.ndarray:
    _, masks = _load(out / row.mask_path)
    return (masks[:, :, 0, :] == 1).sum(axis=(0, 1)).astype(float)


def _circular(d: int) -> int:
    return (d + ph.N_FRAMES // 2) % ph.N_FRAMES - ph.N_FRAMES // 2


def test_files_shapes_dtypes_affine(phantom):
    out, m = phantom
    assert len(m) == N
    for col in ("subject_id", "ecg_path", "cmr_path", "mask_path", "class", "hr_bpm", "rr_ms", "qt_ms",
                "es_frame", "lv_ed_area_mm2", "lv_es_area_mm2", "lv_ed_area_px", "ef_area", "wall_thickness_mm",
                "theta_deg", "offset_x_mm", "rv_halfwidth_mm", "la_min_area_mm2", "texture_seed"):
        assert col in m.columns, col
    assert set(m["class"]) == set(ph.CLASSES)
    for row in m.itertuples():
        cine_img, cine = _load(out / row.cmr_path)
        mask_img, masks = _load(out / row.mask_path)
        assert cine.shape == (128, 128, 1, ph.N_FRAMES) and cine.dtype == np.int16
        assert masks.shape == cine.shape and masks.dtype == np.uint8
        assert set(np.unique(masks)) == {0, 1, 2, 3, 4, 5}
        assert 0 <= cine.min() and 300 < cine.max() < 4096
        zooms = cine_img.header.get_zooms()
        assert zooms[:2] == pytest.approx((row.pixel_mm, row.pixel_mm), abs=1e-4)
        assert zooms[2] == pytest.approx(ph.SLICE_MM) and zooms[3] == pytest.approx(row.cine_rr_ms / 50, abs=1e-3)
        assert cine_img.header.get_xyzt_units() == ("mm", "msec")
        np.testing.assert_allclose(cine_img.affine, mask_img.affine)
        np.testing.assert_allclose(np.linalg.norm(cine_img.affine[:3, :3], axis=0),
                                   [row.pixel_mm, row.pixel_mm, ph.SLICE_MM], atol=1e-4)
        # MRI-like contrast: blood pools bright, myocardium dark
        frame, lab = cine[:, :, 0, 0].astype(float), masks[:, :, 0, 0]
        assert frame[lab == 1].mean() > 2.5 * frame[lab == 5].mean()
        root = ET.parse(out / row.ecg_path).getroot()
        assert root.tag == "CardiologyXML"
        strip = root.find("StripData")
        assert strip.findtext("SampleRate").strip() == "500" and strip.findtext("Resolution").strip() == "5"
        assert [w.get("lead") for w in strip.findall("WaveformData")] == list(ph.LEADS)
        medians = root.findall("RestingECGMeasurements/MedianSamples/WaveformData")
        assert len(medians) == 12
        assert len(medians[0].text.split(",")) == ph.MEDIAN_PRE + ph.MEDIAN_POST


def test_deterministic_whatever_the_workers(phantom, tmp_path):
    out, m = phantom
    again = build.generate(tmp_path / "again", 2, seed=SEED, workers=2, progress=False)
    for sid in m.subject_id[:2]:
        for sub, suffix in (("cmr", ".nii.gz"), ("masks", ".nii.gz")):
            a = _load(out / sub / f"{sid}{suffix}")[1]
            b = _load(again.parent / sub / f"{sid}{suffix}")[1]
            np.testing.assert_array_equal(a, b)
        assert (out / "ecg" / f"{sid}.xml").read_bytes() == (again.parent / "ecg" / f"{sid}.xml").read_bytes()
    other = ph.simulate(SEED + 1, 0)
    assert not np.array_equal(other["cine"], np.moveaxis(_load(out / m.cmr_path[0])[1][:, :, 0], -1, 0))
    assert ph.sample_params(SEED + 1, 0) != ph.sample_params(SEED, 0)


def test_resume_and_cli(tmp_path):
    out = tmp_path / "ph"
    assert build.main(["--out", str(out), "--n", "2", "--seed", "5", "--quiet"]) == 0
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.*")}
    (out / "cmr" / "PH00001.nii.gz").unlink()               # an interrupted subject
    build.generate(out, 3, seed=5, progress=False)
    assert (out / "cmr" / "PH00001.nii.gz").is_file() and (out / "truth" / "PH00002.json").is_file()
    assert (out / "ecg" / "PH00000.xml").stat().st_mtime_ns == stamps[out / "ecg" / "PH00000.xml"]
    assert (out / "truth" / "PH00000.json").stat().st_mtime_ns == stamps[out / "truth" / "PH00000.json"]
    m = pd.read_csv(out / "manifest.csv")
    assert list(m.subject_id) == ["PH00000", "PH00001", "PH00002"]
    np.testing.assert_array_equal(_load(out / "cmr" / "PH00001.nii.gz")[1][:, :, 0, :],
                                  np.moveaxis(ph.simulate(5, 1)["cine"], 0, -1))


def test_es_frame_is_the_smallest_lv_and_follows_t_end(phantom):
    out, m = phantom
    for row in m.itertuples():
        lv = _lv_curve(out, row)
        assert abs(_circular(int(np.argmin(lv)) - row.es_frame)) <= 1, (row.subject_id, lv.tolist())
        assert abs(_circular(int(np.argmax(lv)))) <= 1 and lv[0] >= 0.97 * lv.max()   # frame 0 = ED
        # ES time is the end of the T wave of the cine beat, in the delineation written with the ECG
        truth = json.loads((out / "truth" / f"{row.subject_id}.json").read_text())
        beat = truth["timing"]["beat"]
        dl = truth["delineation_samples"]
        t_end_ms = (dl["t_end"][beat] - dl["rpeaks"][beat]) * 1000 / ph.FS
        assert row.es_time_ms == pytest.approx(t_end_ms, abs=0.01)
        assert abs(row.es_time_ms / row.cine_rr_ms * ph.N_FRAMES - row.es_frame) <= 1.0
        assert row.cine_rpeak_sample == round(dl["rpeaks"][beat])
        # isovolumic relaxation < rapid filling < atrial kick, all after ES and before the next R
        tm = truth["timing"]
        assert tm["es_ms"] < tm["rapid_fill_start_ms"] < tm["atrial_kick_start_ms"] < tm["rr_ms"]
        assert tm["atrial_kick_start_ms"] > tm["p_on_next_ms"] + 50


def test_es_agrees_with_an_independent_delineator(phantom):
    """neurokit2's wavelet delineation of lead II read back from the XML (normal class: upright T)."""
    out, m = phantom
    normals = m[m["class"] == "normal"]
    assert len(normals) >= 2
    for row in normals.itertuples():
        lead2 = ecg_io.read_ecg(out / row.ecg_path)[1]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            clean = nk.ecg_clean(lead2, sampling_rate=ph.FS)
            _, info = nk.ecg_peaks(clean, sampling_rate=ph.FS)
            rpeaks = np.asarray(info["ECG_R_Peaks"])
            _, waves = nk.ecg_delineate(clean, rpeaks, sampling_rate=ph.FS, method="dwt")
        k = int(np.argmin(np.abs(rpeaks - row.cine_rpeak_sample)))
        assert abs(rpeaks[k] - row.cine_rpeak_sample) <= 5                 # same R-peak (10 ms)
        t_off = (waves["ECG_T_Offsets"][k] - rpeaks[k]) * 1000 / ph.FS
        assert abs(t_off - row.es_time_ms) < 30, (row.subject_id, t_off, row.es_time_ms)


def test_ef_and_areas_from_masks(phantom):
    out, m = phantom
    for row in m.itertuples():
        lv = _lv_curve(out, row)
        assert row.lv_ed_area_px == lv[0] and row.lv_es_area_px == lv.min()
        assert row.lv_ed_area_mm2 == pytest.approx(lv[0] * row.pixel_mm ** 2, rel=1e-4)
        assert row.ef_area == pytest.approx(100 * (lv[0] - lv.min()) / lv[0], abs=1e-3)
        assert lv[row.es_frame] <= lv.min() * 1.02                  # the ES frame is (nearly) the smallest
        truth = json.loads((out / "truth" / f"{row.subject_id}.json").read_text())
        assert row.ef_area == pytest.approx(100 * truth["params"]["ef_area_target"], abs=3.0)


def _sokolow_mv(ecg: np.ndarray, rpeaks: np.ndarray) -> float:
    """S in V1 + max(R in V5, R in V6), median over beats (mV)."""
    vals = []
    for r in rpeaks.astype(int):
        if 60 <= r < ecg.shape[1] - 60:
            win = slice(r - 60, r + 60)
            vals.append(-ecg[6, win].min() + max(ecg[10, win].max(), ecg[11, win].max()))
    return float(np.median(vals))


def test_classes_differ_in_ecg_and_anatomy(phantom):
    out, m = phantom
    by = {c: m[m["class"] == c] for c in ph.CLASSES}
    normal, dilated, hyper = by["normal"], by["dilated"], by["hypertrophic"]
    assert hyper.wall_thickness_mm.min() > normal.wall_thickness_mm.max() > dilated.wall_thickness_mm.max()
    assert dilated.lv_ed_area_mm2.min() > normal.lv_ed_area_mm2.max() > hyper.lv_ed_area_mm2.max()
    assert dilated.ef_area.max() < 35 < 45 < normal.ef_area.min() and hyper.ef_area.min() > 55
    assert dilated.qrs_ms.min() > 120 > 110 > normal.qrs_ms.max()
    volt = {}
    for row in m.itertuples():
        truth = json.loads((out / "truth" / f"{row.subject_id}.json").read_text())
        sim_ecg = ph.simulate(SEED, int(row.subject_id[2:]))["clean"]
        volt[row.subject_id] = _sokolow_mv(sim_ecg, np.array(truth["delineation_samples"]["rpeaks"]))
    assert min(volt[s] for s in hyper.subject_id) > 3.5 > max(volt[s] for s in normal.subject_id)
    # over many subjects (parameters only, cheap): the class ranges hold and anatomy varies within a class
    params = [ph.sample_params(SEED, i) for i in range(80)]
    for cls in ph.CLASSES:
        sel = [p for p in params if p["class"] == cls]
        assert len(sel) == 20 * (2 if cls == "normal" else 1)
        for key in ("theta_deg", "rv_halfwidth_mm", "la_min_area_mm2", "noise_sigma", "heart_scale"):
            assert np.std([p[key] for p in sel]) > 0


def test_qt_grows_with_rr():
    p = ph.sample_params(SEED, 0)
    qts = {}
    for hr in (55.0, 100.0):
        clean, _ = ph.synthesize_ecg(p, np.random.default_rng(1), hr_override=hr)
        d = ph.delineate(clean)
        qt = (d["t_end"] - d["qrs_on"]) * 1000 / ph.FS
        rr = np.median(np.diff(d["rpeaks"])) * 1000 / ph.FS
        qts[hr] = (float(np.nanmedian(qt)), rr)
    (qt_slow, rr_slow), (qt_fast, rr_fast) = qts[55.0], qts[100.0]
    assert qt_slow > qt_fast + 60
    # Bazett: QT / sqrt(RR) nearly constant
    assert qt_slow / math.sqrt(rr_slow) == pytest.approx(qt_fast / math.sqrt(rr_fast), rel=0.05)


def test_heart_rate_variability_and_noise(phantom):
    out, m = phantom
    truth = json.loads((out / "truth" / f"{m.subject_id[0]}.json").read_text())
    rr = np.diff(truth["delineation_samples"]["rpeaks"])
    assert np.std(rr) > 0.5                                  # samples: the rhythm is not a metronome
    sim = ph.simulate(SEED, 0)
    resid = sim["ecg"] - sim["clean"]
    assert 0.003 < np.std(resid) < 0.3                       # mV: noise + baseline wander, not a new signal
    np.testing.assert_allclose(sim["ecg"][2], sim["ecg"][1] - sim["ecg"][0], atol=1e-9)   # III = II - I


def test_ecg_xml_round_trip(phantom):
    out, m = phantom
    for row in m.itertuples():
        ecg = ecg_io.read_ecg(out / row.ecg_path)
        assert ecg.shape == (12, 5000) and ecg.dtype == np.float32
        sim = ph.simulate(SEED, int(row.subject_id[2:]))
        np.testing.assert_allclose(ecg, sim["ecg"], atol=ph.RESOLUTION_UV / 2000 + 1e-6)


def test_rpeaks_match_the_pipeline_detector(phantom):
    out, m = phantom
    for row in m.itertuples():
        truth = json.loads((out / "truth" / f"{row.subject_id}.json").read_text())
        ours = np.array(truth["delineation_samples"]["rpeaks"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            found = phase.detect_rpeaks(ecg_io.read_ecg(out / row.ecg_path), ph.FS)
        inner = ours[(ours > 100) & (ours < 4900)]
        err = np.array([np.min(np.abs(found - r)) for r in inner]) * 1000 / ph.FS
        assert np.median(err) <= 10 and np.mean(err <= 16) >= 0.8, (row.subject_id, err.tolist())


def test_figure(phantom, tmp_path):
    out, m = phantom
    png = tmp_path / "fig.png"
    assert phantom_figure.main(["--subject", str(out / m.cmr_path[0]), "--out", str(png)]) == 0
    assert png.stat().st_size > 20_000


def test_ecg_only_pool_leaves_the_paired_subjects_unchanged(phantom, tmp_path):
    out, m = phantom
    other = tmp_path / "with_pool"
    assert build.main(["--out", str(other), "--n", "2", "--seed", str(SEED), "--ecg-only", "3", "--quiet"]) == 0
    for sid in m.subject_id[:2]:
        for sub in ("ecg", "cmr", "masks", "truth"):
            name = f"{sid}.xml" if sub == "ecg" else f"{sid}.json" if sub == "truth" else f"{sid}.nii.gz"
            assert (out / sub / name).read_bytes() == (other / sub / name).read_bytes(), (sub, sid)
    paired = pd.read_csv(other / "manifest.csv", dtype={"subject_id": str})
    pd.testing.assert_frame_equal(paired, m.iloc[:2].reset_index(drop=True))
    pool = pd.read_csv(other / build.POOL_DIR / "manifest.csv", dtype={"subject_id": str})
    assert list(pool.subject_id) == ["PH100000", "PH100001", "PH100002"]
    assert "cmr_path" not in pool.columns and "oracle_cmr_path" in pool.columns   # never read as pairs
    truth = json.loads((other / build.POOL_DIR / "truth" / "PH100001.json").read_text())
    assert truth["params"]["index"] == build.POOL_START + 1
    # the oracle cine is the phantom's true cine of that ECG-only subject
    cine = _load(other / build.POOL_DIR / pool.oracle_cmr_path[1])[1][:, :, 0, :]
    np.testing.assert_array_equal(cine, np.moveaxis(ph.simulate(SEED, build.POOL_START + 1)["cine"], 0, -1))


def test_qt_without_any_measurable_t_end_falls_back_to_the_simulated_qt():
    sim = ph.simulate(SEED, 0)
    measured = ph.ground_truth(sim)["manifest"]
    sim["delineation"] = {**sim["delineation"], "t_end": np.full(len(sim["delineation"]["t_end"]), np.nan)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")                       # no "All-NaN slice" warning either
        fallback = ph.ground_truth(sim)["manifest"]
    rr_s = fallback["rr_ms"] / 1000
    assert fallback["qt_ms"] == pytest.approx(sim["params"]["qtc_target_ms"] * math.sqrt(rr_s))
    assert fallback["qtc_ms"] == pytest.approx(sim["params"]["qtc_target_ms"])
    assert abs(fallback["qt_ms"] - measured["qt_ms"]) < 40   # ms: the delineated QT agrees with it
