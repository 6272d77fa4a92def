"""UK Biobank bulk files -> the manifest ``prepare()`` reads: field 20208 DICOM zips, field 20205 XML ECGs.

``build_manifest(cfg)`` (``prepare_data.py`` with ``data.ukb_bulk: DIR``) turns a folder of bulk files,
as ``ukbfetch`` writes them, into ``<run>/ukb/manifest.csv`` (``subject_id`` = the eid,
``ecg_path`` = the XML, ``cmr_path`` = a cine index ``<run>/ukb/cines/<eid>_<instance>.cine.json``) and
a QC table; ``prepare()`` then runs unchanged (``cmr_io.read_cine`` reads a cine index through
``load_cine``). After preparation ``write_qc_report`` merges both QC tables into
``<data root>/ukb_qc.csv`` and counts them in ``ukb_qc_summary.csv``.

Files: ``{eid}_20208_{instance}_0.zip`` and ``{eid}_20205_{instance}_0.xml``, anywhere under the folder,
paired by participant and instance (2: first imaging visit, 3: repeat; ``data.ukb_instance``). A zip
without its XML or the reverse is reported and not prepared (the XMLs without a cine are listed in
``ukb/ecg_only.csv``, ready for ``data.unpaired_ecg``); other instances are reported as skipped.

Inside a zip (what the real ones hold):

1. ``manifest.csv`` (or ``manifest.cvs``; dates like ``Aug 30, 2015`` break its commas, so they are
   rewritten before parsing) names each file's series in its column ``series discription``. The
   four-chamber cine is ``CINE_segmented_LAX_4Ch``; where only a mixed ``CINE_segmented_LAX`` series
   exists, its three views are told apart by ``ImageOrientationPatient`` (see step 4). Without a
   usable manifest every file's DICOM header is read instead (``SeriesDescription``).
2. The candidate files' headers (pydicom, no pixels) are grouped into acquisitions by
   ``SeriesInstanceUID`` and orientation. Frames are ordered by ``TriggerTime``; there should be
   ``CardiacNumberOfImages`` of them, all of one size and pixel spacing, with a transfer syntax
   that an installed decoder reads.
3. **Repeated acquisitions** (more than one ``SeriesInstanceUID`` for the view): the complete ones
   (every announced frame present, one size) win; among those the last acquired (highest
   ``SeriesNumber``, then latest ``SeriesTime``, then UID), since a repeat is made when the first
   attempt failed. The choice and the number of candidates are recorded.
4. **Mixed LAX series**: the view whose plane normal lies closest to the four-chamber plane of the
   folder's named ``CINE_segmented_LAX_4Ch`` series (their consensus, below); without any named
   series, the most transverse plane (largest superior component of the normal: the four-chamber
   view is the horizontal long axis). The file-order rule of older scripts (3Ch, 4Ch, 2Ch) is
   checked against it and a disagreement is a warning.
5. **Missing frames** (fewer than announced): ``data.ukb_missing_frames: reject`` (default) refuses
   the participant; ``fill`` fills up to ``MAX_FILLED_FRACTION`` of the frames by linear
   interpolation in time between the neighbouring frames (periodic) and flags them in the QC
   table. The gaps are located from the trigger times. More frames than announced, two frames at
   one trigger time, frames of different sizes or spacings: always refused.
6. **Orientation**: a frame's pixel array is transposed, as the UK Biobank NIfTI exports
   (ukb_cardiac) store it: array axis 0 runs along the DICOM row direction (``ImageOrientationPatient``
   [:3]), axis 1 along the column direction; that is the layout ``docs/phantom_realism.md`` measured
   (LV long axis near 80 degrees, RV clockwise of the LV). Then every participant is turned into
   one orientation: the folder's reference axes are the consensus of the chosen series' in-plane
   axes in patient coordinates (an iterated mean, seeded by the first participant), and each cine
   takes the one of the eight flips / quarter turns of its array whose axes lie closest to them.
   A participant stored like most others is left as stored; one stored rotated or mirrored is
   turned back. The transform and the plane's angle to the reference are recorded.
7. Pixel size from ``PixelSpacing``, frame interval from the median step of ``TriggerTime``; both go
   into the cine index, so that ``data.crop_mm`` crops DICOM cines in millimetres as NIfTI ones.

Why a cine index and not NIfTI files: the index (a few hundred bytes: zip, ordered member names,
transform, spacing) is written once by the header scan; ``prepare()``'s workers then read each
selected DICOM exactly once, in memory. Converting to NIfTI first would write and read again
about 3.7 MB per participant (150 GB for 40,000 uncompressed, ~60 GB and ~0.1 s of CPU each
gzipped) for nothing the model needs.

The header scan is cached per zip (``ukb/scan/``, keyed by the zip's size and modification time),
so a re-run (or a run resumed by ``prepare()``) does not read the zips' headers again.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import zipfile
from pathlib import Path

import numpy as np

from .errors import CMRReadError

log = logging.getLogger("ecgflowcmr.prepare")

CINE_FIELD, ECG_FIELD = 20208, 20205
INSTANCES = (2, 3)                  # 2: first imaging visit, 3: repeat imaging visit
FOUR_CHAMBER = "CINE_segmented_LAX_4Ch"
MIXED_LAX = "CINE_segmented_LAX"
INDEX_SUFFIX = ".cine.json"
INDEX_FORMAT = "ecgflowcmr-ukb-cine-1"
SCAN_VERSION = 2                    # bump when what the header scan records changes
MISSING_FRAME_POLICIES = ("reject", "fill")
MAX_FILLED_FRACTION = 0.1           # "fill" refuses a cine with more missing frames than this share
MIXED_VIEW_MAX_DEG = 25.0           # a mixed-series view within this of the reference 4Ch plane is 4Ch
ORIENTATION_DECIMALS = 3            # frames whose orientation agrees to this many decimals are one plane
_FILE_RE = re.compile(r"^(\d+)_(20208|20205)_(\d+)_(\d+)\.(zip|xml)$", re.IGNORECASE)
_MANIFEST_NAMES = ("manifest.csv", "manifest.cvs")
_DATE_WITH_COMMA = re.compile(r"\b([A-Z][a-z]{2}) (\d{1,2}), (\d{4})")
_DESCRIPTION_COLUMNS = ("series discription", "series description", "seriesdescription")
_NATIVE_SYNTAXES = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99"}
_RAW_SYNTAXES = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}   # pixel bytes stored as they are (not deflated)
_PIP_NAMES = {"gdcm": "python-gdcm", "pylibjpeg": "pylibjpeg", "pylibjpeg-libjpeg": "pylibjpeg-libjpeg",
              "pylibjpeg-openjpeg": "pylibjpeg-openjpeg", "pylibjpeg-rle": "pylibjpeg-rle",
              "pyjpegls": "pyjpegls", "pillow": "pillow", "numpy": "numpy"}
QC_COLUMNS = ("eid", "instance", "status", "kind", "reason", "zip", "xml", "series_uid", "series_description",
              "series_candidates", "view_from", "frames", "frames_expected", "filled_frames", "pixel_mm",
              "frame_ms", "orientation", "plane_deviation_deg", "warnings")


class BulkError(RuntimeError):
    """The bulk folder cannot be turned into a manifest (no such folder, no pair of files)."""


class _Refusal(Exception):
    """One zip is refused: ``kind`` (a short code the QC summary counts) and the reason."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


