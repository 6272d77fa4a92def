"""Stage 2: the anisotropic 3D-VAE, its PatchGAN, losses, and the cached latents + template.

    from ecgflowcmr.vae import VAE3D, load_vae
    vae = load_vae("runs/demo/vae/best.pt", device)      # eval mode
    posterior = vae.encode(x)      # x (B, 1, 50, 96, 96) in [-1, 1] -> DiagonalGaussian over (B, C, 50, 12, 12)
    x_hat = vae.decode(posterior.mode())                 # (B, 1, 50, 96, 96)
"""
from .discriminator import PatchDiscriminator3D
from .latents import compute_template, extract_all, extract_split
from .losses import MissingWeightsError, build_lpips
from .model import VAE3D, DiagonalGaussian, build_vae, load_vae

__all__ = ["VAE3D", "DiagonalGaussian", "build_vae", "load_vae", "PatchDiscriminator3D", "build_lpips",
           "MissingWeightsError", "extract_all", "extract_split", "compute_template"]
