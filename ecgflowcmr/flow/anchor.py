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
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


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