# ----------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------


def bulk_dir(cfg) -> Path:
    """Where the bulk route keeps its manifest, cine indexes, scan cache and QC: ``<run>/ukb``."""
    return cfg.run_path / "ukb"


def build_manifest(cfg, progress: bool = True) -> tuple[Path, dict]:
    """``data.ukb_bulk`` -> ``(manifest path, source facts for meta.json)``; writes ``<run>/ukb/``:
    ``manifest.csv``, ``cines/*.cine.json``, ``scan_qc.csv`` (every file found, with its status),
    ``ecg_only.csv`` and ``orientation.json``. Raises ``BulkError`` when nothing pairs or passes."""
    import pandas as pd

    folder = Path(cfg.data.ukb_bulk).expanduser()
    if not folder.is_dir():
        raise BulkError(f"data.ukb_bulk: '{folder}' is not a folder (point it at the folder of "
                        f"{{eid}}_20208_*_0.zip and {{eid}}_20205_*_0.xml files)")
    out = bulk_dir(cfg)
    for sub in ("cines", "scan"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    instance = int(cfg.data.ukb_instance)
    pairs, qc_rows, ecg_only = pair_files(folder, instance)
    pd.DataFrame(ecg_only, columns=["subject_id", "ecg_path"]).to_csv(out / "ecg_only.csv", index=False)
    if not pairs:
        _write_qc(out / "scan_qc.csv", qc_rows)
        raise BulkError(f"data.ukb_bulk: no participant under '{folder}' has both a 20208 zip and a 20205 XML "
                        f"of instance {instance}; see '{out / 'scan_qc.csv'}'")
    records = _scan_all(pairs, out / "scan", int(cfg.data.workers), progress)
    kept, reference = select_and_orient(records, cfg.data.ukb_missing_frames)
    rows = []
    for rec in records:
        qc = _qc_row(rec)
        if rec["ok"]:
            index_path = out / "cines" / f"{rec['eid']}_{rec['instance']}{INDEX_SUFFIX}"
            _write_json(index_path, rec["index"])
            rows.append({"subject_id": rec["eid"], "ecg_path": rec["xml"], "cmr_path": str(index_path.resolve()),
                         "instance": rec["instance"], "cmr_series_uid": qc["series_uid"],
                         "cmr_filled_frames": qc["filled_frames"], "cmr_orientation": qc["orientation"],
                         "cmr_pixel_mm": qc["pixel_mm"], "cmr_frame_ms": qc["frame_ms"]})
        qc_rows.append(qc)
    _write_qc(out / "scan_qc.csv", qc_rows)
    _write_json(out / "orientation.json", reference)
    if not rows:
        raise BulkError(f"data.ukb_bulk: no participant's cine passed the checks; see '{out / 'scan_qc.csv'}'")
    manifest = out / "manifest.csv"
    tmp = manifest.with_suffix(".tmp")
    pd.DataFrame(rows).to_csv(tmp, index=False)
    os.replace(tmp, manifest)
    counts = pd.DataFrame(qc_rows)["status"].value_counts().to_dict()
    log.info("UK Biobank bulk folder '%s': %s; manifest '%s'", folder,
             ", ".join(f"{v} {k}" for k, v in sorted(counts.items())), manifest)
    return manifest, {"ukb_bulk": str(folder.resolve()), "ukb_instance": instance,
                      "ukb_missing_frames": cfg.data.ukb_missing_frames}


def write_qc_report(cfg, root: str | Path) -> Path:
    """``<root>/ukb_qc.csv``: the scan's QC rows with the records ``prepare()`` rejected marked
    (status ``rejected``, kind ``ecg`` or ``cine``, its reason), and ``ukb_qc_summary.csv``: counts
    per status and kind. Returns the report's path."""
    import pandas as pd

    root = Path(root)
    scan = pd.read_csv(bulk_dir(cfg) / "scan_qc.csv", dtype=str, keep_default_na=False)
    report = root / "qc_report.csv"
    if report.is_file():
        rejected = pd.read_csv(report, dtype=str, keep_default_na=False)
        by_eid = {sid: (f, r) for sid, f, r in zip(rejected["subject_id"], rejected["file"], rejected["reason"])}
        for i in np.flatnonzero((scan["status"] == "kept").to_numpy()):
            hit = by_eid.get(scan.at[i, "eid"])
            if hit is not None:
                file, reason = hit
                scan.at[i, "status"] = "rejected"
                scan.at[i, "kind"] = "ecg" if file.lower().endswith(".xml") else "cine"
                scan.at[i, "reason"] = f"{Path(file).name}: {reason}"
    scan.to_csv(root / "ukb_qc.csv", index=False)
    summary = scan.groupby(["status", "kind"], dropna=False).size().reset_index(name="count")
    summary.to_csv(root / "ukb_qc_summary.csv", index=False)
    log.info("UK Biobank QC: %s (%s)", ", ".join(f"{r.status}/{r.kind or '-'}: {r.count}"
                                                  for r in summary.itertuples()), root / "ukb_qc.csv")
    return root / "ukb_qc.csv"


# ----------------------------------------------------------------------------------------------
# Pairing the folder's files
# ----------------------------------------------------------------------------------------------


def pair_files(folder: Path, instance: int) -> tuple[list[dict], list[dict], list[list[str]]]:
    """Bulk files under ``folder`` -> (pairs of ``instance`` to scan, QC rows of every other file,
    ECG-only rows ``[eid, xml]``). Pairs: ``{"eid", "instance", "zip", "xml"}`` sorted by eid."""
    found: dict[tuple[str, int, str], list[str]] = {}
    for path in _walk(folder):
        m = _FILE_RE.match(os.path.basename(path))
        if m:
            eid, field, inst, _array, _ext = m.groups()
            kind = "zip" if field == str(CINE_FIELD) else "xml"
            found.setdefault((eid, int(inst), kind), []).append(path)
    qc, pairs, ecg_only = [], [], []
    keys = sorted({(eid, inst) for eid, inst, _ in found}, key=lambda k: (int(k[0]), k[1]))
    for eid, inst in keys:
        zips = sorted(found.get((eid, inst, "zip"), []))
        xmls = sorted(found.get((eid, inst, "xml"), []))
        row = {"eid": eid, "instance": inst, "zip": zips[0] if zips else "", "xml": xmls[0] if xmls else ""}
        extra = [f"{len(files) - 1} more {kind} file(s) of this participant and instance ignored (first by name "
                 f"kept): {', '.join(files[1:])}" for kind, files in (("zip", zips), ("XML", xmls)) if len(files) > 1]
        if inst != instance:
            qc.append(dict(row, status="skipped", kind="other_instance",
                           reason=f"instance {inst} ({_instance_name(inst)}) not selected: data.ukb_instance is "
                                  f"{instance}", warnings="; ".join(extra)))
        elif not xmls:
            qc.append(dict(row, status="unpaired", kind="cine_without_ecg",
                           reason=f"no ECG: {eid}_{ECG_FIELD}_{inst}_0.xml not in the folder",
                           warnings="; ".join(extra)))
        elif not zips:
            qc.append(dict(row, status="unpaired", kind="ecg_without_cine",
                           reason=f"no cine: {eid}_{CINE_FIELD}_{inst}_0.zip not in the folder (listed in "
                                  f"ukb/ecg_only.csv for data.unpaired_ecg)", warnings="; ".join(extra)))
            ecg_only.append([eid, str(Path(xmls[0]).resolve())])
        else:
            pairs.append(dict(row, zip=str(Path(zips[0]).resolve()), xml=str(Path(xmls[0]).resolve()),
                              extra=extra))
    return pairs, qc, ecg_only


def _walk(folder: Path):
    stack = [str(folder)]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=True):
                    stack.append(entry.path)
                elif entry.is_file(follow_symlinks=True):
                    yield entry.path


