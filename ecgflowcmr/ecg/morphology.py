"""The ECG's morphology as a condition: the median beat of every lead, compressed to a few numbers.

Stage 1's tokens keep the cycle's timing but lose most of what the ECG says about the heart's size and
pump: on phantom version 2 a linear probe of them separates EF < 40 % with AUC 0.55-0.60, a linear
reader of the raw median beats with 0.87 (docs/phantom_bench.md). ``flow.morphology_dims = k`` appends
``k`` numbers read from the raw ECG to the pooled condition the DiT and the anchor head see:

* ``data.beats.median_beats`` at the R-peaks stage 1 found (its phase wraps: the same rule in training
  and generation, no second detector): 12 leads x 40 bins + heart rate;
* ``MorphologyCode``: standardised with the training split's means and SDs, projected on its first ``k``
  principal components and scaled to unit variance (PCA whitening). Fitted on the training ECGs
  alone, no label; a few components, not 481 raw numbers, because a few hundred subjects train the flow.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn as nn

from ..data.beats import feature_count, median_beats
from ..metrics.linear import Standardiser
from .cycles import CycleOutput

FS = 500


def wrap_peaks(out: CycleOutput) -> list[np.ndarray]:
    """The R-peaks stage 1 found in each record (its phase wraps), sample positions."""
    if out.wraps is None:
        raise ValueError("ECG morphology needs the R-peaks of a phase-aware encoder (ecg.cycle_mode median or "
                         "first); this encoder cuts fixed windows (cycle_mode window)")
    times, valid = out.wraps.times.detach().cpu().double(), out.wraps.valid.detach().cpu()
    return [row[ok].numpy() for row, ok in zip(times, valid)]


class MorphologyCode(nn.Module):
    """Median-beat features ``(B, F)`` -> whitened principal-component scores ``(B, k)``.

    Buffers: ``mean``, ``sd`` ``(F,)`` (training columns; constant columns sd 1) and ``basis (F, k)``
    (principal axes divided by their SD: the training scores have zero mean and unit variance).
    """

    def __init__(self, n_features: int, dims: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_features, dtype=torch.float64))
        self.register_buffer("sd", torch.ones(n_features, dtype=torch.float64))
        self.register_buffer("basis", torch.zeros(n_features, dims, dtype=torch.float64))

    @property
    def dims(self) -> int:
        return int(self.basis.shape[1])

    @classmethod
    def fit(cls, features: np.ndarray | torch.Tensor, dims: int) -> MorphologyCode:
        """PCA whitening fitted on training rows ``(N, F)``; needs ``N > dims``."""
        x = torch.as_tensor(np.asarray(features), dtype=torch.float64)
        n, f = x.shape
        if not 0 < dims < n or dims > f:
            raise ValueError(f"a morphology code of {dims} dims needs more training ECGs than dims "
                             f"(have {n}) and at most {f} dims")
        code = cls(f, dims)
        st = Standardiser(x.cpu().numpy())
        code.mean, code.sd = torch.from_numpy(st.mean), torch.from_numpy(st.sd)
        _, s, vh = torch.linalg.svd((x - code.mean) / code.sd, full_matrices=False)
        sv = s[:dims] / np.sqrt(n)                       # SD of each component's scores
        axes = vh[:dims].T
        axes = axes * torch.sign(axes[axes.abs().argmax(0), torch.arange(dims)])   # fixed sign per axis
        code.basis = axes / sv.clamp_min(1e-12)
        return code

    @classmethod
    def from_state(cls, state: dict) -> MorphologyCode:
        f, k = state["basis"].shape
        code = cls(int(f), int(k))
        code.load_state_dict(state)
        return code

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = (features.to(self.mean.dtype) - self.mean) / self.sd
        return (x @ self.basis).to(features.dtype if features.is_floating_point() else torch.float32)


def beat_features(encoder: nn.Module, ecg: torch.Tensor, out: CycleOutput | None = None) -> torch.Tensor:
    """``ecg (B, 12, L)`` -> median-beat features ``(B, 481)`` (float32) at the encoder's R-peaks."""
    if out is None:
        out = encoder(ecg)
    return median_beats(ecg.detach().float().cpu().double(), wrap_peaks(out), FS).float()


class MorphologyEncoder(nn.Module):
    """A stage-1 encoder whose pooled output carries the morphology code: ``pooled (B, E + k)``.

    Tokens, phase and cycle are the encoder's own; ``dim`` stays the token width ``E``,
    ``pooled_dim = E + k``.
    """

    def __init__(self, encoder: nn.Module, code: MorphologyCode):
        super().__init__()
        self.encoder, self.code = encoder, code
        self.dim = int(encoder.dim)
        self.pooled_dim = self.dim + code.dims
        self.num_tokens = int(getattr(encoder, "num_tokens", 50))
        self.cycle_mode = getattr(encoder, "cycle_mode", None)

    def forward(self, ecg: torch.Tensor) -> CycleOutput:
        out = self.encoder(ecg)
        morph = self.code(beat_features(self.encoder, ecg, out).to(out.pooled.device))
        return dataclasses.replace(out, pooled=torch.cat([out.pooled, morph.to(out.pooled.dtype)], dim=-1))


@torch.no_grad()
def fit_morphology(encoder: nn.Module, ecg_array, rows: np.ndarray, dims: int, device: torch.device,
                   batch_size: int = 32) -> MorphologyCode:
    """The code fitted on the ECGs ``ecg_array[rows]`` (the training split) read by ``encoder``."""
    feats = []
    for lo in range(0, len(rows), batch_size):
        ecg = torch.from_numpy(np.stack([np.asarray(ecg_array[int(i)], dtype=np.float32)
                                         for i in rows[lo:lo + batch_size]]))
        feats.append(beat_features(encoder, ecg.to(device)))
    feats = torch.cat(feats) if feats else torch.zeros(0, feature_count())
    return MorphologyCode.fit(feats, dims)
