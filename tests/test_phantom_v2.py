"""Phantom version 2: determinism, files, coupling with scatter; version 1 unchanged; the realism
measures against known answers; a manifest of another phantom version is refused."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import math

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from ecgflowcmr.config import ConfigError, config_from_dict
from ecgflowcmr.data.prepare import PrepareError
from ecgflowcmr.phantom import build, v2
from ecgflowcmr.phantom import v1 as ph
from ecgflowcmr.prepare_data import prepare_dataset as prepare

from .conftest import ROOT

# Version 1 before version 2 existed: sha256 (16 hex) of int16 cine + uint8 masks + ECG in 5 uV
# steps for (seed, index), and of the manifest of 4 subjects, seed 0.
V1_REFERENCE = {(0, 0): "b7d34285e7d82420", (0, 1): "440e99196465cddf", (0, 2): "e277774ca67e9833",
                (0, 3): "ed562e890ee9c98e", (1, 5): "362a8eff59ea1104"}
V1_MANIFEST_N4 = "20fea8ce4d6ba083"


def _digest(sim: dict) -> str:
    h = hashlib.sha256()
    h.update(sim["cine"].tobytes())
    h.update(sim["masks"].tobytes())
    h.update(np.rint(sim["ecg"] * 200).astype(np.int64).tobytes())
    return h.hexdigest()[:16]


def _realism():
    spec = importlib.util.spec_from_file_location("phantom_realism", ROOT / "benchmarks" / "phantom_realism.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def v2_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom_v2")
    build.generate(out, 4, seed=3, workers=1, progress=False, version=2)
    return out


# ----------------------------------------------------------------------------- version 1 unchanged

@pytest.mark.parametrize("seed,index", [(0, 0), (0, 3), (1, 5)])
def test_version_1_is_bit_for_bit_unchanged(seed, index):
    assert _digest(ph.simulate(seed, index)) == V1_REFERENCE[(seed, index)]


def test_version_1_manifest_unchanged(tmp_path):
    manifest = build.generate(tmp_path, 4, seed=0, workers=1, progress=False)
    assert hashlib.sha256(manifest.read_bytes()).hexdigest()[:16] == V1_MANIFEST_N4
    assert "phantom_version" not in pd.read_csv(manifest).columns


# ----------------------------------------------------------------------------- version 2

def test_v2_deterministic_per_seed_and_workers(v2_dir, tmp_path):
    a, b = v2.simulate(3, 1), v2.simulate(3, 1)
    for key in ("cine", "masks", "ecg"):
        np.testing.assert_array_equal(a[key], b[key])
    assert _digest(v2.simulate(4, 1)) != _digest(a)
    build.generate(tmp_path, 3, seed=3, workers=2, progress=False, version=2)
    for sid in ("PH00000", "PH00002"):
        for sub in ("cmr", "masks"):
            np.testing.assert_array_equal(np.asarray(nib.load(v2_dir / sub / f"{sid}.nii.gz").dataobj),
                                          np.asarray(nib.load(tmp_path / sub / f"{sid}.nii.gz").dataobj))
    assert (v2_dir / "ecg" / "PH00001.xml").read_bytes() == (tmp_path / "ecg" / "PH00001.xml").read_bytes()


def test_v2_files_layout_and_truth(v2_dir):
    m = pd.read_csv(v2_dir / "manifest.csv", dtype={"subject_id": str})
    assert set(m["phantom_version"]) == {2}
    for row in m.itertuples():
        img = nib.load(v2_dir / row.cmr_path)
        assert img.shape == (208, 180, 1, 50) and img.get_data_dtype() == np.int16
        assert img.header.get_zooms()[:2] == pytest.approx((1.827, 1.827), abs=1e-4)
        masks = np.asarray(nib.load(v2_dir / row.mask_path).dataobj)
        assert set(np.unique(masks)) == {0, 1, 2, 3, 4, 5}
        assert row.es_time_ms == pytest.approx(row.t_end_ms + row.em_offset_ms, abs=1e-3)
        assert 250 < row.cine_qt_ms < 600 and row.cine_qt_ms > row.t_end_ms    # QRS onset precedes the R-peak
        lv = (masks[:, :, 0, :] == 1).sum(axis=(0, 1))
        assert int(np.argmin(lv)) == row.es_frame or abs(int(np.argmin(lv)) - row.es_frame) <= 1
    truth = json.loads((v2_dir / "truth" / "PH00000.json").read_text())
    assert truth["params"]["generator_version"] == 2 and truth["params"]["prevalence"] == [0.8, 0.1, 0.1]


def test_v2_resume_keeps_done_subjects_and_other_prevalence_redoes_them(v2_dir):
    before = (v2_dir / "truth" / "PH00000.json").stat().st_mtime_ns
    build.generate(v2_dir, 4, seed=3, workers=1, progress=False, version=2)
    assert (v2_dir / "truth" / "PH00000.json").stat().st_mtime_ns == before
    assert not build._is_done(v2_dir, 3, 0, 2, [1.0, 0.0, 0.0])
    assert not build._is_done(v2_dir, 3, 0, 1)


def test_prevalence_and_class_draws():
    classes = [v2.subject_class(0, i) for i in range(3000)]
    shares = [classes.count(c) / len(classes) for c in ph.CLASSES]
    assert shares == pytest.approx([0.8, 0.1, 0.1], abs=0.03)
    assert {v2.subject_class(0, i, (0.0, 1.0, 0.0)) for i in range(50)} == {"dilated"}


def test_phenotypes_overlap_across_classes():
    """Dilated hearts with a narrow QRS and bundle branch block without dilation both occur; EF is
    drawn as a volume EF and its area EF follows the area-length method."""
    params = [v2.sample_params(0, i) for i in range(1500)]
    dilated_narrow = sum(p["class"] == "dilated" and not p["lbbb"] for p in params)
    lbbb_not_dilated = sum(p["lbbb"] and p["class"] != "dilated" for p in params)
    assert dilated_narrow > 20 and lbbb_not_dilated > 5
    ef = np.array([p["ef_volume_target"] for p in params if p["class"] == "normal"])
    assert 0.59 < ef.mean() < 0.63 and 0.04 < ef.std() < 0.07
    hr = np.array([p["hr_target_bpm"] for p in params])
    assert 60 < hr.mean() < 65
    offsets = np.array([p["em_offset_ms"] for p in params])
    assert offsets.std() > 10
    p = params[0]
    length = p["lv_length_mm"] * p["heart_scale"]
    assert v2.volume_ef_from_area_ef(p["ef_area_target"], length, length - p["mapse_mm"]) == \
        pytest.approx(p["ef_volume_target"], abs=1e-9)


def test_unmeasurable_qrs_offset_falls_back_to_the_simulated_interval(tmp_path):
    """Subject 319 of seed 1 (version 2): a bundle branch block at 88 bpm whose steep ST segment
    leaves every QRS offset unmeasurable by the delineator; its files are still written, with the
    simulated QRS duration as the truth."""
    for folder in ("ecg", "cmr", "masks", "truth"):
        (tmp_path / folder).mkdir()
    truth = build.generate_subject(tmp_path, 1, 319, version=2, prevalence=v2.DEFAULT_PREVALENCE)
    sim = v2.simulate(1, 319, v2.DEFAULT_PREVALENCE)
    assert not np.isfinite(sim["delineation"]["qrs_off"]).any()
    assert truth["manifest"]["qrs_ms"] == pytest.approx(sim["params"]["qrs_target_ms"])
    assert (tmp_path / "ecg" / f"{truth['manifest']['subject_id']}.xml").exists()


def test_area_length_round_trip():
    area_ef = v2.area_ef_from_volume_ef(0.6, 90.0, 15.0)
    assert area_ef == pytest.approx(1 - math.sqrt(0.4 * 75 / 90))
    assert v2.volume_ef_from_area_ef(area_ef, 90.0, 75.0) == pytest.approx(0.6)
    assert _realism().implied_volume_ef(1.0, 1 - area_ef, 90.0, 75.0) == pytest.approx(0.6)


def test_cli_version_and_prevalence(tmp_path):
    assert build.main(["--out", str(tmp_path), "--n", "1", "--version", "2", "--prevalence", "0,0,1", "--quiet"]) == 0
    m = pd.read_csv(tmp_path / "manifest.csv")
    assert list(m["class"]) == ["hypertrophic"] and list(m["phantom_version"]) == [2]
    with pytest.raises(SystemExit):
        build.main(["--out", str(tmp_path), "--n", "1", "--version", "2", "--prevalence", "0.5,0.5", "--quiet"])


# ----------------------------------------------------------------------------- config and prepare

def test_config_keys_validated():
    assert config_from_dict({}).data.phantom_version == 1
    with pytest.raises(ConfigError, match="data.phantom_version"):
        config_from_dict({"data": {"phantom_version": 3}})
    with pytest.raises(ConfigError, match="data.phantom_prevalence"):
        config_from_dict({"data": {"phantom_prevalence": [0.5, 0.2, 0.2]}})


def _cfg(tmp_path, phantom_dir, version, n):
    return config_from_dict({"name": "p", "run_dir": str(tmp_path / "run"),
                             "data": {"phantom_dir": str(phantom_dir), "phantom_n": n, "workers": 1,
                                      "phantom_version": version}})


def test_prepare_refuses_another_phantom_version(v2_dir, tmp_path):
    with pytest.raises(PrepareError, match=r"phantom version 2, but data.phantom_version is 1"):
        prepare(_cfg(tmp_path, v2_dir, 1, 4), max_records=0, progress=False)
    # a phantom manifest without the column is version 1's
    v1_dir = tmp_path / "v1"
    build.generate(v1_dir, 2, seed=0, workers=1, progress=False)
    with pytest.raises(PrepareError, match=r"phantom version 1, but data.phantom_version is 2"):
        prepare(_cfg(tmp_path, v1_dir, 2, 5), max_records=0, progress=False)   # not regenerated either
    assert len(pd.read_csv(v1_dir / "manifest.csv")) == 2


def test_prepared_meta_names_the_version(tmp_path):
    cfg = _cfg(tmp_path, tmp_path / "phantom", 2, 3)
    root = prepare(cfg, progress=False)
    assert json.loads((root / "meta.json").read_text())["phantom_version"] == 2


# ----------------------------------------------------------------------------- realism measures

def test_convexity_known_answers():
    r = _realism()
    yy, xx = np.mgrid[:80, :80]
    disc = (yy - 40) ** 2 + (xx - 40) ** 2 <= 30 ** 2
    assert r.convexity(disc) == pytest.approx(1.0, abs=0.02)
    ell = np.zeros((10, 10), bool)
    ell[2:8, 2:4] = True
    ell[6:8, 4:8] = True                     # an L of 12 + 8 pixels; 26 pixel centres in its hull
    assert r.convexity(ell) == pytest.approx(20 / 26)
    assert r.convexity(disc & ~((yy - 40) ** 2 + (xx - 70) ** 2 <= 20 ** 2)) < 0.95   # a bite out of it


def test_edge_width_of_a_blurred_step():
    from scipy.special import erf

    r = _realism()
    sigma_mm, px = 1.6, 1.827
    x = (np.arange(60) - 29.5) * px          # the border lies between columns 29 and 30
    profile = 100 + 700 * 0.5 * (1 + erf(x / (math.sqrt(2) * sigma_mm)))
    image = np.tile(profile, (40, 1))
    inside = np.zeros_like(image, bool)
    inside[:, 30:] = True
    width = r.edge_width_mm(image, inside, ~inside, px)
    assert width == pytest.approx(2.5631 * sigma_mm, rel=0.02)


def test_blood_cov_auc_axis_known_answers():
    r = _realism()
    rng = np.random.default_rng(0)
    image = np.full((60, 60), 100.0)
    lv = np.zeros((60, 60), bool)
    lv[10:50, 10:50] = True
    image[lv] = 800 * (1 + 0.08 * rng.standard_normal(lv.sum()))
    myo = np.zeros_like(lv)
    myo[5:10, 10:50] = True
    assert r.blood_cov(image, lv, myo) == pytest.approx(0.08, rel=0.1)
    assert r.auc(np.array([1.0, 2, 3, 4]), np.array([False, False, True, True])) == 1.0
    assert r.auc(np.array([1.0, 1, 1, 1]), np.array([False, True, False, True])) == 0.5
    rect = np.zeros((50, 50), bool)
    rect[20:25, 5:45] = True
    length, angle, _ = r.principal_axis(rect, 2.0)
    assert length == pytest.approx(80.0) and min(abs(angle), abs(abs(angle) - 180)) < 1e-6


def test_realism_on_a_small_v2_folder(v2_dir):
    r = _realism()
    s = r.measure_folder(v2_dir, progress=False)
    assert s["n"] == 4 and s["fov_mm"].startswith("380 x 329 on 208 x 180")
    assert 50 < s["hr_bpm"] < 80 and 0.3 < s["es_fraction"] < 0.45
    assert 0.5 < s["convexity_ed"] <= 1 and 0.02 < s["blood_cov_ed"] < 0.2 and 2 < s["edge_mm"] < 8
    text = r.table_markdown(["v2"], [s])
    assert "| heart rate (bpm, mean) |" in text and "UK Biobank" in text


# ----------------------------------------------------------------------------- physical crop

def _moving_cine(path, pixel_mm, shape=(160, 140)):
    t = np.arange(20)[:, None, None]
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    radius = 12 + 4 * np.cos(2 * np.pi * t / 20)
    frames = 100 + 700 * ((yy - 80) ** 2 + (xx - 70) ** 2 <= radius ** 2)
    img = nib.Nifti1Image(np.transpose(frames, (1, 2, 0))[:, :, None, :].astype(np.int16),
                          np.diag([pixel_mm, pixel_mm, 8.0, 1.0]))
    nib.save(img, path)
    return frames


def test_crop_in_mm_is_physical_and_off_by_default(tmp_path):
    from ecgflowcmr.data import cmr_io
    from ecgflowcmr.data.prepare import _fingerprint

    _moving_cine(tmp_path / "a.nii.gz", 2.0)
    _, box = cmr_io.read_cine(tmp_path / "a.nii.gz", return_box=True)
    assert box.size == round(0.75 * 140)                                  # relative: unchanged default
    _, box = cmr_io.read_cine(tmp_path / "a.nii.gz", return_box=True, crop_mm=120.0)
    assert box.size == 60                                                 # 120 mm of 2 mm pixels
    np.save(tmp_path / "a.npy", _moving_cine(tmp_path / "b.nii.gz", 1.0))
    with pytest.raises(cmr_io.CMRReadError, match="data.crop_mm"):
        cmr_io.read_cine(tmp_path / "a.npy", crop_mm=120.0)
    cfg = config_from_dict({})
    assert cfg.data.crop_mm == 0.0
    from ecgflowcmr.data.prepare import FORMAT_VERSION

    old = hashlib.sha256(b"x")                      # the fingerprint of datasets prepared before data.crop_mm
    old.update(json.dumps({"format": FORMAT_VERSION, "tolerance": 0.5}).encode())
    assert _fingerprint(b"x", cfg) == old.hexdigest()[:16]
    assert _fingerprint(b"x", config_from_dict({"data": {"crop_mm": 240.0}})) != _fingerprint(b"x", cfg)