def _instance_name(inst: int) -> str:
    return {0: "initial assessment", 1: "repeat assessment", 2: "first imaging visit",
            3: "repeat imaging visit"}.get(inst, "unknown visit")


# ----------------------------------------------------------------------------------------------
# Scanning one zip (headers only)
# ----------------------------------------------------------------------------------------------


def _scan_all(pairs: list[dict], cache: Path, workers: int, progress: bool) -> list[dict]:
    """``scan_zip`` over the pairs (worker processes when ``workers`` > 1), cached per zip."""
    from tqdm import tqdm

    tasks = [(p, str(cache)) for p in pairs]
    bar = tqdm(total=len(tasks), desc="ukb scan", unit="zip", disable=not progress, dynamic_ncols=True)
    out = []
    try:
        if workers <= 1 or len(tasks) <= 1:
            for task in tasks:
                out.append(_scan_cached(task))
                bar.update(1)
        else:
            import multiprocessing as mp

            with mp.get_context().Pool(min(workers, len(tasks))) as pool:
                for rec in pool.imap(_scan_cached, tasks, chunksize=4):
                    out.append(rec)
                    bar.update(1)
    finally:
        bar.close()
    return out


def _scan_cached(task) -> dict:
    pair, cache = task
    path = Path(cache) / f"{pair['eid']}_{pair['instance']}.json"
    try:
        st = os.stat(pair["zip"])
        stamp = [st.st_size, st.st_mtime_ns, SCAN_VERSION]
    except OSError:
        stamp = None
    if stamp is not None and path.is_file():
        try:
            rec = json.loads(path.read_text())
            if rec.get("stamp") == stamp and rec.get("xml") == pair["xml"]:
                return rec
        except (OSError, ValueError):
            pass
    rec = dict(scan_zip(pair["zip"]), eid=pair["eid"], instance=pair["instance"], zip=pair["zip"],
               xml=pair["xml"], stamp=stamp)
    rec["warnings"] = pair.get("extra", []) + rec["warnings"]
    _write_json(path, rec)
    return rec


def scan_zip(zip_path: str | Path) -> dict:
    """The header scan of one 20208 zip: ``{"ok": True, "groups": [...], "view_from", "warnings"}``
    with one group per acquisition of the four-chamber view (or of each view of a mixed series),
    or ``{"ok": False, "kind", "reason", "warnings"}``. Never raises."""
    warnings: list[str] = []
    try:
        try:
            zf = zipfile.ZipFile(zip_path)
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            raise _Refusal("corrupt_zip", f"corrupt or unreadable zip ({type(err).__name__}: {err})") from None
        with zf:
            names = [n for n in zf.namelist() if not n.endswith("/")]
            series = _zip_manifest(zf, names, warnings)
            view_from, files = _view_files(zf, names, series, warnings)
            headers = [_read_header(zf, name) for name in files]
        groups = _group(headers, view_from)
        return {"ok": True, "view_from": view_from, "groups": groups, "warnings": warnings}
    except _Refusal as refusal:
        return {"ok": False, "kind": refusal.kind, "reason": refusal.reason, "warnings": warnings}
    except Exception as err:  # an unexpected failure still only refuses this zip
        return {"ok": False, "kind": "unexpected", "reason": f"unexpected {type(err).__name__}: {err}",
                "warnings": warnings}


def _zip_manifest(zf: zipfile.ZipFile, names: list[str], warnings: list[str]) -> dict[str, str] | None:
    """member name -> series description from the zip's manifest.csv / .cvs (None: none usable)."""
    candidates = [n for n in names if os.path.basename(n).lower() in _MANIFEST_NAMES]
    if not candidates:
        warnings.append("no manifest.csv in the zip: series taken from the DICOM headers")
        return None
    member = candidates[0]
    try:
        text = zf.read(member).decode("utf-8", errors="replace")
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        raise _Refusal("corrupt_zip", f"corrupt zip: {member} unreadable ({type(err).__name__}: {err})") from None
    # "Aug 30, 2015": the comma inside an unquoted date splits the field; "30-Aug-2015" keeps it whole
    text = _DATE_WITH_COMMA.sub(r"\2-\1-\3", text)
    rows = list(csv.reader(io.StringIO(text)))
    rows = [r for r in rows if any(cell.strip() for cell in r)]
    if not rows:
        warnings.append(f"{member} is empty: series taken from the DICOM headers")
        return None
    header = [c.strip().lower() for c in rows[0]]
    desc_col = next((header.index(c) for c in _DESCRIPTION_COLUMNS if c in header), None)
    if "filename" not in header or desc_col is None:
        warnings.append(f"{member} has no 'filename' / 'series discription' columns: series taken from the "
                        f"DICOM headers")
        return None
    file_col = header.index("filename")
    bad = [i + 2 for i, r in enumerate(rows[1:]) if len(r) != len(header)]
    if bad:
        warnings.append(f"{member}: {len(bad)} row(s) (e.g. line {bad[0]}) do not have {len(header)} fields: "
                        f"series taken from the DICOM headers")
        return None
    by_base = {os.path.basename(n): n for n in names}
    series = {}
    for r in rows[1:]:
        member_name = by_base.get(os.path.basename(r[file_col].strip()))
        if member_name is not None:
            series[member_name] = r[desc_col].strip()
    return series


