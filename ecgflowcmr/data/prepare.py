"""Data preparation: a manifest of raw files -> the prepared dataset of ``datasets.py``.

``prepare(cfg, manifest)`` (``python prepare_data.py --config configs/<exp>.yaml``):

1. Takes the manifest it is given (``data.manifest`` by default). Where it comes from is not this
   module's business: ``prepare_data.py`` passes the phantom's (``ecgflowcmr.phantom.source``) when
   ``data.manifest`` is empty, and the facts it records about it (``source_meta``, e.g. the phantom
   version) land in ``meta.json``.
2. Reads every record in worker processes (``data.workers``; 0 or 1 = in this process; at most
   4 records per worker in flight, results taken in manifest order): the ECG
   (``ecg_io.read_ecg``, 10 s at 500 Hz), its R-peaks (``phase.detect_rpeaks``), the cine
   (``cmr_io.read_cine``) and, when the manifest has a ``mask_path`` for every row, the mask with
   the cine's crop box. A record that fails any step is rejected with its file and reason; the
   others are kept.
3. Streams kept records, in manifest order, into ``.npy`` files of the final format (created with
   ``np.lib.format.open_memmap`` at the manifest's size, then written row by row with
   ``os.pwrite``: no array is ever held whole, and written pages stay in the OS cache, not in
   this process). Each finished record is appended to a journal (``<root>/.prepare/journal.jsonl``)
   after its rows are written.
4. When every record is done: the arrays are shrunk to the kept rows (the ``.npy`` header is
   rewritten in place, the file truncated), ``rpeaks.npy``, ``subjects.csv``, ``splits.json``,
   ``qc_report.csv``, ``qc_warnings.csv``, ``provenance.csv`` are written, and last ``meta.json``
   with ``complete: true``.

5. With ``data.unpaired_ecg`` (a folder of ECG files or a CSV with ``ecg_path``): the ECG-only
   records, through the same reader, R-peak labels and QC, into ``<root>/unpaired/`` (``ecg.npy``,
   ``rpeaks.npy``, ``subjects.csv``, QC and provenance tables, ``meta.json`` with
   ``ecg_only: true``). Only stage 1 reads them; stages 2-3 need pairs.

Re-running resumes: finished records (those in the journal) are skipped, so an interrupted run
continues where it stopped; a complete dataset is a no-op (only the split files are rewritten if
``data.split_fractions`` / ``data.split_seed`` changed). A dataset prepared from a different
manifest or reader settings is never overwritten: the run stops and says so.

Splits are by subject (records of one subject share a split). A non-empty ``split`` column in
the manifest wins (train / val / test); the other subjects are shuffled with ``data.split_seed``
(sorted by subject_id first, so manifest order does not matter) and cut by
``data.split_fractions``, with at least one subject in every split of non-zero fraction when there
are enough subjects. Splits are drawn over all manifest subjects before QC, so that a subject's
split does not depend on which other records were rejected.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import warnings
from pathlib import Path

import numpy as np

from .cmr_io import IMAGE_SIZE, NUM_FRAMES, CMRReadError, cine_to_uint8, read_cine, read_mask
from .ecg_io import LEADS, TARGET_FS, TARGET_LENGTH, ECGReadError, ECGReadWarning, read_ecg

log = logging.getLogger("ecgflowcmr.prepare")

FORMAT_VERSION = 2          # bump when the reader/processing changes what lands in the arrays
SPLITS = ("train", "val", "test")
PATH_COLUMNS = ("ecg_path", "cmr_path", "mask_path")
REQUIRED_COLUMNS = ("subject_id", "ecg_path", "cmr_path")
WORK_DIR = ".prepare"
JOURNAL = "journal.jsonl"
_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                  "validation": "val", "test": "test", "testing": "test"}
ARRAYS = {  # name -> (per-row shape, dtype)
    "ecg": ((len(LEADS), TARGET_LENGTH), np.float32),
    "cine": ((NUM_FRAMES, IMAGE_SIZE, IMAGE_SIZE), np.uint8),
    "masks": ((NUM_FRAMES, IMAGE_SIZE, IMAGE_SIZE), np.uint8),
}


class PrepareError(RuntimeError):
    """Preparation cannot start or finish (bad manifest, foreign dataset in the way, nothing kept)."""


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------


def prepare(cfg, manifest: str | Path | None = None, max_records: int | None = None, progress: bool = True,
            source_meta: dict | None = None) -> Path:
    """Prepare ``cfg.data_root`` from ``manifest`` (default: ``data.manifest``); returns the root.

    ``source_meta``: facts about where the manifest came from (e.g. ``{"phantom_version": 2}``),
    recorded in ``meta.json``.

    With ``data.unpaired_ecg``, the ECG-only records follow once the paired dataset is complete
    (``prepare_ecg_only``, into ``cfg.unpaired_root``).
    ``max_records``: process at most this many not-yet-finished records, then stop with a
    resumable, incomplete dataset (``meta.json`` says ``complete: false``): for time-limited jobs
    and tests. ``progress``: show a tqdm bar.
    """
    if manifest is None:
        if not cfg.data.manifest:
            raise PrepareError("no manifest: set data.manifest to your CSV (subject_id, ecg_path, cmr_path), or run "
                               "prepare_data.py, which generates the phantom when data.manifest is empty")
        manifest = cfg.manifest_path
    manifest = Path(manifest)
    if not manifest.is_file():
        raise FileNotFoundError(f"manifest '{manifest}' (data.manifest) not found")
    root = _prepare_paired(cfg, manifest, max_records, progress, source_meta or {})
    if cfg.data.unpaired_ecg and Path(root / "meta.json").is_file() and \
            json.loads((root / "meta.json").read_text()).get("complete"):
        prepare_ecg_only(cfg, max_records, progress)
    return root


def _prepare_paired(cfg, manifest_path: Path, max_records: int | None, progress: bool, source_meta: dict) -> Path:
    root = Path(cfg.data_root)
    table = read_manifest(manifest_path)
    fingerprint = _fingerprint(manifest_path, cfg)
    split_params = {"fractions": list(cfg.data.split_fractions), "seed": int(cfg.data.split_seed)}
    use_masks = _use_masks(table, manifest_path)

    meta = _existing_meta(root, fingerprint, manifest_path)
    if meta is not None and meta.get("complete"):
        if meta.get("split") != split_params:
            log.info("dataset complete; split settings changed: rewriting splits only")
            _write_tables(root, table, manifest_path, split_params, meta, rewrite_splits_only=True)
        else:
            log.info("dataset in '%s' is complete (%d records): nothing to do", root, meta["n"])
        return root

    state = _open_state(root, table, fingerprint, use_masks, meta is not None)
    pending = [i for i in range(len(table)) if i not in state.done]
    if max_records is not None:
        pending = pending[:max(0, int(max_records))]
    if pending:
        _process(state, table, manifest_path, pending, cfg, use_masks, progress)
    if len(state.done) < len(table):
        log.info("stopped with %d of %d records done; re-run to continue", len(state.done), len(table))
        return root
    _finalise(state, table, manifest_path, split_params, use_masks, source_meta)
    return root


# ----------------------------------------------------------------------------------------------
# Manifest
# ----------------------------------------------------------------------------------------------


def _existing_meta(root: Path, fingerprint: str, source: Path) -> dict | None:
    """meta.json of what ``root`` holds (None if nothing); an error if it came from other input."""
    meta_path = root / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else None
    if meta is not None and meta.get("fingerprint") != fingerprint:
        raise PrepareError(
            f"'{root}' holds a dataset prepared from another manifest or with other reader settings "
            f"(meta.json fingerprint differs from {source}). Delete '{root}' to rebuild it, "
            f"or set data.root to another folder.")
    return meta


def read_manifest(path: str | Path):
    """The manifest as a DataFrame; subject_id and path/split columns as stripped strings."""
    import pandas as pd

    path = Path(path)
    text_columns = {c: str for c in ("subject_id", *PATH_COLUMNS, "split")}
    try:
        table = pd.read_csv(path, dtype=text_columns, keep_default_na=False, na_values=[""])
    except Exception as err:
        raise PrepareError(f"manifest '{path}' is unreadable: {err}") from None
    table.columns = [str(c).strip() for c in table.columns]
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise PrepareError(f"manifest '{path}' lacks column(s) {', '.join(missing)} "
                           f"(needs subject_id, ecg_path, cmr_path[, mask_path][, split][, labels])")
    if len(table) == 0:
        raise PrepareError(f"manifest '{path}' has no rows")
    for column in ("subject_id", *PATH_COLUMNS, "split"):
        if column in table.columns:
            table[column] = table[column].fillna("").astype(str).str.strip()
    duplicated = table["subject_id"][table["subject_id"].duplicated() & (table["subject_id"] != "")]
    if len(duplicated):
        log.warning("manifest '%s': %d subject(s) have several records (e.g. %s); they share a split",
                    path, duplicated.nunique(), duplicated.iloc[0])
    return table.reset_index(drop=True)


def label_columns(table) -> list[str]:
    return [c for c in table.columns if c not in ("subject_id", "split", *PATH_COLUMNS)]


def _use_masks(table, manifest_path: Path) -> bool:
    if "mask_path" not in table.columns:
        return False
    filled = table["mask_path"] != ""
    if filled.all():
        return True
    if filled.any():
        log.warning("manifest '%s': mask_path is empty for %d of %d rows: masks are not prepared",
                    manifest_path, int((~filled).sum()), len(table))
    return False


def _resolve(manifest_path: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else manifest_path.parent / path


def _fingerprint(manifest_path: Path | bytes, cfg) -> str:
    digest = hashlib.sha256(manifest_path if isinstance(manifest_path, bytes) else Path(manifest_path).read_bytes())
    settings = {"format": FORMAT_VERSION, "tolerance": cfg.data.ecg_length_tolerance_s}
    if cfg.data.crop_mm > 0:            # only then: datasets prepared before the key existed keep theirs
        settings["crop_mm"] = cfg.data.crop_mm
        settings["box_centre"] = "outline"  # the box in mm is centred on the heart's outline (cmr_io)
    digest.update(json.dumps(settings).encode())
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------------


def assign_splits(table, fractions, seed: int) -> dict[str, str]:
    """subject_id -> split for every subject of the manifest (see module doc)."""
    explicit: dict[str, str] = {}
    if "split" in table.columns:
        for row, (sid, value) in enumerate(zip(table["subject_id"], table["split"])):
            if value == "":
                continue
            split = _SPLIT_ALIASES.get(value.lower())
            if split is None:
                raise PrepareError(f"manifest row {row + 1}: split '{value}' is not train, val or test")
            if explicit.setdefault(sid, split) != split:
                raise PrepareError(f"manifest: subject {sid} has records in splits "
                                   f"{explicit[sid]} and {split}; splits are by subject")
    subjects = sorted(set(table["subject_id"]) - set(explicit) - {""})
    order = np.random.default_rng(int(seed)).permutation(len(subjects))
    counts = split_counts(len(subjects), fractions)
    assigned = dict(explicit)
    bounds = np.cumsum([0] + counts)
    for k, split in enumerate(SPLITS):
        for j in order[bounds[k]:bounds[k + 1]]:
            assigned[subjects[j]] = split
    return assigned


def split_counts(n: int, fractions) -> list[int]:
    """Largest-remainder rounding of ``n * fractions``, at least 1 per non-zero fraction if n allows."""
    fractions = np.asarray(fractions, dtype=np.float64)
    raw = n * fractions / fractions.sum()
    counts = np.floor(raw).astype(int)
    for k in np.argsort(-(raw - counts), kind="stable")[: n - counts.sum()]:
        counts[k] += 1
    if n >= int((fractions > 0).sum()):
        for k in np.flatnonzero((fractions > 0) & (counts == 0)):
            counts[int(np.argmax(counts))] -= 1
            counts[k] = 1
    return counts.tolist()


# ----------------------------------------------------------------------------------------------
# State: arrays on disk + journal
# ----------------------------------------------------------------------------------------------


class _State:
    def __init__(self, root: Path, capacity: int, names: list[str]):
        self.root = root
        self.capacity = capacity
        self.names = names
        self.done: dict[int, dict] = {}     # manifest row -> journal entry
        self.next_row = 0
        self.offsets: dict[str, int] = {}
        self.row_bytes = {n: int(np.prod(ARRAYS[n][0])) * np.dtype(ARRAYS[n][1]).itemsize for n in names}

    @property
    def journal_path(self) -> Path:
        return self.root / WORK_DIR / JOURNAL


def _open_state(root: Path, table, fingerprint: str, use_masks: bool, resuming: bool,
                ecg_only: bool = False) -> _State:
    names = ["ecg"] if ecg_only else ["ecg", "cine"] + (["masks"] if use_masks else [])
    state = _State(root, len(table), names)
    work = root / WORK_DIR
    arrays_ok = False
    if resuming and work.is_dir():
        entries = _read_journal(state.journal_path)
        # Rewrite the journal without a line cut by an interruption, so that appends stay valid.
        tmp = state.journal_path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(e) + "\n" for e in entries))
        os.replace(tmp, state.journal_path)
        state.done = {e["i"]: e for e in entries}
        kept = sorted(e["row"] for e in state.done.values() if e["row"] >= 0)
        state.next_row = len(kept)
        # Arrays at full size, or already shrunk by an interrupted finalisation (all records done).
        sizes = {state.capacity} | ({len(kept)} if len(state.done) == state.capacity else set())
        arrays_ok = kept == list(range(len(kept))) and all(
            (root / f"{n}.npy").is_file() and _npy_rows(root / f"{n}.npy") in sizes for n in names)
        if arrays_ok:
            log.info("resuming: %d of %d records already done", len(state.done), len(table))
    if not arrays_ok:
        state.done, state.next_row = {}, 0
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True, exist_ok=True)
        for name in ("ecg", "cine", "masks", "rpeaks"):
            (root / f"{name}.npy").unlink(missing_ok=True)
        for name in names:
            shape, dtype = ARRAYS[name]
            # Creates the file (sparse, full size); the map is dropped at once: rows go in by pwrite.
            np.lib.format.open_memmap(root / f"{name}.npy", mode="w+", dtype=dtype,
                                      shape=(state.capacity, *shape))
        _write_json(root / "meta.json", {"n": 0, "complete": False, "fingerprint": fingerprint})
    for name in names:
        state.offsets[name] = _npy_offset(root / f"{name}.npy")
    return state


def _read_journal(path: Path) -> list[dict]:
    entries = []
    if not path.is_file():
        return entries
    with open(path) as f:
        for line in f:
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut by an interruption: everything after it is redone
    return entries


def _npy_header(path: Path) -> tuple[int, tuple, np.dtype, int]:
    """(header version major, shape, dtype, data offset) of a .npy file."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        return version[0], shape, dtype, f.tell()


