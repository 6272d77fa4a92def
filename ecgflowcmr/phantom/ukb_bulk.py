"""The phantom's subjects as UK Biobank bulk files: ``{eid}_20208_2_0.zip`` and ``{eid}_20205_2_0.xml``.

``python -m ecgflowcmr.phantom --out DIR --n N --version 2 --format ukb-bulk`` writes the usual
phantom (XML, NIfTI, masks, manifest with ground truth) and, from those very files, the folder
``DIR/ukb_bulk/`` that ``data.ukb_bulk`` reads, with ``DIR/ukb_bulk_eids.csv`` mapping each eid
(1,000,000 + subject index: seven digits, as UK Biobank's) to its phantom subject and variant.

A zip holds what the real field-20208 zips hold: one uncompressed DICOM per frame (MR Image
Storage; ``PixelSpacing``, ``ImagePositionPatient``, ``ImageOrientationPatient``, ``TriggerTime``,
``CardiacNumberOfImages``, ``SeriesDescription``, ``SeriesInstanceUID``, ``SeriesNumber``, ...) for
each long-axis view (``CINE_segmented_LAX_2Ch``, ``_3Ch``, ``_4Ch``), files stored in no particular
order, and a ``manifest.csv`` whose ``series discription`` column names each file's series and
whose dates (``Aug 30, 2015``) carry an unquoted comma. The four-chamber frames are the NIfTI cine's,
stored as UK Biobank stores them: the DICOM pixel array is the transpose of the NIfTI slice, and the
NIfTI affine (RAS) gives the DICOM geometry (LPS), as ukb_cardiac's conversion inverts. The two
other views are stand-ins (the same frames flipped) on planes rotated by +-60 degrees about the
four-chamber plane's steepest in-plane axis (so both are less transverse).

Variants, by subject index (``variant_of``), the cases the reader must get right:

- ``mixed`` (index % 10 == 4): no named views, one ``CINE_segmented_LAX`` series holding the three
  (file names sort into 3Ch, 4Ch, 2Ch blocks, as in older exports);
- ``repeat`` (index % 10 == 7): two complete four-chamber acquisitions; the first (lower
  ``SeriesNumber``, earlier ``SeriesTime``) is shifted by 7 pixels, a failed breath-hold;
- ``rotated`` (index % 10 == 9): the four-chamber series stored turned by 180 degrees (pixels and
  geometry), which the reader must turn back;
- ``manifest.cvs`` instead of ``manifest.csv`` when index % 3 == 2 (any variant).
"""
from __future__ import annotations

import csv
import io
import math
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np

from .v1 import subject_id

EID_START = 1_000_000
BULK_DIR = "ukb_bulk"
EID_TABLE = "ukb_bulk_eids.csv"
INSTANCE = 2
UID_ROOT = "1.2.826.0.1.3680043.8.498."        # pydicom's UID root
LPS = np.array([-1.0, -1.0, 1.0])               # NIfTI RAS <-> DICOM LPS
OTHER_VIEW_DEG = 60.0
MANIFEST_HEADER = ["filename", "patientid", "studyid", "aetitle", "date", "seriesid", "series discription"]


def eid_of(index: int) -> int:
    return EID_START + int(index)


def variant_of(index: int) -> str:
    return {4: "mixed", 7: "repeat", 9: "rotated"}.get(int(index) % 10, "plain")


def manifest_name_of(index: int) -> str:
    return "manifest.cvs" if int(index) % 3 == 2 else "manifest.csv"


def bulk_paths(out: Path, index: int, folder: str = BULK_DIR) -> tuple[Path, Path]:
    """(zip, xml) of subject ``index`` in ``out/<folder>``."""
    eid = eid_of(index)
    folder = Path(out) / folder
    return folder / f"{eid}_20208_{INSTANCE}_0.zip", folder / f"{eid}_20205_{INSTANCE}_0.xml"


# ----------------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------------


def dicom_geometry(affine: np.ndarray) -> dict:
    """A NIfTI (H, W) slice's affine -> the DICOM geometry of its transposed pixel array
    (``Rows`` = W, ``Columns`` = H): row / column cosines (LPS), position of the first pixel,
    ``PixelSpacing`` [between rows, between columns]."""
    a0, a1 = affine[:3, 0], affine[:3, 1]
    s0, s1 = float(np.linalg.norm(a0)), float(np.linalg.norm(a1))
    return {"row": LPS * a0 / s0, "col": LPS * a1 / s1, "position": LPS * affine[:3, 3],
            "spacing": [s1, s0]}


def _rotation(axis: np.ndarray, deg: float) -> np.ndarray:
    axis = axis / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    a = math.radians(deg)
    return np.eye(3) + math.sin(a) * k + (1 - math.cos(a)) * (k @ k)