def _view_files(zf, names: list[str], series: dict | None, warnings: list[str]) -> tuple[str, list[str]]:
    """("named" | "mixed", the members to read): the 4Ch series, else the mixed LAX series."""
    if series is None:
        dicoms = [n for n in names if os.path.basename(n).lower() not in _MANIFEST_NAMES]
        series = {}
        for name in dicoms:
            try:
                series[name] = str(_read_header(zf, name, full=False).get("description", ""))
            except _Refusal:
                continue
    found = sorted(set(series.values()))
    for view_from, wanted in (("named", FOUR_CHAMBER), ("mixed", MIXED_LAX)):
        files = sorted(n for n, d in series.items() if d == wanted)
        if files:
            if view_from == "mixed":
                warnings.append(f"no {FOUR_CHAMBER} series: the four-chamber view is taken from the mixed "
                                f"{MIXED_LAX} series by orientation")
            return view_from, files
    raise _Refusal("no_4ch", f"no four-chamber series ({FOUR_CHAMBER}, or a mixed {MIXED_LAX}); the zip holds: "
                             f"{', '.join(found) or 'no series'}")


_HEADER_TAGS = ("SeriesInstanceUID", "SeriesDescription", "SeriesNumber", "SeriesTime", "InstanceNumber",
                "TriggerTime", "CardiacNumberOfImages", "Rows", "Columns", "PixelSpacing", "ImageOrientationPatient",
                "ImagePositionPatient", "SamplesPerPixel", "BitsAllocated", "BitsStored", "PixelRepresentation",
                "PhotometricInterpretation", "NumberOfFrames")
_INT_TAGS = {"SeriesNumber", "InstanceNumber", "CardiacNumberOfImages", "Rows", "Columns", "SamplesPerPixel",
             "BitsAllocated", "BitsStored", "PixelRepresentation", "NumberOfFrames"}
_VECTOR_TAGS = {"PixelSpacing", "ImageOrientationPatient", "ImagePositionPatient"}
HEADER_BYTES = 1 << 14      # a DICOM header is read from the first 16 KiB of its file, the whole file when longer
PIXEL_DATA = 0x7FE00010


def _read_header(zf: zipfile.ZipFile, name: str, full: bool = True) -> dict:
    """The header fields the selection needs, from one member, parsed by pydicom without its
    pixels; ``pixel_offset``: where pydicom found the pixel values in the member (so that
    ``load_cine`` views them without parsing the file again), ``crc``: the member's CRC-32."""
    from pydicom import config

    try:
        info = zf.getinfo(name)
        with zf.open(info) as fh:
            head = fh.read(HEADER_BYTES)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, KeyError) as err:
        raise _Refusal("corrupt_zip", f"corrupt zip: {name} unreadable ({type(err).__name__}: {err})") from None
    mode = config.settings.reading_validation_mode
    config.settings.reading_validation_mode = config.IGNORE   # values are converted below; no regex checks
    try:
        ds = _parse(head, name)
        if PIXEL_DATA not in ds and info.file_size > len(head):   # a header longer than HEADER_BYTES
            ds = _parse(zf.read(name), name)
        if not full:
            return {"description": str(ds.get("SeriesDescription", ""))}
        meta = getattr(ds, "file_meta", None)
        syntax = str(getattr(meta, "TransferSyntaxUID", "") or "1.2.840.10008.1.2")
        h = {"name": name, "syntax": syntax, "crc": info.CRC, "size": info.file_size, "pixel_offset": None}
        for tag in _HEADER_TAGS:
            value = ds.get(tag)
            if value is None or value == "":
                h[tag] = None
            elif tag in _VECTOR_TAGS:
                h[tag] = [float(v) for v in value]
            elif tag == "TriggerTime":
                h[tag] = float(value)
            elif tag in _INT_TAGS:
                h[tag] = int(value)
            else:
                h[tag] = str(value)
        if PIXEL_DATA in ds:
            try:
                raw = ds.get_item(PIXEL_DATA, keep_deferred=True)   # pydicom >= 3: not read, only located
            except TypeError:
                raw = None
            offset = getattr(raw, "value_tell", None)
            if offset is not None and getattr(raw, "value", None) is None:
                h["pixel_offset"] = int(offset)
        return h
    except (ValueError, TypeError) as err:
        raise _Refusal("bad_dicom", f"{name}: unusable DICOM header ({type(err).__name__}: {err})") from None
    finally:
        config.settings.reading_validation_mode = mode


def _parse(data: bytes, name: str):
    """pydicom's dataset of (the start of) a member; elements over 1 KiB (the pixels, vendor blobs)
    are located, not read."""
    import pydicom

    try:
        return pydicom.dcmread(io.BytesIO(data), defer_size=1024)
    except Exception as err:
        raise _Refusal("bad_dicom", f"{name}: not a readable DICOM file ({type(err).__name__}: {err})") from None


def _group(headers: list[dict], view_from: str) -> list[dict]:
    """Headers -> acquisitions (one ``SeriesInstanceUID`` and orientation each), checked."""
    buckets: dict[tuple, list[dict]] = {}
    for h in headers:
        iop = h["ImageOrientationPatient"]
        if iop is None or len(iop) != 6:
            raise _Refusal("bad_dicom", f"{h['name']}: no ImageOrientationPatient")
        key = (h["SeriesInstanceUID"] or "", tuple(np.round(iop, ORIENTATION_DECIMALS)))
        buckets.setdefault(key, []).append(h)
    first_position = {h["name"]: i for i, h in enumerate(sorted(headers, key=lambda h: h["name"]))}
    groups = [_check_group(members, first_position) for members in buckets.values()]
    return sorted(groups, key=lambda g: g["file_order"])


