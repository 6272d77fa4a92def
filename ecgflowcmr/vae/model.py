"""Anisotropic 3D-VAE: 8x spatial, 1x temporal compression of a cine.

``(B, 1, 50, 96, 96)`` in [-1, 1]  --encode-->  ``DiagonalGaussian`` over ``(B, C, 50, 12, 12)``
``(B, C, 50, 12, 12)``             --decode-->  ``(B, 1, 50, 96, 96)``

Design choices (and why):

* Residual blocks ``GroupNorm -> SiLU -> Conv3d`` (x2) as in the Stable-Diffusion / taming VAE,
  lifted to 3D. Convolution kernels are ``(3, 3, 3)`` at the ``vae.temporal_levels`` coarsest
  resolution levels (all 4 in ``ukb.yaml``) and ``(1, 3, 3)`` at finer ones, where a temporal tap
  costs the most; the demo keeps 3x3x3 only at the 12 x 12 level (plus temporal attention).
* ``len(channel_mult)`` levels give ``2**(levels-1)`` of the 8x; the rest is a pixel-unshuffle
  ("patch") of ``8 / 2**(levels-1)`` before the first conv (and a pixel shuffle after the last):
  4 levels = no patching (the paper's layout), 3 levels = 2 x 2 patches, so that no convolution
  runs at 96 x 96 (the demo's choice: about 2.5x less CPU for the same validation PSNR).
* Downsampling is a ``(kt, 3, 3)`` convolution with stride ``(1, 2, 2)``: space shrinks 2x per level
  (96 -> 48 -> 24 -> 12), time never does. Upsampling is nearest-neighbour ``(1, 2, 2)`` + conv.
* Temporal padding is **circular** by default (``vae.time_padding``): a prepared cine is exactly one
  R-R cycle, so frame 49 is followed by the next R-peak, i.e. frame 0. Zero padding would tell the
  network where the cycle's ends are and make the first/last frames worse; circular padding has no
  such edge. Spatial padding stays zero (the image does not wrap).
* Attention at the bottleneck (``vae.attention``) is factorised: spatial self-attention within each
  frame (144 tokens) then temporal self-attention at each latent position (50 tokens), both through
  ``torch.nn.functional.scaled_dot_product_attention``. Dense attention over all 7,200 tokens is
  what needs ~13 GB per layer in the reference code's fallback; the factorised form costs a few MB.
* The decoder mirrors the encoder with ``num_res_blocks + 1`` blocks per level (SD convention);
  its last layer ``decoder.conv_out`` is the layer the adaptive GAN weight is measured on.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..utils.attention import sdpa
from .posterior import DiagonalGaussian

ARCH_KEYS = ("latent_channels", "base_channels", "channel_mult", "num_res_blocks", "attention",
             "temporal_levels", "time_padding")


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------


def _groups(channels: int, max_groups: int = 32) -> int:
    g = min(max_groups, channels)
    while channels % g:
        g -= 1
    return g


def norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(_groups(channels), channels, eps=1e-6, affine=True)


class TimeConv3d(nn.Conv3d):
    """``Conv3d`` with kernel ``(kt, k, k)``: padding in time is circular/replicate/zeros
    (``time_padding``), in space zero padding of ``k // 2``."""

    def __init__(self, in_ch: int, out_ch: int, kt: int = 3, k: int = 3, stride=(1, 1, 1),
                 time_padding: str = "circular"):
        if kt % 2 != 1 or k % 2 != 1:
            raise ValueError(f"kernel sizes must be odd, got kt={kt}, k={k}")
        self.pad_t = kt // 2
        self.time_padding = time_padding
        torch_pad_t = self.pad_t if time_padding == "zeros" else 0
        super().__init__(in_ch, out_ch, kernel_size=(kt, k, k), stride=stride,
                         padding=(torch_pad_t, k // 2, k // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad_t and self.time_padding != "zeros":
            mode = "circular" if self.time_padding == "circular" else "replicate"
            x = F.pad(x, (0, 0, 0, 0, self.pad_t, self.pad_t), mode=mode)
        return super().forward(x)


def space_to_depth(x: torch.Tensor, p: int) -> torch.Tensor:
    """``(B, C, T, H, W)`` -> ``(B, C*p*p, T, H/p, W/p)`` (pixel unshuffle of every frame)."""
    if p == 1:
        return x
    return F.pixel_unshuffle(x.transpose(1, 2), p).transpose(1, 2)


def depth_to_space(x: torch.Tensor, p: int) -> torch.Tensor:
    """Inverse of ``space_to_depth``."""
    if p == 1:
        return x
    return F.pixel_shuffle(x.transpose(1, 2), p).transpose(1, 2)


class ResBlock(nn.Module):
    """``x + conv(silu(gn(conv(silu(gn(x))))))`` with a 1x1x1 shortcut when channels change."""

    def __init__(self, in_ch: int, out_ch: int, kt: int, time_padding: str):
        super().__init__()
        self.norm1 = norm(in_ch)
        self.conv1 = TimeConv3d(in_ch, out_ch, kt, time_padding=time_padding)
        self.norm2 = norm(out_ch)
        self.conv2 = TimeConv3d(out_ch, out_ch, kt, time_padding=time_padding)
        self.skip = nn.Conv3d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Downsample(nn.Module):
    """Spatial-only 2x downsampling: ``(kt, 3, 3)`` conv with stride ``(1, 2, 2)``."""

    def __init__(self, ch: int, kt: int, time_padding: str):
        super().__init__()
        self.conv = TimeConv3d(ch, ch, kt, stride=(1, 2, 2), time_padding=time_padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Spatial-only 2x upsampling: nearest ``(1, 2, 2)`` then a ``(kt, 3, 3)`` conv."""

    def __init__(self, ch: int, kt: int, time_padding: str):
        super().__init__()
        self.conv = TimeConv3d(ch, ch, kt, time_padding=time_padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest"))


class AxialAttention(nn.Module):
    """Factorised self-attention: within each frame over ``h*w`` tokens, then over time at each
    position (``T`` tokens). Both through ``F.scaled_dot_product_attention``; residual."""

    def __init__(self, ch: int, head_dim: int = 64):
        super().__init__()
        self.heads = max(1, ch // head_dim) if ch % head_dim == 0 else 1
        self.norm_s = norm(ch)
        self.qkv_s = nn.Linear(ch, 3 * ch)
        self.proj_s = nn.Linear(ch, ch)
        self.norm_t = norm(ch)
        self.qkv_t = nn.Linear(ch, 3 * ch)
        self.proj_t = nn.Linear(ch, ch)

    def _attend(self, tokens: torch.Tensor, qkv: nn.Linear, proj: nn.Linear) -> torch.Tensor:
        """tokens ``(N, L, ch)`` -> ``(N, L, ch)``."""
        n, length, ch = tokens.shape
        q, k, v = qkv(tokens).reshape(n, length, 3, self.heads, ch // self.heads).permute(2, 0, 3, 1, 4)
        out = sdpa(q, k, v)                                      # (N, heads, L, d)
        return proj(out.transpose(1, 2).reshape(n, length, ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        # spatial: (B*T, h*w, C)
        tokens = self.norm_s(x).permute(0, 2, 3, 4, 1).reshape(b * t, h * w, c)
        out = self._attend(tokens, self.qkv_s, self.proj_s)
        x = x + out.reshape(b, t, h, w, c).permute(0, 4, 1, 2, 3)
        # temporal: (B*h*w, T, C)
        tokens = self.norm_t(x).permute(0, 3, 4, 2, 1).reshape(b * h * w, t, c)
        out = self._attend(tokens, self.qkv_t, self.proj_t)
        return x + out.reshape(b, h, w, t, c).permute(0, 4, 3, 1, 2)


# ----------------------------------------------------------------------------------------------
# Encoder / decoder
# ----------------------------------------------------------------------------------------------


class Encoder(nn.Module):
    """``(B, 1, T, H, W)`` -> moments ``(B, 2C, T, H/8, W/8)``."""

    def __init__(self, in_channels: int, latent_channels: int, base_channels: int,
                 channel_mult: list[int], num_res_blocks: int, attention: bool,
                 time_kernel: list[int], time_padding: str, patch_size: int = 1):
        super().__init__()
        chans = [base_channels * m for m in channel_mult]
        levels = len(chans)
        self.patch_size = patch_size
        self.conv_in = TimeConv3d(in_channels * patch_size ** 2, chans[0], time_kernel[0],
                                  time_padding=time_padding)
        self.down = nn.ModuleList()
        ch = chans[0]
        for i in range(levels):
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(ch, chans[i], time_kernel[i], time_padding))
                ch = chans[i]
            level = nn.Module()
            level.blocks = blocks
            level.downsample = (Downsample(ch, time_kernel[i], time_padding) if i < levels - 1
                                else nn.Identity())
            self.down.append(level)
        kt = time_kernel[-1]
        self.mid1 = ResBlock(ch, ch, kt, time_padding)
        self.mid_attn = AxialAttention(ch) if attention else nn.Identity()
        self.mid2 = ResBlock(ch, ch, kt, time_padding)
        self.norm_out = norm(ch)
        self.conv_out = TimeConv3d(ch, 2 * latent_channels, kt, time_padding=time_padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(space_to_depth(x, self.patch_size))
        for level in self.down:
            for block in level.blocks:
                h = block(h)
            h = level.downsample(h)
        h = self.mid2(self.mid_attn(self.mid1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """``(B, C, T, h, w)`` -> ``(B, 1, T, 8h, 8w)``; mirrors the encoder."""

    def __init__(self, out_channels: int, latent_channels: int, base_channels: int,
                 channel_mult: list[int], num_res_blocks: int, attention: bool,
                 time_kernel: list[int], time_padding: str, patch_size: int = 1):
        super().__init__()
        chans = [base_channels * m for m in channel_mult]
        levels = len(chans)
        self.patch_size = patch_size
        ch = chans[-1]
        kt = time_kernel[-1]
        self.conv_in = TimeConv3d(latent_channels, ch, kt, time_padding=time_padding)
        self.mid1 = ResBlock(ch, ch, kt, time_padding)
        self.mid_attn = AxialAttention(ch) if attention else nn.Identity()
        self.mid2 = ResBlock(ch, ch, kt, time_padding)
        self.up = nn.ModuleList()
        for i in reversed(range(levels)):
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                blocks.append(ResBlock(ch, chans[i], time_kernel[i], time_padding))
                ch = chans[i]
            level = nn.Module()
            level.blocks = blocks
            level.upsample = (Upsample(ch, time_kernel[i - 1], time_padding) if i > 0
                              else nn.Identity())
            self.up.append(level)
        self.norm_out = norm(ch)
        self.conv_out = TimeConv3d(ch, out_channels * patch_size ** 2, time_kernel[0],
                                   time_padding=time_padding)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid2(self.mid_attn(self.mid1(self.conv_in(z))))
        for level in self.up:
            for block in level.blocks:
                h = block(h)
            h = level.upsample(h)
        return depth_to_space(self.conv_out(F.silu(self.norm_out(h))), self.patch_size)


# ----------------------------------------------------------------------------------------------
# The VAE
# ----------------------------------------------------------------------------------------------


class VAE3D(nn.Module):
    """Anisotropic 3D-VAE. ``encode(x)`` -> ``DiagonalGaussian``; ``decode(z)`` -> cine;
    ``forward(x)`` -> ``(x_hat, posterior)`` (sampled latent in training, the mode otherwise)."""

    def __init__(self, latent_channels: int = 4, base_channels: int = 32,
                 channel_mult: list[int] = (1, 2, 4, 4), num_res_blocks: int = 1,
                 attention: bool = True, temporal_levels: int = 4, time_padding: str = "circular",
                 spatial_factor: int = 8, in_channels: int = 1):
        super().__init__()
        channel_mult = list(channel_mult)
        levels = len(channel_mult)
        patch_size = spatial_factor // 2 ** (levels - 1)
        if levels < 1 or patch_size < 1 or patch_size * 2 ** (levels - 1) != spatial_factor:
            raise ValueError(f"channel_mult {channel_mult}: {levels} levels cannot make a {spatial_factor}x "
                             f"spatial compression (2**(levels-1) must divide it)")
        if time_padding not in ("circular", "replicate", "zeros"):
            raise ValueError(f"time_padding must be circular, replicate or zeros, got {time_padding!r}")
        time_kernel = [3 if i >= levels - temporal_levels else 1 for i in range(levels)]
        self.latent_channels = latent_channels
        self.spatial_factor = spatial_factor
        self.patch_size = patch_size
        self.time_kernel = time_kernel
        arch = dict(latent_channels=latent_channels, base_channels=base_channels,
                    channel_mult=channel_mult, num_res_blocks=num_res_blocks, attention=attention,
                    time_kernel=time_kernel, time_padding=time_padding, patch_size=patch_size)
        self.encoder = Encoder(in_channels, **arch)
        self.decoder = Decoder(in_channels, **arch)
        self.quant_conv = nn.Conv3d(2 * latent_channels, 2 * latent_channels, 1)
        self.post_quant_conv = nn.Conv3d(latent_channels, latent_channels, 1)

    @classmethod
    def from_config(cls, vae_cfg: Any) -> VAE3D:
        """Build from a ``VAEConfig`` or the ``config["vae"]`` dict stored in a checkpoint."""
        from ..config import ConfigError, section_values

        vae_cfg = section_values(vae_cfg)
        if vae_cfg.get("arch", "project") != "project":

            raise ConfigError("config key 'vae.arch': VAE3D is this project's VAE (arch project); "
                              "build_vae builds the official one for the published weights")
        kwargs = {k: vae_cfg[k] for k in ARCH_KEYS if k in vae_cfg}
        return cls(**kwargs)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """x ``(B, 1, T, H, W)`` in [-1, 1] -> posterior over ``(B, C, T, H/8, W/8)``."""
        f = self.spatial_factor
        if x.ndim != 5 or x.shape[-1] % f or x.shape[-2] % f:
            raise ValueError(f"expected (B, 1, T, H, W) with H, W divisible by {f}, got {tuple(x.shape)}")
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z ``(B, C, T, h, w)`` -> ``(B, 1, T, 8h, 8w)``."""
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, sample: bool | None = None,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussian]:
        posterior = self.encode(x)
        sample = self.training if sample is None else sample
        z = posterior.sample(generator) if sample else posterior.mode()
        return self.decode(z), posterior

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the decoder's output conv (for the adaptive GAN weight)."""
        return self.decoder.conv_out.weight

    def state_hash(self) -> str:
        from ..utils.checkpoint import state_hash

        return state_hash(self.state_dict())


def build_vae(vae_cfg: Any) -> nn.Module:
    """The untrained VAE a ``VAEConfig`` (or checkpoint ``config["vae"]`` dict) names: ``VAE3D``
    (``vae.arch=project``) or the published weights' ``OfficialVAE3D`` (``official``)."""
    from ..config import section_values

    if section_values(vae_cfg).get("arch", "project") == "official":
        from .official import OfficialVAE3D

        return OfficialVAE3D.from_config(vae_cfg)
    return VAE3D.from_config(vae_cfg)


def load_vae(path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a VAE from a stage-2 checkpoint (``runs/<exp>/vae/best.pt``), in eval mode."""
    from ..utils.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path, map_location="cpu", stage_hint="train_disentangle_vae3d.py")
    try:
        vae_cfg = ckpt["config"]["vae"]
    except (KeyError, TypeError):
        raise ValueError(f"checkpoint '{path}' has no config['vae'] section: not a stage-2 VAE "
                         "checkpoint") from None
    vae = build_vae(vae_cfg)
    vae.load_state_dict(ckpt["model"])
    return vae.to(device).eval()
