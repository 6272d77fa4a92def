"""Paired fidelity: PSNR and SSIM per frame (generated vs real of the same subject).

Both work on cines in [-1, 1] with ``data_range = 2`` (identical to [0, 1] with range 1).
PSNR per frame: ``10 log10(range^2 / MSE)``, capped at ``PSNR_CAP_DB`` for identical frames (MSE 0).
SSIM per frame: Wang et al. 2004, Gaussian window 11 x 11, sigma 1.5, K1 = 0.01, K2 = 0.03,
computed on the valid region (no padding), mean over the SSIM map, as in Wang et al.'s reference
code and scikit-image. (torchmetrics >= 1 averages its map over a reflect-padded full image instead;
its map equals this one on the valid interior; the tests check that.) A video's score is the
mean over its frames; the set's score the mean over videos.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

DATA_RANGE = 2.0          # cines in [-1, 1]
PSNR_CAP_DB = 100.0       # reported for frames with MSE == 0


def _as_frames(x) -> torch.Tensor:
    """(..., H, W) array or tensor -> float64 (N, 1, H, W)."""
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    t = t.to(torch.float64)
    if t.dim() < 2:
        raise ValueError(f"expected frames (..., H, W), got shape {tuple(t.shape)}")
    return t.reshape(-1, 1, t.shape[-2], t.shape[-1])


def psnr_frames(pred, target, data_range: float = DATA_RANGE) -> np.ndarray:
    """PSNR (dB) of each frame; pred/target (..., H, W) of one shape."""
    p, t = _as_frames(pred), _as_frames(target)
    if p.shape != t.shape:
        raise ValueError(f"PSNR needs inputs of one shape, got {tuple(p.shape)} and {tuple(t.shape)}")
    mse = ((p - t) ** 2).mean(dim=(1, 2, 3))
    with np.errstate(divide="ignore"):
        out = 10.0 * np.log10(data_range ** 2 / mse.numpy())
    return np.minimum(out, PSNR_CAP_DB)


def _gaussian_1d(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    g = torch.exp(-(coords ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def _filter(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Valid 2D Gaussian filtering as two 1D passes (the 2D window is separable)."""
    k = g.numel()
    x = F.conv2d(x, g.view(1, 1, k, 1))
    return F.conv2d(x, g.view(1, 1, 1, k))


def ssim_frames(pred, target, data_range: float = DATA_RANGE, window: int = 11, sigma: float = 1.5,
                k1: float = 0.01, k2: float = 0.03) -> np.ndarray:
    """SSIM of each frame (mean of the valid-region SSIM map); pred/target (..., H, W)."""
    p, t = _as_frames(pred), _as_frames(target)
    if p.shape != t.shape:
        raise ValueError(f"SSIM needs inputs of one shape, got {tuple(p.shape)} and {tuple(t.shape)}")
    if min(p.shape[-2:]) < window:
        raise ValueError(f"frames of {tuple(p.shape[-2:])} are smaller than the {window} x {window} SSIM window")
    g = _gaussian_1d(window, sigma)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    n = p.shape[0]
    stats = _filter(torch.cat([p, t, p * p, t * t, p * t]), g)
    mu_p, mu_t, e_pp, e_tt, e_pt = stats.split(n)
    var_p, var_t, cov = e_pp - mu_p ** 2, e_tt - mu_t ** 2, e_pt - mu_p * mu_t
    ssim_map = ((2 * mu_p * mu_t + c1) * (2 * cov + c2)) / ((mu_p ** 2 + mu_t ** 2 + c1) * (var_p + var_t + c2))
    return ssim_map.mean(dim=(1, 2, 3)).numpy()


def psnr(pred, target, data_range: float = DATA_RANGE) -> float:
    """Mean per-frame PSNR (dB)."""
    return float(np.mean(psnr_frames(pred, target, data_range)))


def ssim(pred, target, data_range: float = DATA_RANGE) -> float:
    """Mean per-frame SSIM."""
    return float(np.mean(ssim_frames(pred, target, data_range)))
