"""UK Biobank bulk files (data.ukb_bulk): DICOM zips + XML ECGs -> manifest -> the prepared dataset,
against the phantom's NIfTI route, and every bad input reported with its reason."""
from __future__ import annotations

import io
import json
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from ecgflowcmr.config import ConfigError, config_from_dict
from ecgflowcmr.data import ukb_bulk as ub
from ecgflowcmr.data.cmr_io import read_cine
from ecgflowcmr.phantom import build
from ecgflowcmr.phantom import ukb_bulk as pb
from ecgflowcmr.prepare_data import prepare_dataset

VARIANTS = ["plain", "mixed", "repeat", "rotated"]      # phantom subjects 0..3 (subject 2: manifest.cvs)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    """Four version-2 phantom subjects, written as NIfTI and as bulk files, one per variant."""
    out = tmp_path_factory.mktemp("phantom")
    build.generate(out, 4, seed=0, workers=1, progress=False, version=2)
    for index, variant in enumerate(VARIANTS):
        pb.write_subject_zip(out, index, seed=0, variant=variant)
    return out


def cfg_for(tmp: Path, **data):
    return config_from_dict({"name": "u", "run_dir": str(tmp / "run"),
                             "data": {"root": str(tmp / "data"), "workers": 0, "crop_mm": 160.0,
                                      "phantom_version": 2, "split_fractions": [0.5, 0.25, 0.25], **data}})


def four_chamber_members(zip_path: Path) -> list[tuple[str, pydicom.Dataset]]:
    """(name, dataset) of the zip's CINE_segmented_LAX_4Ch files, in trigger-time order."""
    out = []
    with zipfile.ZipFile(zip_path) as zf:
        for name in zf.namelist():
            if name.endswith(".dcm"):
                ds = pydicom.dcmread(io.BytesIO(zf.read(name)))
                if ds.SeriesDescription == ub.FOUR_CHAMBER:
                    out.append((name, ds))
    return sorted(out, key=lambda item: float(item[1].TriggerTime))


def rewrite_zip(src: Path, dst: Path, drop=(), replace: dict | None = None) -> Path:
    """A copy of ``src`` without the members ``drop`` (and their manifest rows), ``replace``d ones swapped."""
    replace = replace or {}
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zout:
        for name in zin.namelist():
            if name in drop:
                continue
            data = replace.get(name, zin.read(name))
            if name.startswith("manifest."):
                data = "".join(line for line in data.decode().splitlines(keepends=True)
                               if line.split(",")[0] not in drop).encode()
            zout.writestr(name, data)
    return dst


