"""The R-aligned median beat of every lead: what a linear reader of the ECG sees, and the ECG
morphology code that conditions the flow (``ecg/morphology.py``).

``median_beats``: for each record, the beats ``-250..+550 ms`` around its R-peaks (those with the whole
window inside the record), their sample-wise median per lead, averaged into 40 bins of 20 ms, each
lead's beat minus its first 20 ms (baseline), plus the heart rate from the median R-R:
``12 * 40 + 1 = 481`` numbers per record. No label enters them. One implementation for numpy callers
(``median_beat_features``, the ceiling readers) and torch callers (the flow's condition).
"""
from __future__ import annotations

import numpy as np
import torch

PRE_S, POST_S, POINTS = 0.25, 0.55, 40


def feature_count(leads: int = 12, points: int = POINTS) -> int:
    return leads * points + 1


def median_beats(ecg: torch.Tensor, rpeaks: list, fs: float = 500, pre_s: float = PRE_S, post_s: float = POST_S,
                 points: int = POINTS) -> torch.Tensor:
    """``ecg (B, leads, L)``, ``rpeaks``: per record, R-peak sample positions (any sequence; rounded)
    -> ``(B, leads * points + 1)`` in ``ecg``'s dtype: median beats, then heart rate (bpm; 0 with fewer
    than two R-peaks). Without a whole beat in the record, its beat is zeros."""
    b, leads, length = ecg.shape
    pre, post = int(round(pre_s * fs)), int(round(post_s * fs))
    width = pre + post
    usable = width - width % points
    base_n = max(1, int(0.02 * fs))
    offsets = torch.arange(-pre, post, device=ecg.device)
    out = ecg.new_zeros((b, leads * points + 1))
    for i in range(b):
        r = torch.as_tensor(np.sort(np.rint(np.asarray(rpeaks[i], dtype=np.float64))), dtype=torch.long)
        whole = r[(r - pre >= 0) & (r + post <= length)].to(ecg.device)
        if len(whole):
            beats = ecg[i][:, whole[:, None] + offsets[None]]                 # (leads, K, width)
            beat = torch.quantile(beats, 0.5, dim=1) if len(whole) > 1 else beats[:, 0]
            bins = beat[:, :usable].reshape(leads, points, -1).mean(-1)
            out[i, :-1] = (bins - beat[:, :base_n].mean(-1, keepdim=True)).reshape(-1)
        if len(r) > 1:
            out[i, -1] = 60.0 * fs / float(np.median(np.diff(r.numpy())))
    return out


def median_beat_features(ecg: np.ndarray, rpeaks: np.ndarray, fs: int = 500, pre_s: float = PRE_S,
                         post_s: float = POST_S, points: int = POINTS) -> np.ndarray:
    """One record: ``ecg (leads, T)`` mV, ``rpeaks`` sample indices -> ``(leads * points + 1,)`` float64
    (``median_beats`` of a batch of one)."""
    x = torch.from_numpy(np.asarray(ecg, dtype=np.float64))[None]
    return median_beats(x, [np.asarray(rpeaks)], fs, pre_s, post_s, points)[0].numpy()
