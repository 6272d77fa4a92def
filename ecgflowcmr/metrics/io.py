"""Sets of cines to evaluate: a prepared split, a folder of .npy / NIfTI files, or an array.

Every set ends up as uint8 cines (N, T, H, W) quantised with ``round((x + 1) * 127.5)`` (the
prepared dataset's own storage rule), so real and generated videos are quantised identically
before any metric sees them. One video takes T * H * W bytes (460 kB for 50 x 96 x 96).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data.datasets import Prepared, cine_to_uint8

CINE_SUFFIXES = (".npy", ".nii.gz", ".nii")


@dataclass
class CineSet:
    source: str
    subjects: list[str]                   # subject id per video
    samples: list[int]                    # sample index per video (0 for real cines)
    cines: np.ndarray                     # uint8 (N, T, H, W)
    masks: np.ndarray | None = None       # uint8 (N, T, H, W) ground-truth labels, real only
    ground_truth: dict[str, np.ndarray] = field(default_factory=dict)  # column -> (N,) values
    prepared: Prepared | None = None      # the prepared dataset it came from, if any

    def __len__(self) -> int:
        return len(self.subjects)

    @property
    def keys(self) -> list[str]:
        return [s if k == 0 else f"{s}_{k}" for s, k in zip(self.subjects, self.samples)]

    def subset(self, idx) -> CineSet:
        idx = np.asarray(idx, dtype=np.int64)
        return CineSet(self.source, [self.subjects[i] for i in idx], [self.samples[i] for i in idx],
                       self.cines[idx], None if self.masks is None else self.masks[idx],
                       {k: v[idx] for k, v in self.ground_truth.items()}, self.prepared)

    def describe(self) -> dict:
        n, t, h, w = self.cines.shape if self.cines.ndim == 4 else (0, 0, 0, 0)
        return {"source": self.source, "n_videos": int(n), "n_frames": int(n * t), "frames_per_video": int(t),
                "frame_size": [int(h), int(w)], "n_subjects": len(set(self.subjects)),
                "has_masks": self.masks is not None, "ground_truth_columns": sorted(self.ground_truth)}


GT_COLUMNS = ("es_frame", "ef_area", "ef", "ed_area", "es_area", "heart_rate", "phenotype", "class")


def to_uint8_cine(array, name: str) -> np.ndarray:
    """One cine as uint8 (T, H, W): accepts uint8, or float in [-1, 1]; (1, T, H, W) or (T, H, W)."""
    arr = np.asarray(array)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 3:
        raise ValueError(f"'{name}': expected a cine (1, T, H, W) or (T, H, W), got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"'{name}': expected float32 in [-1, 1] or uint8, got dtype {arr.dtype}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"'{name}': contains NaN or inf")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < -1.05 or hi > 1.05:
        raise ValueError(f"'{name}': values span [{lo:.3g}, {hi:.3g}], outside the cine contract [-1, 1]")
    return cine_to_uint8(arr)


def _read_nifti(path: Path, contract=(50, 96, 96)) -> np.ndarray:
    """A NIfTI cine as (T, H, W), float in [-1, 1] or uint8.

    A file already in the cine contract ((96, 96[, 1], 50), as infer_flow.py writes) is read as it
    is: no crop, no resampling, so a generated cine is measured exactly. Anything else (a raw scanner
    export) goes through the project's reader ``ecgflowcmr.data.cmr_io.read_cine`` (resample to 50
    frames, crop around the heart, resize to 96 x 96, normalise), as prepare_data.py does."""
    import nibabel as nib

    data = np.squeeze(np.asarray(nib.load(str(path)).dataobj))
    if data.ndim != 3:
        raise ValueError(f"'{path}': expected a 2D+time NIfTI, got shape {data.shape}")
    data = np.transpose(data, (2, 0, 1))  # (H, W, T) -> (T, H, W), UK Biobank long-axis layout
    if tuple(data.shape) != tuple(contract):
        try:
            from ..data.cmr_io import read_cine  # the data pipeline's reader
        except ImportError:
            read_cine = None
        if read_cine is not None:
            return np.asarray(read_cine(path))
    if data.dtype == np.uint8:
        return data
    data = data.astype(np.float32)
    lo, hi = float(data.min()), float(data.max())
    if lo >= -1.0 - 1e-3 and hi <= 1.0 + 1e-3:
        return np.clip(data, -1, 1)
    return (2.0 * (data - lo) / max(hi - lo, 1e-8) - 1.0).astype(np.float32)


def read_cine_file(path: str | Path) -> np.ndarray:
    path = Path(path)
    if path.name.endswith(".npy"):
        return to_uint8_cine(np.load(path, allow_pickle=False), str(path))
    return to_uint8_cine(_read_nifti(path), str(path))


def _stem(path: Path) -> str:
    name = path.name
    for suffix in CINE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def list_cine_files(folder: Path) -> dict[str, Path]:
    """stem -> file, preferring .npy (exact float32) over NIfTI when both exist."""
    files: dict[str, Path] = {}
    for suffix in CINE_SUFFIXES:  # .npy first
        for path in sorted(folder.glob(f"*{suffix}")):
            stem = _stem(path)
            if stem not in files and path.is_file():
                files[stem] = path
    return files


_SAMPLE_RE = re.compile(r"^(?P<subject>.+)_(?P<k>\d+)$")


def parse_sample_key(stem: str, known_subjects: set[str] | None) -> tuple[str, int]:
    """``S0001`` -> (S0001, 0); ``S0001_3`` -> (S0001, 3) when S0001 is a known subject (or when no
    subjects are known); a stem that is itself a known subject id is never split."""
    if known_subjects is not None and stem in known_subjects:
        return stem, 0
    m = _SAMPLE_RE.match(stem)
    if m and (known_subjects is None or m.group("subject") in known_subjects):
        return m.group("subject"), int(m.group("k"))
    return stem, 0


def _entries_from_index(folder: Path) -> list[tuple[str, int, Path]] | None:
    """(subject, sample, file) from infer_flow.py's ``index.csv`` (columns subject, sample, status,
    npy / nifti; the last row of each (subject, sample) counts; only status ok). None when the
    folder has no such index, so that file names are parsed instead."""
    index = folder / "index.csv"
    if not index.is_file():
        return None
    import csv

    with open(index, newline="") as fh:
        reader = csv.DictReader(fh)
        fields = set(reader.fieldnames or [])
        if not {"subject", "sample", "status"} <= fields or not fields & {"npy", "nifti"}:
            return None
        rows = {}
        for row in reader:
            try:
                rows[(row["subject"], int(row["sample"]))] = row
            except (TypeError, ValueError):
                continue
    entries = []
    for (subject, k), row in sorted(rows.items()):
        if (row.get("status") or "").strip() != "ok":
            continue
        for column in ("npy", "nifti"):
            name = (row.get(column) or "").strip()
            if name:
                path = Path(name) if Path(name).is_absolute() else folder / name
                if not path.is_file():
                    path = folder / Path(name).name
                if path.is_file():
                    entries.append((subject, k, path))
                    break
        else:
            raise FileNotFoundError(f"'{index}' lists {subject} sample {k} as ok but its file is missing")
    return entries


def load_folder(folder: str | Path, known_subjects: set[str] | None = None, samples: str = "all",
                written_by: str = "infer_flow.py (stage 4)") -> CineSet:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"'{folder}' is missing: it is written by {written_by}. Run that stage first "
                                f"(or pass a folder of .npy / .nii.gz cines).")
    entries = _entries_from_index(folder)
    if entries is None:
        files = list_cine_files(folder)
        if not files:
            raise FileNotFoundError(f"'{folder}' holds no .npy / .nii.gz / .nii cines")
        entries = [(*parse_sample_key(stem, known_subjects), path) for stem, path in files.items()]
    if not entries:
        raise FileNotFoundError(f"'{folder}/index.csv' lists no successfully generated cine (status ok)")
    entries.sort(key=lambda e: (e[0], e[1]))
    seen, unique = set(), []
    for subject, k, path in entries:
        if (subject, k) not in seen:
            seen.add((subject, k))
            unique.append((subject, k, path))
    if samples == "first":  # keep the lowest sample per subject
        first: dict[str, tuple] = {}
        for e in unique:
            first.setdefault(e[0], e)
        unique = list(first.values())
    cines = [read_cine_file(p) for _, _, p in unique]
    shapes = {c.shape for c in cines}
    if len(shapes) > 1:
        raise ValueError(f"'{folder}': cines of different shapes {sorted(shapes)}; expected one shape")
    return CineSet(str(folder), [e[0] for e in unique], [e[1] for e in unique], np.stack(cines))


def load_prepared_split(root: str | Path, split: str) -> CineSet:
    prepared = Prepared(root)
    idx = prepared.split_indices(split)
    if len(idx) == 0:
        raise ValueError(f"prepared dataset '{root}' has no subjects in split '{split}'")
    subjects = prepared.subject_ids(idx)
    cines = np.stack([np.asarray(prepared.cine[i]) for i in idx])
    masks = None if prepared.masks is None else np.stack([np.asarray(prepared.masks[i]) for i in idx])
    table = prepared.subjects.iloc[idx]
    gt = {}
    for col in GT_COLUMNS:
        if col in table.columns:
            values = table[col].to_numpy()
            try:
                gt[col] = values.astype(np.float64)
            except (TypeError, ValueError):
                gt[col] = values.astype(object)
    return CineSet(f"{root} (split {split})", subjects, [0] * len(subjects), cines, masks, gt, prepared)


def from_array(array, subjects: list[str] | None = None, samples: list[int] | None = None,
               source: str = "array") -> CineSet:
    """(N, 1, T, H, W) / (N, T, H, W) float in [-1, 1] or uint8 -> CineSet."""
    arr = np.asarray(array)
    if arr.ndim == 5:
        if arr.shape[1] != 1:
            raise ValueError(f"expected (N, 1, T, H, W), got {arr.shape}")
        arr = arr[:, 0]
    if arr.ndim != 4:
        raise ValueError(f"expected cines (N, 1, T, H, W) or (N, T, H, W), got {arr.shape}")
    cines = np.stack([to_uint8_cine(c, f"{source}[{i}]") for i, c in enumerate(arr)])
    n = len(cines)
    subjects = list(subjects) if subjects is not None else [f"video{i:05d}" for i in range(n)]
    if len(subjects) != n:
        raise ValueError(f"{n} cines but {len(subjects)} subject ids")
    return CineSet(source, subjects, list(samples) if samples is not None else [0] * n, cines)


def resolve_real(spec, data_root: str | Path) -> CineSet:
    """``split:<name>`` (prepared dataset at ``data_root``), a folder, a CineSet or an array."""
    if isinstance(spec, CineSet):
        return spec
    if not isinstance(spec, (str, Path)):
        return from_array(spec, source="real array")
    text = str(spec)
    if text.startswith("split:"):
        root = Path(data_root)
        if not (root / "meta.json").is_file():
            raise FileNotFoundError(f"'{root / 'meta.json'}' is missing: the prepared dataset is written by "
                                    f"prepare_data.py. Run it first (same config / run_dir).")
        return load_prepared_split(root, text.split(":", 1)[1])
    return load_folder(text, None, samples="first", written_by="you (a folder of real cines)")


def resolve_fake(spec, known_subjects: set[str] | None, samples: str) -> CineSet:
    if isinstance(spec, CineSet):
        return spec
    if not isinstance(spec, (str, Path)):
        return from_array(spec, source="generated array")
    return load_folder(spec, known_subjects, samples=samples)


@dataclass
class Pairing:
    real_index: np.ndarray            # (P,) index into the real set
    fake_index: np.ndarray            # (P,) index into the generated set
    unmatched_fake: list[str]
    unmatched_real: list[str]


def pair_by_subject(real: CineSet, fake: CineSet) -> Pairing:
    where = {}
    for i, s in enumerate(real.subjects):
        where.setdefault(s, i)
    r_idx, f_idx, unmatched = [], [], []
    for j, s in enumerate(fake.subjects):
        if s in where:
            r_idx.append(where[s])
            f_idx.append(j)
        else:
            unmatched.append(fake.keys[j])
    matched = {real.subjects[i] for i in r_idx}
    return Pairing(np.asarray(r_idx, dtype=np.int64), np.asarray(f_idx, dtype=np.int64), unmatched,
                   [s for s in real.subjects if s not in matched])
