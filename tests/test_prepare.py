"""Data preparation: manifest -> prepared dataset, QC, splits, no-op re-run, resume."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ecgflowcmr.config import config_from_dict, save_config
from ecgflowcmr.data import prepare as prep
from ecgflowcmr.data.datasets import Prepared, PreparedDataset
from ecgflowcmr.data.prepare import PrepareError
from ecgflowcmr.prepare_data import prepare_dataset as prepare
from tests.conftest import EXAMPLE_ECG_DIR, PTBXL_RECORDS
from tests.test_cmr_io import blob_cine, write_nifti
from tests.test_ecg_io import write_ukb_xml

# Record 3 and 4 belong to the same subject; record 2 has a corrupt ECG, record 5 an empty cine.
SUBJECTS = ["S000", "S001", "S002", "S003", "S003", "S004", "S005", "S006"]
BAD = {2: "ecg", 5: "cmr"}


def build_raw(folder: Path, subjects=SUBJECTS, bad=BAD, split=None) -> Path:
    """UK Biobank-style XML ECGs (from the PTB-XL examples) + NIfTI cines/masks + manifest."""
    import wfdb

    (folder / "ecg").mkdir(parents=True, exist_ok=True)
    (folder / "cmr").mkdir(exist_ok=True)
    rows = []
    for k, sid in enumerate(subjects):
        signal = wfdb.rdrecord(str(EXAMPLE_ECG_DIR / PTBXL_RECORDS[k % 5])).p_signal.T * (1 + 0.1 * k)
        ecg_path = write_ukb_xml(folder / "ecg" / f"{sid}_{k}.xml", signal)
        frames, labels = blob_cine(height=112 + 8 * (k % 3), width=128, frames=25 + 5 * (k % 3),
                                   centre=(50.0 + 2 * k, 60.0 + 3 * k), seed=k)
        cmr_path = write_nifti(folder / "cmr" / f"{sid}_{k}.nii.gz", frames)
        mask_path = write_nifti(folder / "cmr" / f"{sid}_{k}_mask.nii.gz", labels)
        if bad.get(k) == "ecg":
            ecg_path.write_text(ecg_path.read_text()[:4000])  # cut mid-file
        elif bad.get(k) == "cmr":
            write_nifti(cmr_path, np.zeros_like(frames))
        row = {"subject_id": sid, "ecg_path": f"ecg/{ecg_path.name}", "cmr_path": f"cmr/{cmr_path.name}",
               "mask_path": str(mask_path.resolve()),  # absolute paths work too
               "class": ["normal", "dilated", "hypertrophic"][k % 3], "ef": 0.5 + 0.01 * k}
        if split is not None:
            row["split"] = split[k]
        rows.append(row)
    manifest = folder / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest


def make_cfg(tmp_path: Path, manifest: Path, root: str = "data", **data):
    values = {"name": "t", "run_dir": str(tmp_path / "run"),
              "data": {"manifest": str(manifest), "root": str(tmp_path / root), "workers": 0,
                       "split_fractions": [0.6, 0.2, 0.2], **data}}
    return config_from_dict(values)


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    return build_raw(tmp_path_factory.mktemp("raw"))


@pytest.fixture(scope="module")
def prepared(raw, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prep")
    cfg = make_cfg(tmp, raw, workers=2)  # worker processes
    return cfg, prepare(cfg, progress=False)


def test_prepare_keeps_good_records_and_reports_bad(prepared, raw):
    _, root = prepared
    meta = json.loads((root / "meta.json").read_text())
    assert meta["complete"] and meta["n"] == 6 and meta["rejected"] == 2 and meta["masks"]
    qc = pd.read_csv(root / "qc_report.csv", dtype=str)
    assert list(qc["subject_id"]) == ["S002", "S004"]
    assert qc["file"][0].endswith("S002_2.xml") and "unreadable XML" in qc["reason"][0]
    assert qc["file"][1].endswith("S004_5.nii.gz") and "empty image" in qc["reason"][1]
    assert not (root / prep.WORK_DIR).exists()

    data = Prepared(root)
    assert data.ecg.shape == (6, 12, 5000) and data.ecg.dtype == np.float32
    assert data.cine.shape == (6, 50, 96, 96) and data.cine.dtype == np.uint8
    assert data.masks.shape == (6, 50, 96, 96) and data.masks.dtype == np.uint8
    assert data.rpeaks.dtype == np.int32 and data.rpeaks.shape[0] == 6
    assert isinstance(data.ecg, np.memmap) and isinstance(data.cine, np.memmap)
    kept = [0, 1, 3, 4, 6, 7]
    assert data.subject_ids() == [SUBJECTS[k] for k in kept]
    np.testing.assert_allclose(data.subjects["ef"], [0.5 + 0.01 * k for k in kept])
    assert list(data.subjects["class"]) == [["normal", "dilated", "hypertrophic"][k % 3] for k in kept]
    assert list(data.subjects.columns[:3]) == ["index", "subject_id", "split"]

    # Each row is what the readers give for that record (manifest order kept).
    from ecgflowcmr.data.cmr_io import cine_to_uint8, read_cine, read_mask
    from ecgflowcmr.data.ecg_io import read_ecg
    from ecgflowcmr.data.phase import detect_rpeaks

    manifest = pd.read_csv(raw)
    for row, k in enumerate(kept):
        ecg = read_ecg(raw.parent / manifest["ecg_path"][k])
        np.testing.assert_array_equal(data.ecg[row], ecg)
        np.testing.assert_array_equal(data.rpeaks_of(row), detect_rpeaks(ecg))
        cine, box = read_cine(raw.parent / manifest["cmr_path"][k], return_box=True)
        np.testing.assert_array_equal(data.cine[row], cine_to_uint8(cine[0]))
        np.testing.assert_array_equal(data.masks[row], read_mask(manifest["mask_path"][k], box))
    assert np.all(data.rpeaks[data.rpeaks >= 0] < 5000)

    item = PreparedDataset(root, "train", fields=("ecg", "cine", "mask"))[0]
    assert item["cine"].shape == (1, 50, 96, 96) and float(item["cine"].min()) >= -1
    provenance = pd.read_csv(root / "provenance.csv")
    assert list(provenance["manifest_row"]) == kept and (provenance["crop_size"] > 0).all()
    # how each record's R-peaks were found: on lead II, voted by its usable leads and all detectors
    for row, k in enumerate(kept):
        _, how = detect_rpeaks(read_ecg(raw.parent / manifest["ecg_path"][k]), return_info=True)
        assert provenance["rpeak_lead"][row] == how["placed_on"] == "II"
        assert provenance["rpeak_voters"][row] == how["voters"] and how["voters"].startswith("II,")
        assert provenance["rpeak_runs"][row] == how["runs"] >= 2


def test_splits_by_subject(prepared):
    _, root = prepared
    data = Prepared(root)
    splits = json.loads((root / "splits.json").read_text())
    assert set(splits) == {"train", "val", "test"}
    all_ids = [s for v in splits.values() for s in v]
    assert len(all_ids) == len(set(all_ids)) == 5  # S003's two records: one subject
    assert set(all_ids) == set(data.subject_ids())
    for split, ids in splits.items():
        rows = data.subjects[data.subjects["split"] == split]
        assert set(rows["subject_id"]) == set(ids)
    s003 = data.subjects[data.subjects["subject_id"] == "S003"]["split"]
    assert len(s003) == 2 and s003.nunique() == 1


def test_rerun_is_a_noop(prepared):
    cfg, root = prepared
    stamps = {p.name: p.stat().st_mtime_ns for p in root.iterdir()}
    assert prepare(cfg, progress=False) == root
    assert {p.name: p.stat().st_mtime_ns for p in root.iterdir()} == stamps


def test_resume_after_interruption(raw, tmp_path, prepared):
    _, reference = prepared
    cfg = make_cfg(tmp_path, raw)
    root = prepare(cfg, max_records=3, progress=False)
    meta = json.loads((root / "meta.json").read_text())
    assert meta["complete"] is False
    with pytest.raises(RuntimeError, match="incomplete"):
        Prepared(root)
    journal = root / prep.WORK_DIR / prep.JOURNAL
    assert len(journal.read_text().splitlines()) == 3
    # A crash while the 4th record was being journaled: a cut line and garbage rows.
    with open(journal, "a") as f:
        f.write('{"i": 3, "subject_id": "S0')
    with open(root / "cine.npy", "r+b") as f:
        f.seek(prep._npy_offset(root / "cine.npy") + 2 * 50 * 96 * 96)
        f.write(b"\xff" * 50 * 96 * 96)
    prepare(cfg, max_records=2, progress=False)
    assert len(journal.read_text().splitlines()) == 5  # the cut line was dropped, not extended
    prepare(cfg, progress=False)
    assert json.loads((root / "meta.json").read_text())["complete"]
    for name in ("ecg", "cine", "masks", "rpeaks"):
        np.testing.assert_array_equal(np.load(root / f"{name}.npy"), np.load(reference / f"{name}.npy"))
    for name in ("subjects.csv", "splits.json", "qc_report.csv"):
        assert (root / name).read_text() == (reference / name).read_text()


def test_other_manifest_is_refused_and_split_change_rewrites_splits(tmp_path):
    manifest = build_raw(tmp_path / "raw", bad={})
    cfg = make_cfg(tmp_path, manifest)
    root = prepare(cfg, progress=False)
    ecg_stamp = (root / "ecg.npy").stat().st_mtime_ns
    before = json.loads((root / "splits.json").read_text())
    cfg2 = make_cfg(tmp_path, manifest, split_seed=7, split_fractions=[0.25, 0.5, 0.25])
    prepare(cfg2, progress=False)
    after = json.loads((root / "splits.json").read_text())
    assert (root / "ecg.npy").stat().st_mtime_ns == ecg_stamp
    assert after != before and sorted(sum(after.values(), [])) == sorted(sum(before.values(), []))
    assert json.loads((root / "meta.json").read_text())["split"]["seed"] == 7
    pd.read_csv(manifest).iloc[:3].to_csv(manifest, index=False)
    with pytest.raises(PrepareError, match="another manifest"):
        prepare(cfg, progress=False)


def test_split_column_wins(tmp_path):
    split = ["test", "", "val", "train", "train", "", "", ""]
    manifest = build_raw(tmp_path / "raw", split=split, bad={})
    root = prepare(make_cfg(tmp_path, manifest), progress=False)
    subjects = Prepared(root).subjects.set_index("subject_id")["split"]
    assert subjects["S000"] == "test" and subjects["S002"] == "val"
    assert set(subjects.loc[["S003"]]) == {"train"}


def test_split_errors_and_counts(tmp_path):
    table = pd.DataFrame({"subject_id": ["a", "a", "b"], "split": ["train", "test", ""]})
    with pytest.raises(PrepareError, match="subject a"):
        prep.assign_splits(table, [0.8, 0.1, 0.1], 0)
    table = pd.DataFrame({"subject_id": ["a", "b"], "split": ["holdout", ""]})
    with pytest.raises(PrepareError, match="holdout"):
        prep.assign_splits(table, [0.8, 0.1, 0.1], 0)
    assert prep.split_counts(10, [0.8, 0.1, 0.1]) == [8, 1, 1]
    assert prep.split_counts(5, [0.8, 0.1, 0.1]) == [3, 1, 1]
    assert prep.split_counts(2, [0.8, 0.1, 0.1]) == [2, 0, 0]
    assert prep.split_counts(7, [1.0, 0.0, 0.0]) == [7, 0, 0]
    ids = [f"s{i}" for i in range(100)]
    a = prep.assign_splits(pd.DataFrame({"subject_id": ids}), [0.8, 0.1, 0.1], 3)
    b = prep.assign_splits(pd.DataFrame({"subject_id": ids[::-1]}), [0.8, 0.1, 0.1], 3)
    assert a == b  # manifest order does not matter
    assert sum(v == "val" for v in a.values()) == 10


def test_manifest_errors(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("subject_id,ecg\nx,y\n")
    with pytest.raises(PrepareError, match="cmr_path"):
        prepare(make_cfg(tmp_path, bad), progress=False)
    with pytest.raises(FileNotFoundError, match="absent.csv"):
        prepare(make_cfg(tmp_path, tmp_path / "absent.csv"), progress=False)


def test_nothing_kept_is_an_error(tmp_path):
    manifest = build_raw(tmp_path / "raw", subjects=["A", "B"], bad={0: "ecg", 1: "cmr"})
    with pytest.raises(PrepareError, match="no record"):
        prepare(make_cfg(tmp_path, manifest), progress=False)
    assert len(pd.read_csv(tmp_path / "data" / "qc_report.csv")) == 2


def test_shrink_npy(tmp_path):
    path = tmp_path / "a.npy"
    data = np.arange(1000 * 3 * 4, dtype=np.float32).reshape(1000, 3, 4)
    np.save(path, data)
    prep.shrink_npy(path, 999)
    np.testing.assert_array_equal(np.load(path), data[:999])
    np.testing.assert_array_equal(np.load(path, mmap_mode="r"), data[:999])
    prep.shrink_npy(path, 7)
    np.testing.assert_array_equal(np.load(path), data[:7])
    assert path.stat().st_size == prep._npy_offset(path) + 7 * 12 * 4


def test_cli(raw, tmp_path):
    import prepare_data

    cfg = make_cfg(tmp_path, raw)
    config = tmp_path / "exp.yaml"
    save_config(cfg, config)
    assert prepare_data.main(["--config", str(config), "data.workers=0"]) == 0
    root = tmp_path / "data"
    assert json.loads((root / "meta.json").read_text())["n"] == 6
    assert (root / "config.yaml").is_file()
    assert prepare_data.main(["--config", str(config), "data.manifest=" + str(tmp_path / "nope.csv"),
                              "data.root=" + str(tmp_path / "other")]) == 1


def test_phantom_round_trip(tmp_path):
    out = tmp_path / "phantom"
    cfg = config_from_dict({"name": "p", "run_dir": str(tmp_path / "run"),
                            "data": {"phantom_dir": str(out), "phantom_n": 6, "workers": 2}})
    root = prepare(cfg, max_records=0, progress=False)  # generates the missing phantom, reads nothing
    table = pd.read_csv(out / "manifest.csv", dtype={"subject_id": str})
    assert len(table) == 6 and {"subject_id", "ecg_path", "cmr_path", "mask_path"} <= set(table.columns)
    (out / table["ecg_path"][1]).write_text("<CardiologyXML><StripData>")  # corrupt two records
    cmr = out / table["cmr_path"][4]
    cmr.write_bytes(cmr.read_bytes()[:100])
    assert prepare(cfg, progress=False) == root
    data = Prepared(root)
    assert len(data) == 4 and data.masks is not None
    qc = pd.read_csv(root / "qc_report.csv", dtype={"subject_id": str})
    assert list(qc["subject_id"]) == [table["subject_id"][1], table["subject_id"][4]]
    assert "unreadable XML" in qc["reason"][0] and "unreadable NIfTI" in qc["reason"][1]
    kept = [0, 2, 3, 5]
    labels = [c for c in table.columns if c not in ("subject_id", "ecg_path", "cmr_path", "mask_path")]
    assert list(data.subjects.columns) == ["index", "subject_id", "split", *labels]
    assert data.subject_ids() == [table["subject_id"][k] for k in kept]
    for row, k in enumerate(kept):
        hr = 60 * 500 / np.median(np.diff(data.rpeaks_of(row)))
        if "hr_bpm" in table.columns:  # R-peaks of the prepared ECG agree with the phantom's truth
            assert abs(hr - table["hr_bpm"][k]) < 0.1 * table["hr_bpm"][k]
        assert 35 < hr < 180
        assert set(np.unique(data.masks[row])) <= set(range(6))


def _die_on_fourth(task):
    if task[0] == 3:
        os._exit(1)  # a worker killed mid-record (e.g. by the OOM killer)
    return _ORIGINAL_PROCESS_RECORD(task)


_ORIGINAL_PROCESS_RECORD = prep.process_record


def test_dead_worker_stops_cleanly_and_resumes(raw, tmp_path, monkeypatch, prepared):
    import multiprocessing as mp

    if mp.get_start_method() != "fork":
        pytest.skip("needs forked workers to inherit the patched function")
    _, reference = prepared
    cfg = make_cfg(tmp_path, raw, workers=2)
    monkeypatch.setattr(prep, "process_record", _die_on_fourth)
    with pytest.raises(PrepareError, match="worker process died"):
        prepare(cfg, progress=False)
    done = [e["i"] for e in prep._read_journal(tmp_path / "data" / prep.WORK_DIR / prep.JOURNAL)]
    # How many records the surviving worker finishes before the pool notices the death depends on
    # scheduling; what must hold is that the dead record is not journaled and nothing is twice.
    assert 3 not in done and len(done) == len(set(done))
    monkeypatch.setattr(prep, "process_record", _ORIGINAL_PROCESS_RECORD)
    prepare(cfg, progress=False)
    for name in ("ecg", "cine", "masks", "rpeaks"):
        np.testing.assert_array_equal(np.load(tmp_path / "data" / f"{name}.npy"),
                                      np.load(reference / f"{name}.npy"))


def test_interrupted_finalisation_resumes(raw, tmp_path, monkeypatch, prepared):
    _, reference = prepared
    cfg = make_cfg(tmp_path, raw)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prep, "_write_tables", crash)  # after the arrays were shrunk
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg, progress=False)
    assert prep._npy_rows(tmp_path / "data" / "ecg.npy") == 6
    monkeypatch.undo()
    monkeypatch.setattr(prep, "process_record", None)  # nothing may be read again
    prepare(cfg, progress=False)
    for name in ("ecg", "cine", "masks", "rpeaks"):
        np.testing.assert_array_equal(np.load(tmp_path / "data" / f"{name}.npy"),
                                      np.load(reference / f"{name}.npy"))