def _npy_rows(path: Path) -> int:
    try:
        return _npy_header(path)[1][0]
    except Exception:
        return -1


def _npy_offset(path: Path) -> int:
    return _npy_header(path)[3]


def shrink_npy(path: str | Path, rows: int) -> None:
    """Keep the first ``rows`` rows of a C-order .npy in place: rewrite the header's shape (same
    header length, padded with spaces as the format allows) and truncate the file."""
    path = Path(path)
    major, shape, dtype, offset = _npy_header(path)
    if rows > shape[0]:
        raise ValueError(f"{path}: cannot grow {shape[0]} rows to {rows}")
    new_shape = (rows, *shape[1:])
    text = repr({"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                 "shape": new_shape})
    prefix = 6 + 2 + (2 if major == 1 else 4)
    room = offset - prefix - 1  # header text + padding, then "\n"
    if len(text) > room:
        raise ValueError(f"{path}: new header does not fit")
    header = (text + " " * (room - len(text)) + "\n").encode("latin1")
    with open(path, "r+b") as f:
        f.seek(prefix)
        f.write(header)
        f.truncate(offset + rows * int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize)


# ----------------------------------------------------------------------------------------------
# Processing
# ----------------------------------------------------------------------------------------------


def _process(state: _State, table, manifest_path: Path, pending: list[int], cfg, use_masks: bool,
             progress: bool) -> None:
    from tqdm import tqdm

    tolerance = float(cfg.data.ecg_length_tolerance_s)
    tasks = []
    for i in pending:
        row = table.iloc[i]
        ecg = str(_resolve(manifest_path, row["ecg_path"])) if row["ecg_path"] else ""
        if "cmr_path" in row:
            cmr = str(_resolve(manifest_path, row["cmr_path"])) if row["cmr_path"] else ""
        else:
            cmr = None      # an ECG-only record
        mask = str(_resolve(manifest_path, row["mask_path"])) if use_masks else None
        tasks.append((i, row["subject_id"], ecg, cmr, mask, tolerance, float(cfg.data.crop_mm)))
    workers = max(0, int(cfg.data.workers))
    fds = {n: os.open(state.root / f"{n}.npy", os.O_RDWR) for n in state.names}
    kept = rejected = 0
    started = time.time()
    try:
        with open(state.journal_path, "a") as journal, \
                tqdm(total=len(table), initial=len(state.done), desc="prepare", unit="rec",
                     disable=not progress, dynamic_ncols=True) as bar:
            for result in _ordered_results(tasks, workers):
                entry = _store(state, fds, result)
                journal.write(json.dumps(entry) + "\n")
                journal.flush()
                state.done[entry["i"]] = entry
                if entry["row"] >= 0:
                    kept += 1
                else:
                    rejected += 1
                    log.warning("rejected %s: %s", entry["file"], entry["reason"])
                bar.update(1)
                bar.set_postfix(kept=kept, rejected=rejected, refresh=False)
    finally:
        for fd in fds.values():
            os.close(fd)
    log.info("processed %d records in %.1f s (%d kept, %d rejected)", kept + rejected,
             time.time() - started, kept, rejected)


def _ordered_results(tasks: list, workers: int):
    """``process_record`` over ``tasks``, results in task order. With ``workers`` > 1, worker
    processes with at most ``4 * workers`` tasks in flight, so that finished results never pile
    up in memory behind a slow record. A worker that dies (e.g. killed for memory) stops the run
    with an error; what was journaled so far is kept and a re-run resumes."""
    if workers <= 1 or len(tasks) <= 1:
        yield from map(process_record, tasks)
        return
    import multiprocessing as mp
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    _warm_imports()  # forked workers inherit them instead of each importing neurokit2 & co.
    executor = ProcessPoolExecutor(max_workers=min(workers, len(tasks)), mp_context=mp.get_context())
    queue = iter(tasks)
    in_flight: deque = deque()
    try:
        for task in queue:
            in_flight.append(executor.submit(process_record, task))
            if len(in_flight) >= 4 * workers:
                break
        while in_flight:
            try:
                result = in_flight.popleft().result()
            except BrokenProcessPool:
                raise PrepareError("a worker process died while reading records (out of memory? "
                                   "try fewer data.workers); finished records are kept, re-run "
                                   "to resume") from None
            next_task = next(queue, None)
            if next_task is not None:
                in_flight.append(executor.submit(process_record, next_task))
            yield result
    finally:
        for future in in_flight:
            future.cancel()
        executor.shutdown(wait=True, cancel_futures=True)


def _warm_imports() -> None:
    import importlib

    for module in ("neurokit2", "nibabel", "scipy.signal", "scipy.ndimage", "PIL.Image", "wfdb",
                   "xml.etree.ElementTree", "ecgflowcmr.data.phase"):
        try:
            importlib.import_module(module)
        except ImportError:
            pass


def _store(state: _State, fds: dict, result: dict) -> dict:
    """Write a kept record's rows; return its journal entry."""
    entry = {"i": result["i"], "subject_id": result["subject_id"], "warnings": result["warnings"]}
    if not result["ok"]:
        entry.update(row=-1, file=result["file"], reason=result["reason"])
        return entry
    row = state.next_row
    for name in state.names:
        data = np.ascontiguousarray(result[name])
        assert data.nbytes == state.row_bytes[name], (name, data.shape)
        os.pwrite(fds[name], data.tobytes(), state.offsets[name] + row * state.row_bytes[name])
    state.next_row += 1
    entry.update(row=row, rpeaks=result["rpeaks"], box=result.get("box"), ecg_file=result["ecg_file"],
                 cmr_file=result["cmr_file"], mask_file=result["mask_file"], rpeak_source=result["rpeak_source"])
    return entry


def process_record(task) -> dict:
    """Read one manifest record (runs in a worker; ``cmr_path`` None: an ECG-only record). Never
    raises: failures come back as ``{"ok": False, "file": ..., "reason": ...}``."""
    from .phase import RPeakError, detect_rpeaks

    i, subject_id, ecg_path, cmr_path, mask_path, tolerance, crop_mm = task
    out = {"i": i, "subject_id": subject_id, "ok": False, "warnings": [], "ecg_file": ecg_path,
           "cmr_file": cmr_path or "", "mask_file": mask_path or ""}
    current = ecg_path
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if not subject_id:
                raise PrepareError("subject_id is empty")
            if not ecg_path:
                raise PrepareError("ecg_path is empty")
            if cmr_path == "":
                raise PrepareError("cmr_path is empty")
            ecg = read_ecg(ecg_path, tolerance_s=tolerance)
            try:
                rpeaks, how = detect_rpeaks(ecg, fs=TARGET_FS, return_info=True)
            except RPeakError as err:
                raise PrepareError(f"R-peaks: {err}") from None
            out.update(ecg=ecg, rpeaks=rpeaks.tolist(), rpeak_source=rpeak_source(how))
            if cmr_path is None:
                out.update(ok=True)
                return _with_warnings(out, caught, ecg_path)
            current = cmr_path
            cine, box = read_cine(cmr_path, return_box=True, crop_mm=crop_mm)
            if mask_path is not None:
                current = mask_path
                out["masks"] = read_mask(mask_path, box)
            out.update(ok=True, cine=cine_to_uint8(cine[0]), box=list(box)[:3])
        except (ECGReadError, CMRReadError, PrepareError) as err:
            out.update(file=current, reason=_strip_path(str(err), current))
        except Exception as err:  # an unexpected failure still only rejects this record
            out.update(file=current, reason=f"unexpected {type(err).__name__}: {err}")
    return _with_warnings(out, caught, ecg_path)


def _with_warnings(out: dict, caught: list, ecg_path: str) -> dict:
    from .phase import RPeakWarning

    out["warnings"] = [_strip_path(str(w.message), ecg_path) for w in caught
                       if issubclass(w.category, (ECGReadWarning, RPeakWarning))][:5]
    return out


def rpeak_source(info: dict) -> dict:
    """The provenance columns saying how a record's R-peaks were found (``detect_rpeaks`` info)."""
    return {"rpeak_lead": info["placed_on"], "rpeak_voters": info["voters"],
            "rpeak_detectors": info["detectors"], "rpeak_runs": info["runs"],
            "rpeak_min_votes": info["min_votes"]}


def _strip_path(message: str, path: str) -> str:
    prefix = f"{path}: "
    return message[len(prefix):] if path and message.startswith(prefix) else message


# ----------------------------------------------------------------------------------------------
# ECG-only records (stage 1's unpaired pool)
# ----------------------------------------------------------------------------------------------

ECG_SUFFIXES = (".xml", ".hea", ".npy", ".csv")


def ecg_only_table(source: str | Path):
    """``data.unpaired_ecg`` -> DataFrame (subject_id, ecg_path) with absolute paths.

    ``source``: a CSV manifest with an ``ecg_path`` column (``subject_id`` optional: the file name
    without suffix; relative paths are relative to the CSV), or a folder whose ECG files
    (``ECG_SUFFIXES``, searched recursively) are the records (subject_id: the path in the folder
    without suffix)."""
    import pandas as pd

    source = Path(source)
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.suffix.lower() in ECG_SUFFIXES and p.is_file())
        if not files:
            raise PrepareError(f"data.unpaired_ecg: no ECG file ({', '.join(ECG_SUFFIXES)}) under '{source}'")
        return pd.DataFrame({"subject_id": [str(p.relative_to(source).with_suffix("")) for p in files],
                             "ecg_path": [str(p.resolve()) for p in files]})
    if not source.is_file():
        raise PrepareError(f"data.unpaired_ecg: '{source}' is neither a folder of ECG files nor a manifest CSV")
    try:
        table = pd.read_csv(source, dtype=str, keep_default_na=False)
    except Exception as err:
        raise PrepareError(f"data.unpaired_ecg: manifest '{source}' is unreadable: {err}") from None
    table.columns = [str(c).strip() for c in table.columns]
    if "ecg_path" not in table.columns or len(table) == 0:
        raise PrepareError(f"data.unpaired_ecg: manifest '{source}' needs an ecg_path column and at least one row")
    paths = [str(_resolve(source, p.strip()).resolve()) for p in table["ecg_path"]]
    ids = table["subject_id"].str.strip() if "subject_id" in table.columns else [Path(p).stem for p in paths]
    return pd.DataFrame({"subject_id": list(ids), "ecg_path": paths})


def prepare_ecg_only(cfg, max_records: int | None = None, progress: bool = True) -> Path:
    """``data.unpaired_ecg`` -> ``cfg.unpaired_root``: ``ecg.npy``, ``rpeaks.npy``, ``subjects.csv``
    (all records in the train split), QC tables and ``provenance.csv`` as for paired records (same
    readers, same R-peak labels, same refusals), ``meta.json`` with ``ecg_only: true``; no cine.
    Resumes like ``prepare``."""
    import pandas as pd

    root = Path(cfg.unpaired_root)
    table = ecg_only_table(cfg.data.unpaired_ecg)
    listing = table.to_csv(index=False).encode()
    fingerprint = _fingerprint(listing, cfg)
    meta = _existing_meta(root, fingerprint, Path(cfg.data.unpaired_ecg))
    if meta is not None and meta.get("complete"):
        log.info("ECG-only records in '%s' are complete (%d records): nothing to do", root, meta["n"])
        return root
    state = _open_state(root, table, fingerprint, False, meta is not None, ecg_only=True)
    pending = [i for i in range(len(table)) if i not in state.done]
    if max_records is not None:
        pending = pending[:max(0, int(max_records))]
    if pending:
        _process(state, table, root / "listing.csv", pending, cfg, False, progress)
    if len(state.done) < len(table):
        log.info("stopped with %d of %d ECG-only records done; re-run to continue", len(state.done), len(table))
        return root
    kept = _finalise_records(state, table, Path(cfg.data.unpaired_ecg))
    subjects = pd.DataFrame({"index": [e["row"] for e in kept], "subject_id": [e["subject_id"] for e in kept],
                             "split": "train"})
    subjects.to_csv(root / "subjects.csv", index=False)
    _write_json(root / "splits.json", {"train": sorted(set(subjects["subject_id"])), "val": [], "test": []})
    _write_json(root / "meta.json", {
        "n": len(kept), "ecg_fs": TARGET_FS, "leads": LEADS, "ecg_only": True, "rejected": len(table) - len(kept),
        "source": str(cfg.data.unpaired_ecg), "fingerprint": fingerprint, "format_version": FORMAT_VERSION,
        "max_rpeaks": max(len(e["rpeaks"]) for e in kept), "complete": True})
    shutil.rmtree(root / WORK_DIR, ignore_errors=True)
    return root


# ----------------------------------------------------------------------------------------------
# Finalisation
# ----------------------------------------------------------------------------------------------


def _finalise_records(state: _State, table, manifest_path: Path) -> list[dict]:
    """QC tables, arrays shrunk to the kept rows, ``rpeaks.npy`` and ``provenance.csv`` (the columns
    of every record, then those of a paired one); returns the kept journal entries."""
    import pandas as pd

    root = state.root
    entries = [state.done[i] for i in range(len(table))]
    kept = [e for e in entries if e["row"] >= 0]
    rejected = [e for e in entries if e["row"] < 0]
    qc = pd.DataFrame([{"subject_id": e["subject_id"], "file": e["file"], "reason": e["reason"]}
                       for e in rejected], columns=["subject_id", "file", "reason"])
    qc.to_csv(root / "qc_report.csv", index=False)
    notes = [{"subject_id": e["subject_id"], "warning": w} for e in entries for w in e.get("warnings", [])]
    pd.DataFrame(notes, columns=["subject_id", "warning"]).to_csv(root / "qc_warnings.csv", index=False)
    if not kept:
        raise PrepareError(f"no record of '{manifest_path}' passed QC; see '{root / 'qc_report.csv'}'")
    n = len(kept)
    for name in state.names:
        shrink_npy(root / f"{name}.npy", n)
    max_r = max(len(e["rpeaks"]) for e in kept)
    rpeaks = np.full((n, max_r), -1, dtype=np.int32)
    for e in kept:
        rpeaks[e["row"], : len(e["rpeaks"])] = e["rpeaks"]
    np.save(root / "rpeaks.npy", rpeaks)
    paired = "cine" in state.names
    provenance = pd.DataFrame([{
        "index": e["row"], "subject_id": e["subject_id"], "manifest_row": e["i"], "ecg_file": e["ecg_file"],
        **({"cmr_file": e["cmr_file"], "mask_file": e["mask_file"], "crop_row": e["box"][0],
            "crop_col": e["box"][1], "crop_size": e["box"][2]} if paired else {}),
        "n_rpeaks": len(e["rpeaks"]),
        "heart_rate_rpeaks": round(60.0 * TARGET_FS / float(np.median(np.diff(e["rpeaks"]))), 2),
        **e.get("rpeak_source", {}),
    } for e in kept])
    provenance.to_csv(root / "provenance.csv", index=False)
    _fsync_all(root, state.names + ["rpeaks"])
    log.info("prepared %d records in '%s' (%d rejected, see qc_report.csv)", n, root, len(rejected))
    return kept


def _finalise(state: _State, table, manifest_path: Path, split_params: dict, use_masks: bool,
              source_meta: dict) -> None:
    root = state.root
    kept = _finalise_records(state, table, manifest_path)
    n, rejected = len(kept), len(table) - len(kept)
    max_r = max(len(e["rpeaks"]) for e in kept)
    meta = {"n": n, "ecg_fs": TARGET_FS, "num_frames": NUM_FRAMES, "image_size": IMAGE_SIZE,
            "leads": LEADS, "masks": use_masks, "max_rpeaks": max_r, "rejected": rejected,
            "manifest": str(manifest_path), "fingerprint": json.loads((root / "meta.json").read_text())
            ["fingerprint"], "format_version": FORMAT_VERSION, "phantom_version": None,
            **source_meta, "complete": False}
    _write_tables(root, table, manifest_path, split_params, meta, rewrite_splits_only=False,
                  kept_rows=[e["i"] for e in kept])
    shutil.rmtree(root / WORK_DIR, ignore_errors=True)


def _write_tables(root: Path, table, manifest_path: Path, split_params: dict, meta: dict,
                  rewrite_splits_only: bool, kept_rows: list[int] | None = None) -> None:
    """subjects.csv + splits.json, then meta.json (complete) last."""
    import pandas as pd

    splits = assign_splits(table, split_params["fractions"], split_params["seed"])
    if rewrite_splits_only:
        subjects = pd.read_csv(root / "subjects.csv", dtype={"subject_id": str}, keep_default_na=False,
                               na_values=[""])
        subjects["split"] = [splits[s] for s in subjects["subject_id"].astype(str)]
    else:
        labels = label_columns(table)
        subjects = table.iloc[kept_rows][["subject_id", *labels]].reset_index(drop=True)
        subjects.insert(0, "index", np.arange(len(subjects)))
        subjects.insert(2, "split", [splits[s] for s in subjects["subject_id"]])
    subjects.to_csv(root / "subjects.csv", index=False)
    by_split = {s: sorted(set(subjects.loc[subjects["split"] == s, "subject_id"].astype(str)))
                for s in SPLITS}
    _write_json(root / "splits.json", by_split)
    meta = dict(meta, split=split_params, split_sizes={s: len(v) for s, v in by_split.items()},
                complete=True)
    _write_json(root / "meta.json", meta)


def _write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)


def _fsync_all(root: Path, names: list[str]) -> None:
    for name in names:
        fd = os.open(root / f"{name}.npy", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
