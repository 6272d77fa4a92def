"""The ECG-predicted anchor: a light head that regresses the (normalised) latent video from the ECG.

With ``flow.anchor=ecg`` the flow starts from ``z0 = head(ECG) + alpha * eps`` instead of
``template + alpha * eps``, so it only models the residual: the anatomy no ECG reveals. The head
alone, decoded, is the deterministic "cross-modal autoencoder" baseline of the paper (Table 1):
the conditional mean of the cine given the ECG.

Layout: ``head = template + static(pooled) + motion(tokens)``

* ``static``: a linear map of the pooled ECG vector to one ``(C, h, w)`` frame, added to all
  frames (size and shape that the ECG tells, e.g. a dilated heart from a wide QRS);
* ``motion``: the 50 ECG tokens are phase-aligned to the 50 frames (stage 1), so frame ``t``
  is read from token ``t``: a circular temporal convolution (the cycle wraps) over the tokens,
  then a per-frame MLP to ``(C, h, w)``.

Both output layers start at zero: an untrained head *is* the template anchor.

``flow.anchor_fit=ridge`` replaces the head by ``RidgeAnchor``: the whole latent video as a linear function of
the pooled condition, fitted in closed form.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..metrics.linear import Standardiser


class AnchorHead(nn.Module):
    """``(ecg_tokens (B, S, E), ecg_pooled (B, P))`` -> normalised latent video ``(B, C, T, h, w)``
    (``P = pooled_dim``, default ``E``).

    ``template``: the normalised template ``(C, 1, h, w)`` (or ``(C, T, h, w)``), a fixed buffer.
    """

    def __init__(self, template: torch.Tensor, ecg_dim: int, num_frames: int, hidden: int = 128,
                 kernel: int = 5, pooled_dim: int | None = None):
        super().__init__()
        pooled_dim = int(pooled_dim or ecg_dim)
        c, _, h, w = template.shape
        self.arch = {"ecg_dim": int(ecg_dim), "num_frames": int(num_frames), "hidden": int(hidden),
                     "kernel": int(kernel), "template_shape": [int(s) for s in template.shape],
                     "pooled_dim": pooled_dim}
        self.latent = (int(c), int(h), int(w))
        self.num_frames = int(num_frames)
        self.register_buffer("template", template.detach().float().clone())
        self.static = nn.Linear(pooled_dim, c * h * w)
        self.temporal = nn.Conv1d(ecg_dim + pooled_dim, hidden, kernel, padding=kernel // 2, padding_mode="circular")
        self.frame_mlp = nn.Sequential(nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, c * h * w))
        for layer in (self.static, self.frame_mlp[-1]):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @classmethod
    def from_arch(cls, arch: dict) -> AnchorHead:
        template = torch.zeros(arch["template_shape"])     # the buffer comes with the state dict
        return cls(template, arch["ecg_dim"], arch["num_frames"], arch["hidden"], arch["kernel"],
                   arch.get("pooled_dim"))

    def forward(self, ecg_tokens: torch.Tensor, ecg_pooled: torch.Tensor) -> torch.Tensor:
        b, s, _ = ecg_tokens.shape
        c, h, w = self.latent
        tokens = ecg_tokens.float()
        if s != self.num_frames:                            # tokens are frame-aligned by contract; resample otherwise
            tokens = F.interpolate(tokens.transpose(1, 2), size=self.num_frames, mode="linear",
                                   align_corners=False).transpose(1, 2)
        pooled = ecg_pooled.float()
        features = torch.cat([tokens, pooled[:, None].expand(-1, self.num_frames, -1)], dim=-1)   # (B, T, E + P)
        hidden = self.temporal(features.transpose(1, 2)).transpose(1, 2)                        # (B, T, hidden)
        motion = self.frame_mlp(hidden).view(b, self.num_frames, c, h, w).transpose(1, 2)      # (B, C, T, h, w)
        static = self.static(pooled).view(b, c, 1, h, w)
        return self.template.unsqueeze(0) + static + motion


class RidgeAnchor(nn.Module):
    """``(ecg_tokens, ecg_pooled (B, P))`` -> ``mean + standardised(pooled) @ weight``: the linear
    conditional mean of the whole normalised latent video ``(B, C, T, h, w)`` given the pooled condition,
    fitted in closed form (``fit``). Where gradient steps on a few hundred subjects overfit within 50
    steps, ridge regression has one knob per latent value (its L2 strength, by leave-one-out) and no
    stopping time. Its intercept is the training split's mean latent video (motion included), so at
    infinite L2 strength it is the mean heart, beating.
    """

    def __init__(self, latent_shape: tuple[int, int, int, int], pooled_dim: int):
        super().__init__()
        self.arch = {"kind": "ridge", "latent_shape": [int(s) for s in latent_shape], "pooled_dim": int(pooled_dim)}
        self.latent = tuple(int(s) for s in latent_shape)
        size = int(np.prod(self.latent))
        self.register_buffer("x_mean", torch.zeros(pooled_dim))
        self.register_buffer("x_sd", torch.ones(pooled_dim))
        self.register_buffer("weight", torch.zeros(pooled_dim, size))
        self.register_buffer("bias", torch.zeros(size))

    @classmethod
    def from_arch(cls, arch: dict) -> RidgeAnchor:
        return cls(tuple(arch["latent_shape"]), arch["pooled_dim"])

    def forward(self, ecg_tokens: torch.Tensor, ecg_pooled: torch.Tensor) -> torch.Tensor:
        x = (ecg_pooled.float() - self.x_mean) / self.x_sd
        return (x @ self.weight + self.bias).view(-1, *self.latent)

    @torch.no_grad()
    def fit(self, x: torch.Tensor, y: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor,
            lambdas: tuple[float, ...], val_loss) -> dict:
        """Ridge on ``x (N, P)`` -> ``y (N, C, T, h, w)``, each latent value with its own L2 strength
        ``lam * N * |w|^2`` from ``lambdas``: the one of least leave-one-out error on the training rows
        (closed form, ``e_i / (1 - h_ii)``; the centring is not left out). One shared strength would be
        set by the many values the ECG does not predict (the anatomy) and shrink the few it does.
        Scored on the validation rows with ``val_loss(pred, y_val) -> (N_val,)``. Returns
        ``{"anchor_lambda_counts", "anchor_val", "anchor_val_mean_video"}``."""
        x, y = x.double(), y.double().flatten(1)
        n = len(x)
        st = Standardiser(x.cpu().numpy())
        mean, sd = torch.from_numpy(st.mean), torch.from_numpy(st.sd)
        u, s, vh = torch.linalg.svd((x - mean) / sd, full_matrices=False)
        y_mean = y.mean(0)
        yc = y - y_mean
        uty = u.T @ yc                                                    # (r, D)
        best_err = torch.full((y.shape[1],), float("inf"), dtype=torch.float64)
        choice = torch.zeros(y.shape[1], dtype=torch.long)
        for i, lam in enumerate(lambdas):
            loo = ridge_loo_mse(u, s, yc, lam * n)
            better = loo < best_err
            best_err, choice = torch.where(better, loo, best_err), torch.where(better, i, choice)
        weight = torch.zeros(x.shape[1], y.shape[1], dtype=torch.float64)
        for i, lam in enumerate(lambdas):
            cols = choice == i
            weight[:, cols] = vh.T @ ((s / (s * s + lam * n))[:, None] * uty[:, cols])
        self.x_mean, self.x_sd = mean.float(), sd.float()
        self.weight, self.bias = weight.float(), y_mean.float()
        mean_video = y_mean.float().expand(len(x_val), -1).view(-1, *self.latent)
        return {"anchor_lambda_counts": {float(lam): int((choice == i).sum()) for i, lam in enumerate(lambdas)},
                "anchor_val": float(val_loss(self(None, x_val.float()), y_val.float()).mean()),
                "anchor_val_mean_video": float(val_loss(mean_video, y_val.float()).mean())}


def ridge_loo_mse(u: torch.Tensor, s: torch.Tensor, yc: torch.Tensor, penalty: float) -> torch.Tensor:
    """Leave-one-out MSE per column of ridge regression of ``yc (N, D)`` on ``X = u diag(s) vh`` (thin SVD)
    with ``penalty * |w|^2``: ``mean_i (e_i / (1 - h_ii))^2``, ``e`` the residuals and ``h`` the hat matrix's
    diagonal, the exact leave-one-out error of a linear smoother. ``(D,)``."""
    shrink = s * s / (s * s + penalty)                                    # (r,)
    leverage = (u * u) @ shrink                                           # (N,)
    residual = yc - u @ (shrink[:, None] * (u.T @ yc))
    return (residual / (1 - leverage)[:, None]).pow(2).mean(0)


# Either anchor: both map (ecg_tokens, ecg_pooled) to the normalised latent video and are frozen while the flow trains.
ECGAnchor = AnchorHead | RidgeAnchor


def anchor_from_arch(arch: dict) -> ECGAnchor:
    """The anchor a flow checkpoint describes: ``RidgeAnchor`` (``kind`` ridge) or ``AnchorHead``."""
    return RidgeAnchor.from_arch(arch) if arch.get("kind") == "ridge" else AnchorHead.from_arch(arch)