def _check_group(members: list[dict], file_position: dict) -> dict:
    """One acquisition's frames ordered by TriggerTime, its geometry, and what is wrong with it
    (``problem``: None, or ``(kind, reason)``; ``missing``: the frame slots without a file)."""
    first = members[0]
    g = {"series_uid": first["SeriesInstanceUID"] or "", "description": first["SeriesDescription"] or "",
         "series_number": first["SeriesNumber"] if first["SeriesNumber"] is not None else -1,
         "series_time": first["SeriesTime"] or "", "n_files": len(members),
         "file_order": min(file_position[m["name"]] for m in members), "problem": None, "missing": [],
         "warnings": []}

    def refuse(kind, reason):
        g["problem"] = [kind, reason]
        return g

    without = [m["name"] for m in members if m["TriggerTime"] is None]
    if without:
        return refuse("bad_dicom", f"{len(without)} frame(s) without TriggerTime (e.g. {without[0]}): frame order "
                                   f"unknown")
    members = sorted(members, key=lambda m: (m["TriggerTime"], m["InstanceNumber"] or 0, m["name"]))
    g["members"] = [m["name"] for m in members]
    g["trigger_ms"] = [m["TriggerTime"] for m in members]
    iop = np.asarray(first["ImageOrientationPatient"], dtype=np.float64)
    g["row_cosine"], g["col_cosine"] = iop[:3].tolist(), iop[3:].tolist()
    g["position"] = first["ImagePositionPatient"]
    sizes: dict[tuple, int] = {}
    for m in members:
        key = (m["Rows"], m["Columns"])
        sizes[key] = sizes.get(key, 0) + 1
    spacings = {tuple(np.round(m["PixelSpacing"], 4)) if m["PixelSpacing"] else None for m in members}
    announced = {m["CardiacNumberOfImages"] for m in members} - {None}
    g["rows"], g["columns"] = first["Rows"], first["Columns"]
    g["pixel_spacing"] = first["PixelSpacing"]
    expected = max(announced) if announced else len(members)
    g["expected"] = expected
    if not announced:
        g["warnings"].append("no CardiacNumberOfImages: the frames found are taken as the whole cycle")
    elif len(announced) > 1:
        g["warnings"].append(f"frames announce different CardiacNumberOfImages {sorted(announced)}: "
                             f"{expected} expected")
    if len(sizes) > 1:
        text = ", ".join(f"{r} x {c} ({n} frames)" for (r, c), n in sorted(sizes.items(), key=lambda kv: -kv[1]))
        return refuse("frame_sizes", f"frames of different sizes: {text}")
    if None in spacings or len(spacings) != 1:
        return refuse("pixel_spacing", "PixelSpacing missing or different between frames" if None in spacings
                      else f"frames of different pixel spacing: {sorted(spacings)}")
    if None in (g["rows"], g["columns"]):
        return refuse("bad_dicom", "Rows / Columns missing")
    unreadable = _unreadable(members)
    if unreadable:
        return refuse(*unreadable)
    g["crcs"] = [m["crc"] for m in members]
    g["offsets"] = [m["pixel_offset"] for m in members]
    g["pixels"] = _pixel_layout(members, g["rows"], g["columns"])
    times = np.asarray(g["trigger_ms"])
    if len(times) > 1 and np.any(np.diff(times) <= 0):
        t = float(times[1:][np.diff(times) <= 0][0])
        return refuse("duplicate_frames", f"two frames at trigger time {t:g} ms (a mixed or repeated series that "
                                          f"cannot be split)")
    steps = np.diff(times)
    g["frame_ms"] = float(np.median(steps)) if len(steps) else 0.0
    if len(members) > expected:
        return refuse("extra_frames", f"{len(members)} frames but CardiacNumberOfImages is {expected}")
    if len(members) < expected:
        slots = _frame_slots(times, g["frame_ms"], expected)
        if slots is None:
            return refuse("missing_frames", f"{expected - len(members)} of {expected} frames missing and the trigger "
                                            f"times ({times.min():g}-{times.max():g} ms) do not tell which")
        g["slots"] = slots
        g["missing"] = sorted(set(range(expected)) - set(slots))
    else:
        g["slots"] = list(range(expected))
    return g


def _unreadable(members: list[dict]) -> tuple[str, str] | None:
    """(kind, reason) when some frame is not a single-frame MONOCHROME2 image or no installed
    decoder reads its transfer syntax; None when every frame can be read."""
    bad_layout = [m["name"] for m in members if (m["SamplesPerPixel"] or 1) != 1 or (m["NumberOfFrames"] or 1) != 1
                  or (m["PhotometricInterpretation"] or "MONOCHROME2") != "MONOCHROME2"]
    if bad_layout:
        return "bad_dicom", (f"{bad_layout[0]}: not a single-frame MONOCHROME2 image (colour, inverted or "
                             f"multi-frame DICOM is not read)")
    for syntax in sorted({m["syntax"] for m in members}):
        missing = decoder_missing(syntax)
        if missing:
            return "no_decoder", missing
    return None


def _pixel_layout(members: list[dict], rows: int, columns: int) -> dict | None:
    """How ``load_cine`` may view the pixel values in place (bits, stored bits, signedness): only
    when every frame is stored alike, uncompressed, at an offset the scan found; else None
    (each frame is then decoded by pydicom)."""
    layouts = {(m["syntax"], m["BitsAllocated"], m["BitsStored"], m["PixelRepresentation"] or 0) for m in members}
    if len(layouts) != 1:
        return None
    syntax, allocated, stored, signed = layouts.pop()
    if syntax in _RAW_SYNTAXES and allocated in (8, 16) and all(
            m["pixel_offset"] is not None and m["size"] >= m["pixel_offset"] + rows * columns * allocated // 8
            for m in members):
        return {"bits": allocated, "stored": stored or allocated, "signed": signed}
    return None


def _frame_slots(times: np.ndarray, frame_ms: float, expected: int) -> list[int] | None:
    """The cycle position (0..expected-1) of each present frame from its trigger time, or None."""
    if frame_ms <= 0:
        return None
    for origin in (0.0, float(times[0])):         # trigger times from the R-peak, else from the first frame
        slots = np.rint((times - origin) / frame_ms).astype(int)
        if slots.min() >= 0 and slots.max() < expected and np.all(np.diff(slots) > 0):
            return slots.tolist()
    return None


