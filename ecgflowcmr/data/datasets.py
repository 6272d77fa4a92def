"""The prepared dataset (written by ``prepare_data.py``) and torch Datasets over it.

Folder layout (the contract between preparation and stages 1-3)::

    <root>/ecg.npy        float32 (N, 12, 5000)   mV, lead order I II III aVR aVL aVF V1-V6, 500 Hz
    <root>/cine.npy       uint8   (N, 50, 96, 96)  cine in [-1, 1] stored as round((x + 1) * 127.5)
    <root>/masks.npy      uint8   (N, 50, 96, 96)  labels 0 bg, 1 LV, 2 RV, 3 LA, 4 RA, 5 myo (optional)
    <root>/rpeaks.npy     int32   (N, MAX_R)       R-peak sample indices, padded with -1
    <root>/subjects.csv   one row per kept subject, in array order: index, subject_id, split, labels...
    <root>/splits.json    {"train": [subject_id, ...], "val": [...], "test": [...]}
    <root>/qc_report.csv  subject_id, file, reason for every rejected record
    <root>/meta.json      {"n": N, "ecg_fs": 500, "num_frames": 50, "image_size": 96, "complete": true}
    <root>/qc_warnings.csv  subject_id, warning (kept records that needed a repair, e.g. derived leads)
    <root>/provenance.csv   index, subject_id, manifest_row, source files, crop box, R-peak count/HR,
                            how the R-peaks were found (rpeak_lead: the lead they sit on, rpeak_voters,
                            rpeak_detectors, rpeak_runs, rpeak_min_votes; see data.phase.detect_rpeaks)
    <root>/config.yaml      the resolved config of the prepare_data.py run

Arrays are opened with ``np.load(mmap_mode="r")``: nothing reads the whole dataset into RAM.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..contract import LEADS  # noqa: F401  (re-exported: the lead order of ecg.npy)

MASK_LABELS = {0: "background", 1: "LV", 2: "RV", 3: "LA", 4: "RA", 5: "myocardium"}
SPLITS = ("train", "val", "test")


def cine_to_uint8(cine: np.ndarray) -> np.ndarray:
    """[-1, 1] float -> uint8 with round((x + 1) * 127.5)."""
    return np.clip(np.rint((np.asarray(cine, dtype=np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def cine_from_uint8(cine: np.ndarray | torch.Tensor):
    """uint8 -> float32 in [-1, 1] (numpy or torch, same type out)."""
    if isinstance(cine, torch.Tensor):
        return cine.float() / 127.5 - 1.0
    return np.asarray(cine, dtype=np.float32) / 127.5 - 1.0


class MemmapPickling:
    """Pickles its memory-mapped arrays (the attributes named in ``_memmaps``) as their file names
    and reopens them read-only when unpickled. DataLoader workers under spawn/forkserver (Linux's
    default start method from Python 3.14) receive the dataset pickled: a memmap pickles as a full
    in-memory copy, so every worker would otherwise hold the whole array."""

    _memmaps: tuple[str, ...] = ()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for name in self._memmaps:
            array = state.get(name)
            if isinstance(array, np.memmap) and array.filename is not None:
                state[name] = ("memmap", str(array.filename), tuple(array.shape))
        return state

    def __setstate__(self, state: dict) -> None:
        for name in self._memmaps:
            value = state.get(name)
            if isinstance(value, tuple) and len(value) == 3 and value[0] == "memmap":
                array = np.load(value[1], mmap_mode="r")
                if tuple(array.shape) != value[2]:
                    raise RuntimeError(f"'{value[1]}' changed shape since it was opened: "
                                       f"{value[2]} -> {tuple(array.shape)}")
                state[name] = array
        self.__dict__.update(state)


class Prepared(MemmapPickling):
    """Read-only view of a prepared dataset folder (memory-mapped)."""

    _memmaps = ("ecg", "cine", "rpeaks", "masks")

    def __init__(self, root: str | Path):
        self.root = Path(root)
        meta = self.root / "meta.json"
        if not meta.is_file():
            raise FileNotFoundError(f"'{meta}' is missing: '{self.root}' is not a prepared dataset. "
                                    f"Run prepare_data.py first.")
        self.meta = json.loads(meta.read_text())
        if not self.meta.get("complete", False):
            raise RuntimeError(f"prepared dataset '{self.root}' is incomplete; re-run prepare_data.py")
        import pandas as pd

        self.subjects = pd.read_csv(self.root / "subjects.csv", dtype={"subject_id": str})
        self.ecg = np.load(self.root / "ecg.npy", mmap_mode="r")
        # ECG-only records (stage 1's unpaired pool, see prepare.prepare_ecg_only) have no cine
        self.cine = None if self.meta.get("ecg_only") else np.load(self.root / "cine.npy", mmap_mode="r")
        self.rpeaks = np.load(self.root / "rpeaks.npy", mmap_mode="r")
        masks = self.root / "masks.npy"
        self.masks = np.load(masks, mmap_mode="r") if masks.is_file() else None

    def __len__(self) -> int:
        return len(self.subjects)

    def split_indices(self, split: str) -> np.ndarray:
        """Array indices of a split (in array order), or all rows for split='all'."""
        if split == "all":
            return np.arange(len(self.subjects))
        if split not in SPLITS:
            raise ValueError(f"unknown split '{split}' (use one of {SPLITS} or 'all')")
        return np.flatnonzero(self.subjects["split"].to_numpy() == split)

    def subject_ids(self, indices=None) -> list[str]:
        ids = self.subjects["subject_id"].astype(str).tolist()
        return ids if indices is None else [ids[i] for i in indices]

    def rpeaks_of(self, index: int) -> np.ndarray:
        row = np.asarray(self.rpeaks[index])
        return row[row >= 0].astype(np.int64)


class PreparedDataset(Dataset):
    """Items of one split as tensors: ``{"index", "ecg" (12, 5000), "cine" (1, 50, 96, 96) in [-1, 1],
    "mask" (50, 96, 96) int64 if present}``. ``fields`` limits what is read."""

    def __init__(self, root: str | Path, split: str = "train", fields=("ecg", "cine")):
        self.prepared = Prepared(root)
        self.indices = self.prepared.split_indices(split)
        self.fields = tuple(fields)
        if "mask" in self.fields and self.prepared.masks is None:
            raise FileNotFoundError(f"'{self.prepared.root}/masks.npy' is missing (no masks prepared)")

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        idx = int(self.indices[i])
        p = self.prepared
        item = {"index": idx}
        if "ecg" in self.fields:
            item["ecg"] = torch.from_numpy(np.array(p.ecg[idx], dtype=np.float32))
        if "cine" in self.fields:
            item["cine"] = cine_from_uint8(torch.from_numpy(np.array(p.cine[idx])))[None]
        if "mask" in self.fields:
            item["mask"] = torch.from_numpy(np.array(p.masks[idx], dtype=np.int64))
        return item