def dicom_bytes(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------
# The bulk route gives what the NIfTI route gives
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def both_routes(phantom, tmp_path_factory):
    bulk = prepare_dataset(cfg_for(tmp_path_factory.mktemp("bulk"), ukb_bulk=str(phantom / pb.BULK_DIR)),
                           progress=False)
    nifti = prepare_dataset(cfg_for(tmp_path_factory.mktemp("nifti"), manifest=str(phantom / "manifest.csv")),
                            progress=False)
    return bulk, nifti


def test_bulk_and_nifti_routes_prepare_the_same_cines_and_ecgs(both_routes):
    bulk, nifti = both_routes
    b_subjects = pd.read_csv(bulk / "subjects.csv", dtype={"subject_id": str})
    n_subjects = pd.read_csv(nifti / "subjects.csv", dtype={"subject_id": str})
    assert len(b_subjects) == len(n_subjects) == 4
    row_of = {sid: i for i, sid in zip(n_subjects["index"], n_subjects["subject_id"])}
    b_cine, n_cine = np.load(bulk / "cine.npy"), np.load(nifti / "cine.npy")
    b_ecg, n_ecg = np.load(bulk / "ecg.npy"), np.load(nifti / "ecg.npy")
    for i, eid in zip(b_subjects["index"], b_subjects["subject_id"]):
        j = row_of[f"PH{int(eid) - pb.EID_START:05d}"]
        diff = np.abs(b_cine[i].astype(int) - n_cine[j].astype(int)).max()
        assert diff <= 1, (eid, diff)          # target: <= 1/255 after uint8 (measured: 0)
        np.testing.assert_array_equal(b_ecg[i], n_ecg[j])
    b_box = pd.read_csv(bulk / "provenance.csv")[["crop_row", "crop_col", "crop_size"]].to_numpy()
    assert (b_box[:, 2] == round(160 / 1.827)).all()          # the crop in mm, from PixelSpacing


def test_variants_are_read_by_their_rule(both_routes):
    bulk, _ = both_routes
    qc = pd.read_csv(bulk / "ukb_qc.csv", dtype=str, keep_default_na=False).set_index("eid")
    assert (qc["status"] == "kept").all()
    plain, mixed, repeat, rotated = (qc.loc[str(pb.EID_START + i)] for i in range(4))
    assert plain["orientation"] == "as-stored" and plain["view_from"] == "named"
    assert mixed["view_from"] == "mixed" and mixed["series_description"] == ub.MIXED_LAX
    assert "mixed LAX series" in mixed["warnings"]
    # repeated acquisitions: the last acquired complete one (series number 13), with the rule recorded
    assert repeat["series_candidates"] == "2" and repeat["series_uid"].endswith(".13")
    assert "complete first, then the last acquired" in repeat["warnings"]
    assert rotated["orientation"] == "rot180"
    assert float(plain["pixel_mm"].split()[0]) == pytest.approx(1.827)
    truth = json.loads((bulk.parent / "run" / "ukb" / "orientation.json").read_text())
    assert truth["transforms"] == {"as-stored": 3, "rot180": 1}
    summary = pd.read_csv(bulk / "ukb_qc_summary.csv")
    assert summary["count"].sum() == 4


# ----------------------------------------------------------------------------------------------
# Bad input: each rejected (or kept) with its reason, nothing else lost
# ----------------------------------------------------------------------------------------------

BAD = {  # eid -> (status, kind, words of the reason)
    2000001: ("rejected", "corrupt_zip", "corrupt"),
    2000002: ("rejected", "no_4ch", "CINE_segmented_LAX_2Ch"),
    2000003: ("rejected", "missing_frames", "1 of 50 frames missing"),
    2000004: ("rejected", "frame_sizes", "different sizes"),
    2000005: ("rejected", "no_decoder", "pip install"),
    2000006: ("rejected", "ecg", "missing leads V3"),
    2000007: ("unpaired", "cine_without_ecg", "no ECG"),
    2000008: ("unpaired", "ecg_without_cine", "no cine"),
    2000009: ("kept", "", ""),                     # has instances 2 and 3: instance 2 kept ...
}
MISSING_SLOT = 17


@pytest.fixture(scope="module")
def bad_folder(phantom, tmp_path_factory) -> Path:
    """The four good participants plus one participant per kind of bad input, made from subject 0."""
    folder = tmp_path_factory.mktemp("bad") / "bulk"
    shutil.copytree(phantom / pb.BULK_DIR, folder)
    good_zip, good_xml = pb.bulk_paths(phantom, 0)
    members = four_chamber_members(good_zip)

    def files(eid, instance=2):
        return folder / f"{eid}_20208_{instance}_0.zip", folder / f"{eid}_20205_{instance}_0.xml"

    for eid in BAD:
        shutil.copyfile(good_zip, files(eid)[0])
        shutil.copyfile(good_xml, files(eid)[1])
    zip_path = files(2000001)[0]
    zip_path.write_bytes(zip_path.read_bytes()[: 100_000])                       # cut short
    rewrite_zip(good_zip, files(2000002)[0], drop={name for name, _ in members})  # no 4Ch series
    rewrite_zip(good_zip, files(2000003)[0], drop={members[MISSING_SLOT][0]})     # one frame fewer
    name, ds = members[5]
    small = ds.pixel_array[:-12]
    ds.Rows = small.shape[0]
    ds.PixelData = small.astype("<u2").tobytes()
    rewrite_zip(good_zip, files(2000004)[0], replace={name: dicom_bytes(ds)})     # one frame smaller
    compressed = {}
    for name, ds in four_chamber_members(good_zip):                             # JPEG Lossless, no decoder
        ds.file_meta.TransferSyntaxUID = pydicom.uid.JPEGLosslessSV1
        ds.PixelData = pydicom.encaps.encapsulate([b"\xff\xd8\xff\xd9"])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
        compressed[name] = dicom_bytes(ds)
    rewrite_zip(good_zip, files(2000005)[0], replace=compressed)
    xml = files(2000006)[1]
    xml.write_text(re.sub(r'<WaveformData lead="V3">[^<]*</WaveformData>', "", xml.read_text()))  # 11 leads
    files(2000007)[1].unlink()                                                   # cine, no ECG
    files(2000008)[0].unlink()                                                   # ECG, no cine
    for path in files(2000009):                                                  # ... and instance 3 too
        shutil.copyfile(path, str(path).replace("_2_0.", "_3_0."))
    return folder


@pytest.fixture(scope="module")
def bad_run(bad_folder, tmp_path_factory):
    if not ub.decoder_missing(str(pydicom.uid.JPEGLosslessSV1)):
        pytest.skip("a JPEG Lossless decoder is installed here: the no-decoder case cannot be built")
    tmp = tmp_path_factory.mktemp("badrun")
    cfg = cfg_for(tmp, ukb_bulk=str(bad_folder))
    root = prepare_dataset(cfg, progress=False)
    qc = pd.read_csv(root / "ukb_qc.csv", dtype=str, keep_default_na=False)
    return cfg, root, qc


@pytest.mark.parametrize("eid", sorted(BAD))
def test_each_bad_input_is_reported_with_its_reason(bad_run, eid):
    _, _, qc = bad_run
    row = qc[(qc["eid"] == str(eid)) & (qc["instance"] == "2")]
    assert len(row) == 1
    status, kind, words = BAD[eid]
    assert row["status"].item() == status and row["kind"].item() == kind, row.to_dict("records")
    assert words in row["reason"].item()


def test_bad_inputs_lose_nothing_else_and_are_counted(bad_run):
    cfg, root, qc = bad_run
    subjects = pd.read_csv(root / "subjects.csv", dtype={"subject_id": str})
    assert sorted(subjects["subject_id"]) == [str(pb.EID_START + i) for i in range(4)] + ["2000009"]
    other = qc[(qc["eid"] == "2000009") & (qc["instance"] == "3")]
    assert other["status"].item() == "skipped" and "data.ukb_instance is 2" in other["reason"].item()
    reason = qc.loc[qc["eid"] == "2000005", "reason"].item()
    assert "JPEG Lossless" in reason and "pylibjpeg" in reason and "gdcm" in reason
    summary = pd.read_csv(root / "ukb_qc_summary.csv", keep_default_na=False)
    counts = {(s, k): c for s, k, c in summary.itertuples(index=False)}
    assert counts[("kept", "")] == 5 and counts[("skipped", "other_instance")] == 1
    for status, kind, _ in BAD.values():
        if kind:
            assert counts[(status, kind)] == 1
    assert summary["count"].sum() == len(qc) == 4 + len(BAD) + 1
    only = pd.read_csv(cfg.run_path / "ukb" / "ecg_only.csv", dtype=str)
    assert list(only["subject_id"]) == ["2000008"]


def test_missing_frame_filled_by_interpolation_when_asked(bad_folder, phantom, tmp_path):
    folder = tmp_path / "bulk"
    folder.mkdir()
    for path in bad_folder.glob("2000003_*"):
        shutil.copyfile(path, folder / path.name)
    cfg = cfg_for(tmp_path, ukb_bulk=str(folder), ukb_missing_frames="fill")
    manifest, _ = ub.build_manifest(cfg, progress=False)
    row = pd.read_csv(manifest, dtype=str).iloc[0]
    assert row["cmr_filled_frames"] == str(MISSING_SLOT)
    frames = ub.load_cine(row["cmr_path"])
    truth = ub.load_cine(_index_of_subject0(phantom, tmp_path))
    np.testing.assert_array_equal(np.delete(frames, MISSING_SLOT, 0), np.delete(truth, MISSING_SLOT, 0))
    expected = 0.5 * (truth[MISSING_SLOT - 1] + truth[MISSING_SLOT + 1])
    np.testing.assert_allclose(frames[MISSING_SLOT], expected, atol=1e-3)
    qc = pd.read_csv(cfg.run_path / "ukb" / "scan_qc.csv", dtype=str, keep_default_na=False)
    assert qc["status"].item() == "kept" and "filled by interpolation" in qc["warnings"].item()


def _index_of_subject0(phantom: Path, tmp: Path) -> str:
    folder = tmp / "one"
    folder.mkdir()
    for path in pb.bulk_paths(phantom, 0):
        shutil.copyfile(path, folder / path.name)
    manifest, _ = ub.build_manifest(cfg_for(tmp / "one_run", ukb_bulk=str(folder)), progress=False)
    return pd.read_csv(manifest, dtype=str)["cmr_path"][0]


# ----------------------------------------------------------------------------------------------
# Pieces
# ----------------------------------------------------------------------------------------------


def test_cine_index_reads_like_the_nifti(phantom, tmp_path):
    index = _index_of_subject0(phantom, tmp_path)
    a, box_a = read_cine(index, return_box=True, crop_mm=160.0)
    b, box_b = read_cine(phantom / "cmr" / "PH00000.nii.gz", return_box=True, crop_mm=160.0)
    assert box_a == box_b
    np.testing.assert_array_equal(a, b)


def test_zip_manifest_quirks_and_fallback_to_headers(phantom, tmp_path):
    zip_cvs, _ = pb.bulk_paths(phantom, 2)                     # subject 2: manifest.cvs, dates with commas
    warnings: list[str] = []
    with zipfile.ZipFile(zip_cvs) as zf:
        series = ub._zip_manifest(zf, zf.namelist(), warnings)
    assert not warnings and len(series) == 200
    assert sorted(set(series.values())) == ["CINE_segmented_LAX_2Ch", "CINE_segmented_LAX_3Ch", ub.FOUR_CHAMBER]
    bare = rewrite_zip(zip_cvs, tmp_path / "bare.zip", drop={"manifest.cvs"})
    scan = ub.scan_zip(bare)
    assert scan["ok"] and "no manifest.csv" in scan["warnings"][0]
    assert sum(g["n_files"] for g in scan["groups"]) == 100   # the repeat's two 4Ch acquisitions


def test_orientation_snap_known_answers():
    r, c = np.array([0.6, -0.7, 0.4]), np.array([0.5, 0.7, 0.5])
    r, c = ub._orthonormal(r, c)
    cases = {"as-stored": (r, c), "rot180": (-r, -c), "flip-rows": (-r, c), "transpose": (c, r)}
    for label, (d0, d1) in cases.items():
        ops, got, a0, a1 = ub._snap(d0, d1, r, c)
        assert got == label
        np.testing.assert_allclose(a0, r)
        np.testing.assert_allclose(a1, c)
    # the consensus of many as-stored cines and one rotated is the as-stored axes
    ref0, ref1 = ub.consensus_axes([(-r, -c)] + [(r + 0.01 * k, c) for k in range(5)])
    assert ref0 @ r > 0.99 and ref1 @ c > 0.99


def test_fast_pixel_path_equals_pydicom(tmp_path):
    from pydicom.dataset import Dataset, FileMetaDataset

    rng = np.random.default_rng(0)
    for signed in (0, 1):
        meta = FileMetaDataset()
        meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
        meta.MediaStorageSOPInstanceUID = "1.2.3.4"
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, "1.2.3.4"
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 6, 5, 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, signed
        raw = rng.integers(0, 2 ** 16, size=(6, 5)).astype("<u2")   # high bits set: an overlay's
        ds.PixelData = raw.tobytes()
        ds = pydicom.dcmread(io.BytesIO(dicom_bytes(ds)))
        np.testing.assert_array_equal(ub._pixels(ds), ds.pixel_array)


def test_pairing_and_instances(tmp_path):
    for name in ("1000001_20208_2_0.zip", "1000001_20205_2_0.xml", "1000001_20205_3_0.xml",
                 "1000002_20208_3_0.zip", "1000002_20205_3_0.xml", "notes.txt", "1000003_20209_2_0.zip"):
        (tmp_path / name).write_bytes(b"")
    pairs, qc, only = ub.pair_files(tmp_path, 3)
    assert [(p["eid"], p["instance"]) for p in pairs] == [("1000002", 3)]
    kinds = {(r["eid"], r["instance"]): r["kind"] for r in qc}
    assert kinds == {("1000001", 2): "other_instance", ("1000001", 3): "ecg_without_cine"}
    assert [eid for eid, _ in only] == ["1000001"]


def test_decoder_message_names_the_packages():
    if not ub.decoder_missing(str(pydicom.uid.JPEGLosslessSV1)):
        pytest.skip("a JPEG Lossless decoder is installed here")
    message = ub.decoder_missing(str(pydicom.uid.JPEGLosslessSV1))
    assert "pip install pylibjpeg pylibjpeg-libjpeg" in message and "python-gdcm" in message
    assert ub.decoder_missing(str(pydicom.uid.ExplicitVRLittleEndian)) is None


def test_config_keys_are_validated(tmp_path):
    with pytest.raises(ConfigError, match="data.ukb_instance"):
        cfg_for(tmp_path, ukb_instance=1)
    with pytest.raises(ConfigError, match="data.ukb_missing_frames"):
        cfg_for(tmp_path, ukb_missing_frames="guess")
    with pytest.raises(ConfigError, match="data.ukb_bulk"):
        cfg_for(tmp_path, ukb_bulk="x", manifest="y.csv")
    with pytest.raises(ub.BulkError, match="not a folder"):
        ub.build_manifest(cfg_for(tmp_path, ukb_bulk=str(tmp_path / "nope")))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ub.BulkError, match="no participant"):
        ub.build_manifest(cfg_for(tmp_path, ukb_bulk=str(empty)))