def decoder_missing(syntax: str) -> str | None:
    """None when pydicom can decode ``syntax`` here; else a reason naming what to install."""
    if syntax in _NATIVE_SYNTAXES:
        return None
    name = syntax
    try:
        from pydicom.pixels import get_decoder  # pydicom >= 3

        try:
            decoder = get_decoder(syntax)
        except NotImplementedError:
            return f"pixel data in transfer syntax {syntax}, which pydicom cannot decode"
        if decoder.is_available:
            return None
        name = decoder.UID.name
        options = [_pip_hint(dep) for dep in decoder.missing_dependencies]
    except ImportError:                             # pydicom 2.4: the pixel data handlers
        import pydicom

        handlers = pydicom.config.pixel_data_handlers
        if any(h.supports_transfer_syntax(syntax) and h.is_available() for h in handlers):
            return None
        name = pydicom.uid.UID(syntax).name
        options = ["pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg", "python-gdcm"]
    return (f"pixel data compressed as {name} ({syntax}) and no decoder for it is installed: "
            f"pip install {' or pip install '.join(options)}")


def _pip_hint(dependency: str) -> str:
    """'pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-libjpeg>=2.1' -> 'pylibjpeg pylibjpeg-libjpeg'."""
    needs = dependency.split("requires", 1)[-1]
    packages = re.findall(r"([A-Za-z][A-Za-z0-9_\-]*)\s*(?:[<>=!~]=?[\d.]+)?", needs.replace(" and ", " "))
    return " ".join(_PIP_NAMES.get(p.lower(), p) for p in packages if p.lower() not in ("and", "requires"))


# ----------------------------------------------------------------------------------------------
# Selection across the folder: repeated series, mixed views, orientation, missing frames
# ----------------------------------------------------------------------------------------------

# The eight flips / quarter turns of an array, as what becomes of its axes' directions (d0, d1):
# ops applied in order to the array; each maps (d0, d1) -> the new axes' directions.
_CANDIDATES = [((), "as-stored"), (("flip0", "flip1"), "rot180"), (("transpose", "flip1"), "rot90"),
               (("transpose", "flip0"), "rot270"), (("flip0",), "flip-rows"), (("flip1",), "flip-cols"),
               (("transpose",), "transpose"), (("transpose", "flip0", "flip1"), "anti-transpose")]


