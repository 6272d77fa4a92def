"""Nearest-neighbour retrieval in the stage-1 ECG feature space: the "just re-use a real cine"
control of generation (benchmarks, synthetic pretraining)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def pooled_features(gen, ecg, batch: int = 16) -> torch.Tensor:
    """Unit-norm pooled stage-1 features ``(N, D)`` of ``ecg`` (an ``(N, 12, 5000)`` array or
    memmap, read ``batch`` rows at a time) through the encoder of ``gen`` (an ``ECGToCine``)."""
    feats = []
    for i in range(0, len(ecg), batch):
        rows = torch.from_numpy(np.array(ecg[i:i + batch], dtype=np.float32))
        feats.append(F.normalize(gen.encode(rows).pooled.float().cpu(), dim=-1))
    return torch.cat(feats) if feats else torch.zeros(0, 0)


def nearest_rows(query_feats: torch.Tensor, bank_feats: torch.Tensor) -> np.ndarray:
    """For each query row, the bank row of highest cosine similarity (unit-norm features): ``(Nq,)``."""
    return (query_feats @ bank_feats.T).argmax(dim=1).numpy()
