"""3D PatchGAN discriminator (pix2pix / taming NLayerDiscriminator lifted to 3D, anisotropic).

``(B, 1, T, H, W)`` -> patch logits ``(B, 1, T, H', W')``. Every layer has kernel ``(3, 4, 4)``:
space is halved ``disc_layers`` times (stride ``(1, 2, 2)``), time keeps its length, so each logit
judges a spatial patch over a few neighbouring frames (temporal flicker is penalised too).
GroupNorm instead of BatchNorm: the batch is small (1-4 videos per process) and GroupNorm keeps the
real and fake halves of one concatenated batch independent.
"""
from __future__ import annotations

import torch
from torch import nn

from .model import norm


class PatchDiscriminator3D(nn.Module):
    def __init__(self, in_channels: int = 1, channels: int = 64, layers: int = 3):
        super().__init__()
        k, p = (3, 4, 4), (1, 1, 1)
        seq: list[nn.Module] = [nn.Conv3d(in_channels, channels, k, (1, 2, 2), p), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, layers):
            prev, mult = mult, min(2 ** n, 8)
            seq += [nn.Conv3d(channels * prev, channels * mult, k, (1, 2, 2), p, bias=False),
                    norm(channels * mult), nn.LeakyReLU(0.2, True)]
        prev, mult = mult, min(2 ** layers, 8)
        seq += [nn.Conv3d(channels * prev, channels * mult, k, 1, p, bias=False),
                norm(channels * mult), nn.LeakyReLU(0.2, True),
                nn.Conv3d(channels * mult, 1, k, 1, p)]
        self.net = nn.Sequential(*seq)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Conv3d):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.GroupNorm):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @classmethod
    def from_config(cls, vae_cfg) -> PatchDiscriminator3D:
        get = (lambda k: vae_cfg[k]) if isinstance(vae_cfg, dict) else (lambda k: getattr(vae_cfg, k))
        return cls(1, get("disc_channels"), get("disc_layers"))