def other_view(geo: dict, deg: float) -> dict:
    """The plane turned by ``deg`` about its steepest in-plane axis: its normal's superior (z)
    component shrinks by cos(deg), so the four-chamber plane stays the most transverse."""
    n = np.cross(geo["row"], geo["col"])
    horizontal = np.cross(n, [0.0, 0.0, 1.0])
    steepest = np.cross(horizontal, n)
    rot = _rotation(steepest, deg)
    return dict(geo, row=rot @ geo["row"], col=rot @ geo["col"])


def rotated_180(geo: dict, rows: int, cols: int) -> dict:
    """The geometry of the pixel array turned by 180 degrees: both cosines reversed, the first
    pixel where the last one was."""
    last = (geo["position"] + geo["row"] * geo["spacing"][1] * (cols - 1)
            + geo["col"] * geo["spacing"][0] * (rows - 1))
    return dict(geo, row=-geo["row"], col=-geo["col"], position=last)


# ----------------------------------------------------------------------------------------------
# DICOM
# ----------------------------------------------------------------------------------------------


def _ds(x: float) -> str:
    """A decimal string (DS, at most 16 characters)."""
    text = f"{x:.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


class _SeriesWriter:
    """Writes the frames of one series into a zip, one DICOM each, the header built once."""

    def __init__(self, eid: int, study_uid: str, series_uid: str, number: int, description: str, geo: dict,
                 rr_ms: float, time_hms: str):
        from pydicom.dataset import Dataset, FileMetaDataset
        from pydicom.uid import ExplicitVRLittleEndian

        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"     # MR Image Storage
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = meta.MediaStorageSOPClassUID
        ds.PatientID = str(eid)
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.Modality = "MR"
        ds.Manufacturer = "SIEMENS"
        ds.SeriesDescription = description
        ds.SeriesNumber = number
        ds.SeriesTime = time_hms
        ds.SliceThickness = "8"
        ds.NominalInterval = str(int(round(rr_ms)))
        ds.ImagePositionPatient = [_ds(v) for v in geo["position"]]
        ds.ImageOrientationPatient = [_ds(v) for v in (*geo["row"], *geo["col"])]
        ds.PixelSpacing = [_ds(v) for v in geo["spacing"]]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        self.ds = ds
        self.series_uid = series_uid

    def write(self, zf: zipfile.ZipFile, name: str, instance: int, trigger_ms: float, frames_in_cycle: int,
              pixels: np.ndarray) -> None:
        ds = self.ds
        ds.SOPInstanceUID = f"{self.series_uid}.{instance}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = instance
        ds.TriggerTime = _ds(trigger_ms)
        ds.CardiacNumberOfImages = frames_in_cycle
        ds.Rows, ds.Columns = pixels.shape
        ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
        buffer = io.BytesIO()
        try:
            ds.save_as(buffer, enforce_file_format=True)       # pydicom >= 3
        except TypeError:
            ds.save_as(buffer, write_like_original=False)     # pydicom 2.4
        zf.writestr(name, buffer.getvalue())


