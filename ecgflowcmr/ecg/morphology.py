"""The ECG's morphology as a condition: the median beat of every lead, compressed to a few numbers.

Stage 1's tokens keep the cycle's timing but lose most of what the ECG says about the heart's size and
pump: on phantom version 2 a linear probe of them separates EF < 40 % with AUC 0.55-0.60, a linear
reader of the raw median beats with 0.87 (docs/phantom_bench.md). ``flow.morphology_dims = k`` appends
``k`` numbers read from the raw ECG to the pooled condition the DiT and the anchor head see:

* ``data.beats.median_beats`` at the R-peaks stage 1 found (its phase wraps: the same rule in training
  and generation, no second detector): 12 leads x 40 bins + heart rate;
* ``MorphologyCode``: standardised with the training split's means and SDs, projected on ``k`` axes and
  scaled to unit variance. ``flow.morphology_code`` picks the axes, both fitted on the training split alone,
  no label; a few numbers, not 481, because a few hundred subjects train the flow:
  - ``pca``: the features' first ``k`` principal components (PCA whitening, the ECG alone);
  - ``latent`` (``fit_latent_code``): the ``k`` directions of the training cines' latents that the ECG
    predicts best (reduced-rank ridge regression of the latent video on the features). The PCA code spreads
    what the ECG says about the heart over many axes mixed with what it does not; this one keeps only the
    predictable part (``latent_motion``: the same on each latent minus its mean over frames, the part
    that moves). Its training rows get out-of-fold values (each subject's code from a fit without it),
    so the flow learns the heart given a code as noisy as a new subject's, not an in-sample fit that
    already knows the heart.
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


def ridge_multi(x: torch.Tensor, y: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """Weights ``(..., F, P)`` of ridge regression of centred ``y (N, P)`` on centred ``x (N, F)``, output
    column ``j`` with ``penalty[..., j] * |w_j|^2`` (``penalty (..., P)``: a leading axis fits several
    strengths; one thin SVD for all of them)."""
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    return vh.T @ ((s[:, None] / (s[:, None] ** 2 + penalty[..., None, :])) * (u.T @ y))


LATENT_LAMBDAS = (0.1, 1.0, 10.0, 100.0, 1000.0, 1e5)
LATENT_TARGETS = 64          # principal components of the latent video the features are regressed on
PCA_ROWS = 4096              # their axes from at most this many training rows (a cohort of 40k: 4.6 GB of latents)


def latent_targets(latents: torch.Tensor, kind: str) -> torch.Tensor:
    """Normalised latent videos ``(N, C, T, h, w)`` -> what the ``kind`` code is fitted to, ``(N, D)``:
    ``latent`` the videos, ``latent_motion`` each minus its mean over frames (what moves, where EF lives)."""
    if kind == "latent_motion":
        latents = latents - latents.mean(2, keepdim=True)
    return latents.flatten(1)


def fit_latent_code(features: np.ndarray | torch.Tensor, latents: np.ndarray | torch.Tensor, dims: int,
                    folds: int = 5, seed: int = 0) -> tuple[MorphologyCode, np.ndarray, dict]:
    """The ``dims`` directions of the latent video the ECG predicts best, from training rows alone.

    ``features (N, F)``, ``latents (N, D)`` (flattened normalised latent videos). Steps: the latents'
    first ``P = min(64, N - 1)`` principal-component scores ``T (N, P)`` (axes from at most ``PCA_ROWS``
    rows); ridge of each column of ``T`` on
    the standardised features, each with its own L2 strength ``lam * N`` from ``LATENT_LAMBDAS`` by
    ``folds``-fold cross-validated error (a component the ECG does not predict tends to get a strong one and
    small fitted values, though the choice among near-equal errors is noisy; one shared strength would be set
    by the many such components); the top
    ``dims`` right singular vectors ``R (P, dims)`` of the fitted scores (reduced-rank regression); code =
    fitted scores on ``R``, divided by their SD. Returns ``(code, out_of_fold (N, dims), summary)``:
    ``out_of_fold[i]`` is row ``i``'s code from the ridge fitted on the other folds (its standardiser
    too), on the same axes ``R`` and scale (the axes see every row's latents: ``dims`` directions chosen
    out of ``P``, a small leak, kept so that every fold's codes share one coordinate system).
    """
    x = torch.as_tensor(np.asarray(features), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(latents), dtype=torch.float32).flatten(1)
    n, f = x.shape
    p = min(LATENT_TARGETS, n - 1, y.shape[1])
    if len(y) != n:
        raise ValueError(f"{n} feature rows but {len(y)} latent rows")
    if not 0 < dims <= p or n < 2 * folds:
        raise ValueError(f"a latent code of {dims} dims needs more training ECGs than dims (have {n}; at most "
                         f"{p} dims) and at least {2 * folds} rows for its {folds}-fold fit")
    rng = np.random.default_rng(seed)
    y_mean = y.double().mean(0)
    some = torch.from_numpy(np.sort(rng.permutation(n)[:PCA_ROWS]))     # the axes of at most PCA_ROWS rows
    _, _, vh = torch.linalg.svd(y[some].double() - y_mean, full_matrices=False)
    t = torch.cat([(y[lo:lo + 1024].double() - y_mean) @ vh[:p].T for lo in range(0, n, 1024)])  # (N, P) scores
    parts = np.array_split(rng.permutation(n), folds)

    def standardiser(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        st = Standardiser(x[rows].numpy())
        return torch.from_numpy(st.mean), torch.from_numpy(st.sd)

    # each row's ECG term (L, N, P) for every strength, from the fit without its fold, and that fit's intercept
    grid = torch.tensor(LATENT_LAMBDAS, dtype=torch.float64)
    terms, intercept = torch.empty(len(grid), n, p, dtype=torch.float64), torch.empty_like(t)
    for test in parts:
        train, test = torch.from_numpy(np.setdiff1d(np.arange(n), test)), torch.from_numpy(test)
        mean, sd = standardiser(train)
        w = ridge_multi((x[train] - mean) / sd, t[train] - t[train].mean(0), grid[:, None].expand(-1, p) * len(train))
        terms[:, test], intercept[test] = ((x[test] - mean) / sd) @ w, t[train].mean(0)
    errors = (terms + intercept - t).pow(2).mean(1)                      # (L, P)
    choice = errors.argmin(0)
    lam = grid[choice]                                                   # (P,) one strength per component
    mean, sd = standardiser(torch.arange(n))
    w = ridge_multi((x - mean) / sd, t - t.mean(0), lam * n)
    fitted = ((x - mean) / sd) @ w                                       # (N, P), zero mean
    _, s, rh = torch.linalg.svd(fitted, full_matrices=False)
    axes = rh[:dims].T                                                   # (P, dims)
    axes = axes * torch.sign(axes[axes.abs().argmax(0), torch.arange(dims)])
    scale = (s[:dims] / np.sqrt(n)).clamp_min(1e-12)                     # SD of each in-sample code column
    code = MorphologyCode(f, dims)
    code.mean, code.sd, code.basis = mean, sd, (w @ axes) / scale
    oof_term = terms.gather(0, choice.expand(1, n, p))[0]                # (N, P) at each component's strength
    oof = (oof_term @ axes / scale).numpy()          # the code has no intercept: the ECG's term alone
    best = errors.min(0).values
    summary = {"lambda_counts": {float(v): int((lam == v).sum()) for v in grid},
               "oof_error": float(best.sum()), "total_error": float(t.pow(2).mean(0).sum()),
               "explained": [float(v) for v in 1 - best / t.pow(2).mean(0)],
               "oof_code_sd": [float(v) for v in oof.std(0)]}
    return code, oof, summary


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
def training_features(encoder: nn.Module, ecg_array, rows: np.ndarray, device: torch.device,
                      batch_size: int = 32) -> torch.Tensor:
    """Median-beat features ``(len(rows), 481)`` of the ECGs ``ecg_array[rows]`` at ``encoder``'s R-peaks."""
    feats = []
    for lo in range(0, len(rows), batch_size):
        ecg = torch.from_numpy(np.stack([np.asarray(ecg_array[int(i)], dtype=np.float32)
                                         for i in rows[lo:lo + batch_size]]))
        feats.append(beat_features(encoder, ecg.to(device)))
    return torch.cat(feats) if feats else torch.zeros(0, feature_count())
