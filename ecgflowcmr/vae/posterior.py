"""The VAE posterior: one diagonal Gaussian, shared by this project's VAE and the published one."""
from __future__ import annotations

import torch


class DiagonalGaussian:
    """Diagonal Gaussian posterior ``q(z | x)``; ``mean``/``logvar`` are ``(B, C, T, h, w)``."""

    def __init__(self, moments: torch.Tensor):
        mean, logvar = torch.chunk(moments, 2, dim=1)
        self.mean = mean
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device,
                            dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) summed over all latent dimensions: ``(B,)`` in fp32."""
        mean, logvar = self.mean.float(), self.logvar.float()
        return 0.5 * torch.sum(mean.pow(2) + logvar.exp() - 1.0 - logvar, dim=[1, 2, 3, 4])