def test_phantom_cli_writes_bulk_files(tmp_path):
    assert build.main(["--out", str(tmp_path), "--n", "1", "--format", "ukb-bulk", "--quiet"]) == 0
    names = sorted(p.name for p in (tmp_path / pb.BULK_DIR).iterdir())
    assert names == ["1000000_20205_2_0.xml", "1000000_20208_2_0.zip"]
    table = pd.read_csv(tmp_path / pb.EID_TABLE, dtype=str)
    assert table.to_dict("records") == [{"eid": "1000000", "subject_id": "PH00000", "variant": "plain",
                                         "zip_manifest": "manifest.csv"}]
    with zipfile.ZipFile(tmp_path / pb.BULK_DIR / names[1]) as zf:
        dicoms = [n for n in zf.namelist() if n.endswith(".dcm")]
        ds = pydicom.dcmread(io.BytesIO(zf.read(dicoms[0])))
    assert len(dicoms) == 150 and ds.CardiacNumberOfImages == 50
    for tag in ("PixelSpacing", "ImagePositionPatient", "ImageOrientationPatient", "TriggerTime",
                "SeriesDescription", "SeriesInstanceUID"):
        assert tag in ds


def test_box_in_mm_centres_the_outline_not_the_strongest_motion():
    from ecgflowcmr.data.cmr_io import find_heart_box

    # two "chambers" of mean radius 15 px side by side (centroid column 75); the right one beats
    # five times harder, which pulls a motion-weighted centre towards it
    t = np.arange(30)[:, None, None]
    yy, xx = np.mgrid[:160, :150]
    beat = np.cos(2 * np.pi * t / 30)
    frames = (100.0 + 600 * ((yy - 80) ** 2 + (xx - 60) ** 2 <= (15 + 1 * beat) ** 2)
              + 600 * ((yy - 80) ** 2 + (xx - 90) ** 2 <= (15 + 5 * beat) ** 2)).astype(np.float32)
    tight = find_heart_box(frames, side_px=80)
    relative = find_heart_box(frames)
    tight_col, relative_col = (box.col + (box.size - 1) / 2 - 75 for box in (tight, relative))
    assert abs(tight.row + (tight.size - 1) / 2 - 80) <= 1
    # the outline still leans to the harder-beating chamber (its outline reaches further), by less
    assert relative_col >= 7 and 0 <= tight_col <= relative_col / 2, (tight_col, relative_col)