def _apply_axes(ops, d0: np.ndarray, d1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    for op in ops:
        if op == "transpose":
            d0, d1 = d1, d0
        elif op == "flip0":
            d0 = -d0
        else:
            d1 = -d1
    return d0, d1


def _snap(d0: np.ndarray, d1: np.ndarray, ref0: np.ndarray, ref1: np.ndarray):
    """The candidate (ops, label, axes) whose axes lie closest to the reference (first on a tie)."""
    best = None
    for ops, label in _CANDIDATES:
        a0, a1 = _apply_axes(ops, d0, d1)
        score = float(a0 @ ref0 + a1 @ ref1)
        if best is None or score > best[0] + 1e-9:
            best = (score, ops, label, a0, a1)
    return best[1:]


def _orthonormal(a0: np.ndarray, a1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a0 = a0 / max(np.linalg.norm(a0), 1e-12)
    a1 = a1 - (a1 @ a0) * a0
    return a0, a1 / max(np.linalg.norm(a1), 1e-12)


def _axes(group: dict) -> tuple[np.ndarray, np.ndarray]:
    """Patient directions (LPS) of the UK Biobank layout's axes 0 and 1 (the transposed pixel array)."""
    return np.asarray(group["row_cosine"], dtype=np.float64), np.asarray(group["col_cosine"], dtype=np.float64)


def _normal(group: dict) -> np.ndarray:
    d0, d1 = _axes(group)
    n = np.cross(d0, d1)
    return n / max(np.linalg.norm(n), 1e-12)


def consensus_axes(axes: list[tuple[np.ndarray, np.ndarray]], iterations: int = 5):
    """Reference axes (LPS) of a set of cines' layout axes: seeded by the first, each cine snapped
    to its closest flip / quarter turn, the snapped axes averaged, repeated until stable."""
    if not axes:
        return None
    ref0, ref1 = axes[0]
    for _ in range(iterations):
        snapped = [_snap(d0, d1, ref0, ref1)[2:] for d0, d1 in axes]
        new0, new1 = _orthonormal(np.sum([s[0] for s in snapped], axis=0), np.sum([s[1] for s in snapped], axis=0))
        if np.allclose(new0, ref0, atol=1e-9) and np.allclose(new1, ref1, atol=1e-9):
            break
        ref0, ref1 = new0, new1
    # The mean fixes the axes only up to a flip / quarter turn (the seed's): take the version of
    # them under which most cines stay as stored, so that the majority is never turned.
    versions = [_apply_axes(ops, ref0, ref1) for ops, _ in _CANDIDATES]
    stays = [sum(_snap(d0, d1, *v)[1] == "as-stored" for d0, d1 in axes) for v in versions]
    return versions[int(np.argmax(stays))]


def _pick_repeat(groups: list[dict]) -> dict:
    """The stated rule for repeated acquisitions: complete first, then the last acquired."""
    def rank(g):
        complete = g["problem"] is None and not g["missing"]
        return (complete, g["problem"] is None, g["series_number"], g["series_time"], g["series_uid"])
    return max(groups, key=rank)


def select_and_orient(records: list[dict], missing_policy: str) -> tuple[list[dict], dict]:
    """Decide each scanned record in place: ``ok``, its chosen group, ``index`` (the cine index),
    or ``kind`` / ``reason``. Returns (the kept records, the orientation reference facts)."""
    if missing_policy not in MISSING_FRAME_POLICIES:
        raise ValueError(f"data.ukb_missing_frames must be one of {MISSING_FRAME_POLICIES}, got {missing_policy!r}")
    scanned = [r for r in records if r["ok"]]
    for rec in scanned:                               # named 4Ch series: only the repeat rule
        if rec["view_from"] == "named":
            rec["candidates"] = rec["groups"]
            rec["chosen"] = _pick_repeat(rec["groups"])
    named = [r for r in scanned if r["view_from"] == "named" and r["chosen"]["problem"] is None]
    ref = consensus_axes([_axes(r["chosen"]) for r in named])
    ref_normal = np.cross(*ref) if ref is not None else None
    for rec in scanned:                               # mixed LAX series: the view by orientation
        if rec["view_from"] == "mixed":
            _pick_mixed_view(rec, ref_normal)
    usable = [r for r in scanned if r["chosen"] is not None and r["chosen"]["problem"] is None]
    if ref is None:
        ref = consensus_axes([_axes(r["chosen"]) for r in usable])
    for rec in records:
        if not rec["ok"]:
            continue
        g = rec["chosen"]
        if g is None:
            continue
        if g["problem"] is not None:
            rec.update(ok=False, kind=g["problem"][0], reason=g["problem"][1])
            continue
        if g["missing"]:
            n_missing, expected = len(g["missing"]), g["expected"]
            where = ", ".join(str(s) for s in g["missing"])
            if missing_policy == "reject":
                rec.update(ok=False, kind="missing_frames",
                           reason=f"{n_missing} of {expected} frames missing (frame(s) {where} by trigger time); "
                                  f"data.ukb_missing_frames=fill fills up to {MAX_FILLED_FRACTION:.0%}")
                continue
            if n_missing > MAX_FILLED_FRACTION * expected:
                rec.update(ok=False, kind="missing_frames",
                           reason=f"{n_missing} of {expected} frames missing (frame(s) {where}): more than "
                                  f"{MAX_FILLED_FRACTION:.0%}, not filled")
                continue
        rec["index"] = _index(rec, g, ref)
    reference = {"axis0_lps": None if ref is None else [round(float(x), 6) for x in ref[0]],
                 "axis1_lps": None if ref is None else [round(float(x), 6) for x in ref[1]],
                 "from": f"consensus of {len(named) or len(usable)} participants' "
                         f"{'named ' + FOUR_CHAMBER if named else 'four-chamber'} series",
                 "transforms": {}}
    for rec in records:
        if rec.get("index"):
            label = rec["index"]["orientation"]
            reference["transforms"][label] = reference["transforms"].get(label, 0) + 1
    return [r for r in records if r.get("index")], reference


def _pick_mixed_view(rec: dict, ref_normal: np.ndarray | None) -> None:
    """The four-chamber acquisition(s) of a mixed LAX series (module doc, step 4), then the repeat rule."""
    groups = [g for g in rec["groups"] if g.get("row_cosine") is not None]
    if not groups:
        rec["chosen"] = rec["groups"][0]
        return
    if ref_normal is not None:
        angles = [_plane_angle(_normal(g), ref_normal) for g in groups]
        near = [g for g, a in zip(groups, angles) if a <= MIXED_VIEW_MAX_DEG]
        rule = f"plane within {MIXED_VIEW_MAX_DEG:g} deg of the folder's four-chamber plane"
        if not near:
            rec["chosen"] = dict(groups[0], problem=["no_4ch", f"mixed {MIXED_LAX} series: no view lies within "
                                                     f"{MIXED_VIEW_MAX_DEG:g} deg of the four-chamber plane (closest "
                                                     f"{min(angles):.0f} deg)"])
            return
    else:
        top = max(groups, key=lambda g: abs(_normal(g)[2]))
        near = [g for g in groups if _plane_angle(_normal(g), _normal(top)) <= 5.0]
        rule = "most transverse plane (no named four-chamber series in the folder to compare with)"
    rec["candidates"] = near
    chosen = _pick_repeat(near)
    rec["chosen"] = chosen
    views = sorted({g["file_order"] for g in groups})
    if len(views) == 3 and len(near) == 1 and chosen["file_order"] != views[1]:
        rec["warnings"].append("mixed LAX series: the view chosen by orientation is not the second by file "
                               "order, where older conversion scripts take the four-chamber view")
    rec["warnings"].append(f"mixed LAX series: four-chamber view = {rule}")


def _plane_angle(n1: np.ndarray, n2: np.ndarray) -> float:
    return float(np.degrees(np.arccos(np.clip(abs(float(n1 @ n2)), 0.0, 1.0))))


def _index(rec: dict, g: dict, ref) -> dict:
    """The cine index ``load_cine`` reads: zip, members per frame (None: filled), transform, spacing."""
    d0, d1 = _axes(g)
    ops, label, a0, a1 = _snap(d0, d1, *ref) if ref is not None else ((), "as-stored", d0, d1)
    members: list[str | None] = [None] * g["expected"]
    offsets: list[int | None] = [None] * g["expected"]
    crcs: list[int | None] = [None] * g["expected"]
    for slot, name, offset, crc in zip(g["slots"], g["members"], g["offsets"], g["crcs"]):
        members[slot], offsets[slot], crcs[slot] = name, offset, crc
    # PixelSpacing = [between rows, between columns]; layout axis 0 runs along a row (column steps)
    spacing = [float(g["pixel_spacing"][1]), float(g["pixel_spacing"][0])]
    if "transpose" in ops:
        spacing = spacing[::-1]
    deviation = _plane_angle(np.cross(a0, a1), np.cross(*ref)) if ref is not None else 0.0
    if len(rec.get("candidates", [])) > 1:
        rec["warnings"].append(f"{len(rec['candidates'])} acquisitions of the four-chamber view: kept series "
                               f"{g['series_uid']} (number {g['series_number']}; rule: complete first, then the "
                               f"last acquired)")
    if g["missing"]:
        rec["warnings"].append(f"frame(s) {', '.join(map(str, g['missing']))} missing: filled by interpolation")
    rec["warnings"].extend(g["warnings"])
    return {"format": INDEX_FORMAT, "zip": rec["zip"], "members": members, "crcs": crcs,
            "pixels": dict(g["pixels"], offsets=offsets) if g["pixels"] else None, "ops": ["transpose", *ops],
            "orientation": label, "rows": g["rows"], "columns": g["columns"],
            "pixel_mm": [round(s, 6) for s in spacing], "frame_ms": round(g["frame_ms"], 4),
            "series_uid": g["series_uid"], "series_description": g["description"],
            "series_candidates": len(rec.get("candidates", [g])), "view_from": rec["view_from"],
            "filled": g["missing"], "plane_deviation_deg": round(deviation, 2)}


def _qc_row(rec: dict) -> dict:
    row = {c: "" for c in QC_COLUMNS}
    row.update(eid=rec["eid"], instance=rec["instance"], zip=rec["zip"], xml=rec["xml"],
               warnings="; ".join(rec.get("warnings", [])))
    g = rec.get("chosen")
    if g is not None:
        row.update(series_uid=g["series_uid"], series_description=g["description"],
                   series_candidates=len(rec.get("candidates", rec.get("groups", [g]))), view_from=rec["view_from"],
                   frames=g["n_files"], frames_expected=g.get("expected", ""))
    index = rec.get("index")
    if index is not None:
        row.update(status="kept", filled_frames=" ".join(map(str, index["filled"])),
                   pixel_mm=" ".join(f"{s:g}" for s in index["pixel_mm"]), frame_ms=index["frame_ms"],
                   orientation=index["orientation"], plane_deviation_deg=index["plane_deviation_deg"])
    else:
        row.update(status="rejected", kind=rec.get("kind", ""), reason=rec.get("reason", ""))
    return row


def _write_qc(path: Path, rows: list[dict]) -> None:
    import pandas as pd

    table = pd.DataFrame(rows, columns=list(QC_COLUMNS)).fillna("")
    if len(table):
        table = table.sort_values(["eid", "instance"], key=lambda s: s.astype(int), kind="stable")
    tmp = path.with_suffix(".tmp")
    table.to_csv(tmp, index=False)
    os.replace(tmp, path)


def _write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# Reading a cine index (called by cmr_io.load_frames in prepare()'s workers)
# ----------------------------------------------------------------------------------------------


def read_index(path: str | Path) -> dict:
    path = Path(path)
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CMRReadError(f"{path}: unreadable cine index ({type(err).__name__}: {err})") from None
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        raise CMRReadError(f"{path}: not a cine index of this version ({INDEX_FORMAT}); re-run prepare_data.py "
                           f"with data.ukb_bulk to rewrite it")
    return index


def index_pixel_mm(path: str | Path) -> float:
    """The mean in-plane pixel size (mm) a cine index records."""
    spacing = read_index(path)["pixel_mm"]
    return 0.5 * (float(spacing[0]) + float(spacing[1]))


def load_cine(path: str | Path) -> np.ndarray:
    """A cine index -> float32 ``(T, H, W)`` frames in the reference layout (module doc), missing
    frames filled by periodic linear interpolation. Raises ``CMRReadError`` naming the zip."""
    path = Path(path)
    index = read_index(path)
    zip_path = index["zip"]
    members, crcs, pixels = index["members"], index["crcs"], index["pixels"]
    rows, cols = int(index["rows"]), int(index["columns"])
    frames = np.empty((len(members), rows, cols), dtype=np.float32)
    present = [i for i, m in enumerate(members) if m is not None]
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise CMRReadError(f"{zip_path}: unreadable zip ({type(err).__name__}: {err})") from None
    with zf:
        for i in present:
            name = members[i]
            try:
                if zf.getinfo(name).CRC != crcs[i]:
                    raise KeyError(name)
                data = zf.read(name)        # zipfile checks the bytes against the CRC the scan saw
                if pixels is not None:
                    frames[i] = _view_pixels(data, pixels["offsets"][i], rows, cols, pixels)
                else:
                    frames[i] = _decode(data, rows, cols)
            except KeyError:
                raise CMRReadError(f"{zip_path}: {name} is gone or changed since the scan (delete "
                                   f"'{path}' and re-run prepare_data.py)") from None
            except CMRReadError as err:
                raise CMRReadError(f"{zip_path}: {name}: {err}") from None
            except Exception as err:
                raise CMRReadError(f"{zip_path}: {name}: pixel data unreadable ({type(err).__name__}: {err})") from None
    missing = [i for i, m in enumerate(members) if m is None]
    if missing:
        _fill(frames, present, missing)
    for op in index["ops"]:
        frames = (frames.swapaxes(1, 2) if op == "transpose"
                  else frames[:, ::-1] if op == "flip0" else frames[:, :, ::-1])
    return np.ascontiguousarray(frames)


def _view_pixels(data: bytes, offset: int, rows: int, cols: int, layout: dict) -> np.ndarray:
    """Uncompressed pixel values ``(rows, cols)`` at the offset pydicom located in the header scan:
    no second parse (pydicom's parse and decoder cost ~1 ms a frame, most of the reading time)."""
    dtype = np.dtype(("i" if layout["signed"] else "u") + str(layout["bits"] // 8)).newbyteorder("<")
    values = np.frombuffer(data, dtype=dtype, count=rows * cols, offset=offset).reshape(rows, cols)
    return _stored_bits(values, layout["bits"], layout["stored"], layout["signed"])


def _stored_bits(values: np.ndarray, allocated: int, stored: int, signed: int) -> np.ndarray:
    """Only the ``BitsStored`` low bits: the ones above may hold overlays (as pydicom does)."""
    if stored >= allocated:
        return values
    shift = allocated - stored
    return (values << shift) >> shift if signed else values & ((1 << stored) - 1)


def _decode(data: bytes, rows: int, cols: int) -> np.ndarray:
    """One frame through pydicom (compressed or unusual pixel data)."""
    import pydicom

    pixels = _pixels(pydicom.dcmread(io.BytesIO(data)))
    if pixels.shape != (rows, cols):
        raise CMRReadError(f"{pixels.shape[0]} x {pixels.shape[1]} pixels, the scan found {rows} x {cols}")
    return pixels


def _fill(frames: np.ndarray, present: list[int], missing: list[int]) -> None:
    """Fill ``frames[missing]`` in place by linear interpolation between the nearest present frames
    before and after, around the cycle (the frame after the last is frame 0)."""
    t = len(frames)
    have = np.asarray(present)
    for i in missing:
        before = have[have < i]
        after = have[have > i]
        lo = int(before[-1]) if len(before) else int(have[-1]) - t
        hi = int(after[0]) if len(after) else int(have[0]) + t
        w = (i - lo) / (hi - lo)
        frames[i] = (1 - w) * frames[lo % t] + w * frames[hi % t]


def _pixels(ds) -> np.ndarray:
    """One frame's stored values ``(Rows, Columns)`` from a pydicom dataset: uncompressed
    little-endian data viewed from ``PixelData``, anything else through ``ds.pixel_array``."""
    syntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "1.2.840.10008.1.2")
    bits, signed = int(ds.BitsAllocated), int(getattr(ds, "PixelRepresentation", 0) or 0)
    rows, cols = int(ds.Rows), int(ds.Columns)
    if syntax in _NATIVE_SYNTAXES and bits in (8, 16) and int(getattr(ds, "SamplesPerPixel", 1)) == 1:
        dtype = np.dtype(("i" if signed else "u") + str(bits // 8)).newbyteorder("<")
        raw = ds.PixelData
        if len(raw) < rows * cols * dtype.itemsize:
            raise CMRReadError(f"pixel data truncated ({len(raw)} bytes for {rows} x {cols} x {bits} bits)")
        values = np.frombuffer(raw, dtype=dtype, count=rows * cols).reshape(rows, cols)
        return _stored_bits(values, bits, int(getattr(ds, "BitsStored", bits) or bits), signed)
    return ds.pixel_array
