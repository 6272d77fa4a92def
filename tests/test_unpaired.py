"""ECG-only records (data.unpaired_ecg): prepared with the paired readers and QC, used by stage 1 only."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from ecgflowcmr.config import config_from_dict
from ecgflowcmr.data.datasets import Prepared
from ecgflowcmr.data.ecg_io import read_ecg
from ecgflowcmr.data.phase import detect_rpeaks
from ecgflowcmr.data.prepare import PrepareError, prepare_ecg_only
from ecgflowcmr.ecg.train import training_sets
from tests.conftest import EXAMPLE_ECG_DIR, PTBXL_RECORDS, write_fake_prepared


def ptbxl_folder(folder, names=PTBXL_RECORDS[:3]):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        for suffix in (".hea", ".mat"):
            shutil.copy(EXAMPLE_ECG_DIR / f"{name}{suffix}", folder / f"{name}{suffix}")
    return folder


def cfg_for(tmp_path, source):
    return config_from_dict({"run_dir": str(tmp_path / "run"), "data": {"root": str(tmp_path / "data"),
                                                                        "unpaired_ecg": str(source), "workers": 0}})


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """A folder of 3 real records and one flat one (refused), prepared as ECG-only records."""
    tmp_path = tmp_path_factory.mktemp("pool")
    folder = ptbxl_folder(tmp_path / "ecgs")
    np.save(folder / "flat.npy", np.zeros((12, 5000), dtype=np.float32))
    cfg = cfg_for(tmp_path, folder)
    root = prepare_ecg_only(cfg, progress=False)
    return cfg, folder, root


def test_folder_of_ecgs_is_prepared_like_paired_records(pool):
    cfg, folder, root = pool
    assert root == cfg.unpaired_root
    data = Prepared(root)
    assert data.meta["ecg_only"] and data.meta["n"] == 3 and data.cine is None
    assert data.subject_ids() == PTBXL_RECORDS[:3]
    assert list(data.subjects["split"]) == ["train"] * 3
    for row, name in enumerate(PTBXL_RECORDS[:3]):
        ecg = read_ecg(folder / f"{name}.hea")
        np.testing.assert_array_equal(data.ecg[row], ecg)
        np.testing.assert_array_equal(data.rpeaks_of(row), detect_rpeaks(ecg))
    qc = pd.read_csv(root / "qc_report.csv")
    assert list(qc["subject_id"]) == ["flat"] and "flat" in qc["reason"][0]
    provenance = pd.read_csv(root / "provenance.csv")
    assert list(provenance["rpeak_lead"]) == ["II"] * 3 and "cmr_file" not in provenance.columns
    assert prepare_ecg_only(cfg, progress=False) == root                  # complete: a no-op


def test_manifest_of_ecgs_and_bad_sources(tmp_path, monkeypatch):
    folder = ptbxl_folder(tmp_path / "ecgs", PTBXL_RECORDS[3:])
    manifest = tmp_path / "ecg_only.csv"
    manifest.write_text("subject_id,ecg_path\nA,ecgs/HR06003.hea\nB,ecgs/HR06004.hea\nC,ecgs/missing.hea\n")
    monkeypatch.chdir(tmp_path.parent)             # a relative manifest path: ecg paths are relative to it
    root = prepare_ecg_only(cfg_for(tmp_path.relative_to(tmp_path.parent), manifest.relative_to(tmp_path.parent)),
                            progress=False)
    data = Prepared(root)
    assert data.subject_ids() == ["A", "B"]
    np.testing.assert_array_equal(data.ecg[1], read_ecg(folder / "HR06004.hea"))
    qc = pd.read_csv(root / "qc_report.csv")
    assert list(qc["subject_id"]) == ["C"] and "missing.hea" in qc["file"][0]

    with pytest.raises(PrepareError, match="neither a folder of ECG files nor a manifest"):
        prepare_ecg_only(cfg_for(tmp_path / "x", tmp_path / "nowhere"), progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PrepareError, match="no ECG file"):
        prepare_ecg_only(cfg_for(tmp_path / "y", tmp_path / "empty"), progress=False)
    bad = tmp_path / "bad.csv"
    bad.write_text("subject_id,path\nA,ecgs/HR06003.hea\n")
    with pytest.raises(PrepareError, match="needs an ecg_path column"):
        prepare_ecg_only(cfg_for(tmp_path / "z", bad), progress=False)
    # a pool prepared from other records is not overwritten silently
    with pytest.raises(PrepareError, match="Delete"):
        prepare_ecg_only(cfg_for(tmp_path, folder), progress=False)


def test_stage1_trains_on_paired_plus_ecg_only_without_held_out_subjects(tmp_path):
    write_fake_prepared(tmp_path / "data", n=12)      # S0000-S0007 train, S0008-9 val, S0010-11 test
    folder = ptbxl_folder(tmp_path / "ecgs", PTBXL_RECORDS[:2])
    shutil.copy(EXAMPLE_ECG_DIR / f"{PTBXL_RECORDS[2]}.hea", folder / "S0009.hea")     # a val subject
    shutil.copy(EXAMPLE_ECG_DIR / f"{PTBXL_RECORDS[2]}.mat", folder / f"{PTBXL_RECORDS[2]}.mat")
    cfg = cfg_for(tmp_path, folder)
    with pytest.raises(FileNotFoundError, match="prepare_data.py"):
        training_sets(cfg)                                               # not prepared yet
    prepare_ecg_only(cfg, progress=False)
    assert json.loads((cfg.unpaired_root / "meta.json").read_text())["n"] == 3
    train_set, paired, val = training_sets(cfg)
    assert len(paired) == 8 and len(val) == 2
    assert len(train_set) == 8 + 2                   # the val subject's ECG-only record is left out
    item = train_set[9]
    assert item["ecg"].shape == (12, 5000) and item["phase"].shape == (625, 2) and item["rpeaks"].shape == (64,)
    train_only, _, _ = training_sets(config_from_dict({"data": {"root": str(tmp_path / "data")}}))
    assert len(train_only) == 8
