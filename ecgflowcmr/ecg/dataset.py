"""Stage-1 items from the prepared dataset: the ECG and its phase labels at the encoder's resolution."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from ..data.datasets import Prepared
from ..data.phase import phase_from_rpeaks, phase_targets
from .pamae import STRIDE


def phase_labels(phase: np.ndarray, stride: int = STRIDE) -> np.ndarray:
    """(L,) phase in radians -> (L / stride, 2) float32 (sin, cos), averaged over each position's
    ``stride`` samples (a circular mean, so the wrap at an R-peak averages correctly)."""
    phase = np.asarray(phase)
    if phase.ndim != 1 or phase.shape[0] % stride:
        raise ValueError(f"phase must be 1-D with a length divisible by {stride}, got {phase.shape}")
    return phase_targets(phase).reshape(2, -1, stride).mean(axis=2).T.copy()


MAX_RPEAKS = 64             # R-peak slots per item: 10 s at 240 bpm (the detector's ceiling) is 40


class ECGPhaseDataset(Dataset):
    """Items ``{"index", "ecg" (12, L) float32 mV, "phase" (L / 8, 2) float32 (sin, cos),
    "rpeaks" (MAX_RPEAKS,) int64 padded with -1}`` of a split.

    ``exclude_subjects``: subject ids left out (the ECG-only pool drops the paired val/test subjects).
    Phase labels come from the prepared R-peaks (``rpeaks.npy``) through ``phase_from_rpeaks``,
    computed per item (cheap), so nothing of size N x L is held in memory.
    """

    def __init__(self, root, split: str = "train", exclude_subjects=()):
        self.prepared = Prepared(root)
        self.indices = self.prepared.split_indices(split)
        if exclude_subjects:
            excluded = set(exclude_subjects)
            ids = self.prepared.subject_ids()
            self.indices = np.asarray([i for i in self.indices if ids[i] not in excluded], dtype=np.int64)
        if len(self.indices) == 0:
            raise ValueError(f"split '{split}' of the prepared dataset '{root}' is empty")
        self.split = split

    def __len__(self) -> int:
        return len(self.indices)

    def rpeaks(self, i: int) -> np.ndarray:
        return self.prepared.rpeaks_of(int(self.indices[i]))

    def __getitem__(self, i: int) -> dict:
        idx = int(self.indices[i])
        ecg = np.array(self.prepared.ecg[idx], dtype=np.float32)
        phase = phase_from_rpeaks(self.prepared.rpeaks_of(idx), ecg.shape[-1])
        peaks = self.prepared.rpeaks_of(idx)[:MAX_RPEAKS]
        padded = np.full(MAX_RPEAKS, -1, dtype=np.int64)
        padded[:len(peaks)] = peaks
        return {"index": idx, "ecg": torch.from_numpy(ecg), "phase": torch.from_numpy(phase_labels(phase)),
                "rpeaks": torch.from_numpy(padded)}

    def training_sample(self, max_records: int = 256) -> np.ndarray:
        """Up to ``max_records`` ECGs (evenly spaced over the split) for the normaliser's lead scale."""
        pick = self.indices[np.linspace(0, len(self.indices) - 1, min(max_records, len(self.indices))).astype(int)]
        return np.stack([np.asarray(self.prepared.ecg[int(i)], dtype=np.float32) for i in pick])