def write_subject_zip(out_dir: str | Path, index: int, seed: int = 0, variant: str | None = None,
                      manifest_name: str | None = None, folder: str = BULK_DIR, other_views: bool = True) -> Path:
    """Write subject ``index``'s bulk zip and XML from its phantom files (module doc) into
    ``out_dir/<folder>``; atomic. ``other_views=False``: the four-chamber series only (a third of
    the writing, for measurements that read nothing else)."""
    import json

    import nibabel as nib

    out = Path(out_dir)
    sid = subject_id(index)
    variant = variant or variant_of(index)
    manifest_name = manifest_name or manifest_name_of(index)
    eid = eid_of(index)
    zip_path, xml_path = bulk_paths(out, index, folder)
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.load(str(out / "cmr" / f"{sid}.nii.gz"))
    cine = np.asarray(image.dataobj)[:, :, 0, :]                         # (H, W, T)
    frames = np.ascontiguousarray(np.transpose(cine, (2, 1, 0)))         # (T, W, H): DICOM pixel arrays
    truth = json.loads((out / "truth" / f"{sid}.json").read_text())["manifest"]
    frame_ms, rr_ms = float(truth["frame_ms"]), float(truth["cine_rr_ms"])
    t_frames, rows, cols = frames.shape
    geo = dicom_geometry(image.affine)
    root = f"{UID_ROOT}{seed}.{index}"
    study_uid = f"{root}.1"
    rng = np.random.default_rng([seed, index, 20208])

    series: list[tuple[str, int, str, dict, np.ndarray]] = []     # description, number, time, geometry, frames
    four = frames
    four_geo = geo
    if variant == "rotated":
        four = frames[:, ::-1, ::-1]
        four_geo = rotated_180(geo, rows, cols)
    views = {"4Ch": (four, four_geo), "2Ch": (frames[:, ::-1, :], other_view(geo, OTHER_VIEW_DEG)),
             "3Ch": (frames[:, :, ::-1], other_view(geo, -OTHER_VIEW_DEG))}
    if variant == "mixed":
        stacked = [views[v] for v in ("3Ch", "4Ch", "2Ch")]
        series.append(("CINE_segmented_LAX", 12, "104512.000000", None, stacked))
    else:
        if other_views:
            series.append(("CINE_segmented_LAX_2Ch", 10, "104310.000000", views["2Ch"][1], views["2Ch"][0]))
            series.append(("CINE_segmented_LAX_3Ch", 11, "104402.000000", views["3Ch"][1], views["3Ch"][0]))
        if variant == "repeat":
            failed = np.roll(four, 7, axis=2)
            series.append(("CINE_segmented_LAX_4Ch", 12, "104455.000000", four_geo, failed))
            series.append(("CINE_segmented_LAX_4Ch", 13, "104601.000000", four_geo, four))
        else:
            series.append(("CINE_segmented_LAX_4Ch", 12, "104455.000000", four_geo, four))

    tmp = zip_path.with_name(zip_path.name + ".tmp")
    entries = []            # (file name, description, series uid) for the zip manifest
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for k, (description, number, time_hms, view_geo, view_frames) in enumerate(series):
            series_uid = f"{root}.{10 + k}"
            blocks = view_frames if description == "CINE_segmented_LAX" else [(view_frames, view_geo)]
            instance = 1000
            jobs = []
            for block_frames, block_geo in blocks:
                writer = _SeriesWriter(eid, study_uid, series_uid, number, description, block_geo, rr_ms, time_hms)
                for t in range(len(block_frames)):
                    instance += 1
                    jobs.append((writer, instance, t, block_frames[t]))
            # files stored in no particular order: the reader must order them by TriggerTime
            for j in rng.permutation(len(jobs)):
                writer, instance, t, pixels = jobs[j]
                name = f"{series_uid}.{instance}.dcm"
                writer.write(zf, name, instance, t * frame_ms, t_frames, pixels)
                entries.append((name, description, series_uid))
        zf.writestr(manifest_name, _zip_manifest(entries, eid))
    os.replace(tmp, zip_path)
    shutil.copyfile(out / "ecg" / f"{sid}.xml", xml_path.with_name(xml_path.name + ".tmp"))
    os.replace(xml_path.with_name(xml_path.name + ".tmp"), xml_path)
    return zip_path


def _zip_manifest(entries: list[tuple[str, str, str]], eid: int) -> str:
    """The zip's manifest: a dated row per file, the date with its unquoted comma (as in the real ones)."""
    lines = [",".join(MANIFEST_HEADER)]
    for name, description, series_uid in sorted(entries):
        lines.append(",".join([name, str(eid), "1", "UKBB-CMR", "Aug 30, 2015 10:44:15", series_uid, description]))
    return "\n".join(lines) + "\n"


def _work(args) -> int:
    out, index, seed, folder, other_views = args
    write_subject_zip(out, index, seed, folder=folder, other_views=other_views)
    return index


def write_bulk(out_dir: str | Path, n: int, seed: int = 0, workers: int = 1, progress: bool = True,
               folder: str = BULK_DIR, other_views: bool = True) -> Path:
    """Bulk files of phantom subjects 0..n-1 (generated first with ``build.generate``) into
    ``out_dir/<folder>`` (default ``ukb_bulk``) and the eid table ``out_dir/ukb_bulk_eids.csv``;
    returns the folder. A zip newer than its subject's NIfTI is kept (resumable)."""
    from tqdm import tqdm

    out = Path(out_dir)
    todo = []
    for index in range(n):
        zip_path, xml_path = bulk_paths(out, index, folder)
        nifti = out / "cmr" / f"{subject_id(index)}.nii.gz"
        if not (zip_path.is_file() and xml_path.is_file()
                and zip_path.stat().st_mtime_ns >= nifti.stat().st_mtime_ns):
            todo.append((str(out), index, seed, folder, other_views))
    bar = tqdm(total=len(todo), desc=f"ukb bulk -> {out / folder}", unit="zip", disable=not progress or not todo)
    if workers <= 1 or len(todo) <= 1:
        for job in todo:
            _work(job)
            bar.update(1)
    else:
        import multiprocessing as mp

        with mp.get_context().Pool(min(workers, len(todo))) as pool:
            for _ in pool.imap_unordered(_work, todo, chunksize=2):
                bar.update(1)
    bar.close()
    with open(out / EID_TABLE, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["eid", "subject_id", "variant", "zip_manifest"])
        for index in range(n):
            writer.writerow([eid_of(index), subject_id(index), variant_of(index), manifest_name_of(index)])
    return out / folder
