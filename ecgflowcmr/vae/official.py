"""Stage 2 of the published weights: the official 3-D VAE (no temporal compression).

``(B, 1, T, H, W)`` in [-1, 1]  --encode-->  ``DiagonalGaussian`` over ``(B, E, T, H/f, W/f)``
``(B, E, T, h, w)``            --decode-->  ``(B, 1, T, f h, f w)``,  f = 2 ** (levels - 1)

with ``ch`` = ``vae.base_channels``, ``ch_mult`` = ``vae.channel_mult`` (levels), ``num_res_blocks``,
``z_channels`` (the encoder's output, before ``quant_conv``) and ``embed_dim`` =
``vae.latent_channels``. The published weights: ch 64, ch_mult (1, 2, 4, 4), 2 blocks, z 4, E 4,
so (1, 50, 96, 96) -> (4, 50, 12, 12).

How it differs from this project's VAE (``vae/model.py``):

* every convolution is a plain ``Conv3d`` with kernel (3, 3, 3) and zero padding (no circular time
  padding), GroupNorm with 32 groups, eps 1e-6, SiLU;
* downsampling is a ``(C, C, 1, 3, 3)`` convolution with stride (1, 2, 2), padding (0, 1, 1);
  upsampling is nearest (1, 2, 2) then a 3x3x3 convolution;
* dense self-attention over all T*h*w positions (8 heads, 1x1x1 q/k/v/out convolutions,
  residual) after every residual block of the two lowest resolutions, and in the middle of the
  encoder and the decoder. At 24 x 24 x 50 that is 28,800 positions (26 GB of fp32 scores for 8
  heads): the fused kernels of ``scaled_dot_product_attention`` keep it linear in memory (the
  official runs used xformers' memory-efficient attention on the GPU);
* the official residual blocks also hold a ``temb_proj`` (512 -> C) that no forward uses; the
  converter drops it, as it drops the loss's ``loss.*`` entries (LPIPS, discriminator).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..utils.checkpoint import state_hash
from ..utils.device import fp16_autocast
from .posterior import DiagonalGaussian

GROUPS = 32
ATTN_HEADS = 8


def swish(x: torch.Tensor) -> torch.Tensor:
    """SiLU written as the official code computes it (``F.silu``'s fused kernel rounds differently,
    which adds up to a few 1e-6 over the decoder's ~30 layers)."""
    return x * torch.sigmoid(x)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(GROUPS, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """``x + conv(silu(gn(conv(silu(gn(x))))))``; a 1x1x1 ``nin_shortcut`` when channels change."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1 = _norm(c_in)
        self.conv1 = nn.Conv3d(c_in, c_out, 3, padding=1)
        self.norm2 = _norm(c_out)
        self.conv2 = nn.Conv3d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv3d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Dense multi-head self-attention over all ``T*h*w`` positions of ``(B, C, T, h, w)``."""

    def __init__(self, channels: int, heads: int = ATTN_HEADS):
        super().__init__()
        self.heads = heads
        self.norm = _norm(channels)
        self.q = nn.Conv3d(channels, channels, 1)
        self.k = nn.Conv3d(channels, channels, 1)
        self.v = nn.Conv3d(channels, channels, 1)
        self.proj_out = nn.Conv3d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        y = self.norm(x)

        def heads(conv):       # (B, C, T, h, w) -> (B, heads, T*h*w, C/heads); channel = head * d + i
            # contiguous: the fused (memory-linear) CPU kernel needs unit stride on the last axis
            return conv(y).reshape(b, self.heads, c // self.heads, t * h * w).transpose(2, 3).contiguous()

        out = F.scaled_dot_product_attention(heads(self.q), heads(self.k), heads(self.v))
        out = out.transpose(2, 3).reshape(b, c, t, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Space only: ``(C, C, 1, 3, 3)`` convolution, stride (1, 2, 2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Space only: nearest (1, 2, 2), then a 3x3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest"))


class Level(nn.Module):
    """One resolution: ``block[i]`` then ``attn[i]`` (attention or identity) for each i, then
    ``downsample`` (encoder) or ``upsample`` (decoder)."""

    def __init__(self, blocks: list[nn.Module], attns: list[nn.Module], resample: nn.Module, name: str):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)
        setattr(self, name, resample)
        self._resample = name

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for block, attn in zip(self.block, self.attn):
            h = attn(block(h))
        return getattr(self, self._resample)(h)


class Middle(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


def _attention_at(level: int, levels: int, channels: int) -> nn.Module:
    """Attention at the two lowest resolutions, identity above."""
    return AttnBlock(channels) if level >= levels - 2 else nn.Identity()


class Encoder(nn.Module):
    """``(B, 1, T, H, W)`` -> ``(B, 2 z, T, H/f, W/f)``."""

    def __init__(self, ch: int, ch_mult: list[int], num_res_blocks: int, z_channels: int, in_channels: int = 1):
        super().__init__()
        levels = len(ch_mult)
        self.conv_in = nn.Conv3d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        c = ch
        for i, mult in enumerate(ch_mult):
            blocks, attns = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(c, ch * mult))
                c = ch * mult
                attns.append(_attention_at(i, levels, c))
            self.down.append(Level(blocks, attns, Downsample(c) if i < levels - 1 else nn.Identity(), "downsample"))
        self.mid = Middle(c)
        self.norm_out = _norm(c)
        self.conv_out = nn.Conv3d(c, 2 * z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(swish(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    """``(B, z, T, h, w)`` -> ``(B, 1, T, f h, f w)``. ``up[i]`` is resolution level i (0 = finest),
    run from the coarsest up, with ``num_res_blocks + 1`` blocks each."""

    def __init__(self, ch: int, ch_mult: list[int], num_res_blocks: int, z_channels: int, out_ch: int = 1):
        super().__init__()
        levels = len(ch_mult)
        c = ch * ch_mult[-1]
        self.conv_in = nn.Conv3d(z_channels, c, 3, padding=1)
        self.mid = Middle(c)
        up = []
        for i in reversed(range(levels)):
            blocks, attns = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(c, ch * ch_mult[i]))
                c = ch * ch_mult[i]
                attns.append(_attention_at(i, levels, c))
            up.insert(0, Level(blocks, attns, Upsample(c) if i > 0 else nn.Identity(), "upsample"))
        self.up = nn.ModuleList(up)
        self.norm_out = _norm(c)
        self.conv_out = nn.Conv3d(c, out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(swish(self.norm_out(h)))


class OfficialVAE3D(nn.Module):
    """The official VAE with this project's VAE interface: ``encode(x) -> DiagonalGaussian``,
    ``decode(z)``, ``forward(x) -> (x_hat, posterior)``, ``spatial_factor``, ``latent_channels``."""

    def __init__(self, latent_channels: int = 4, base_channels: int = 64, channel_mult=(1, 2, 4, 4),
                 num_res_blocks: int = 2, z_channels: int = 0):
        super().__init__()
        channel_mult = list(channel_mult)
        z_channels = z_channels or latent_channels
        if any((base_channels * m) % GROUPS for m in channel_mult):
            raise ValueError(f"vae.base_channels={base_channels} x channel_mult {channel_mult}: every level's "
                             f"channels must be a multiple of {GROUPS} (GroupNorm groups)")
        self.latent_channels, self.z_channels = latent_channels, z_channels
        self.spatial_factor = 2 ** (len(channel_mult) - 1)
        self.encoder_3d = Encoder(base_channels, channel_mult, num_res_blocks, z_channels)
        self.decoder = Decoder(base_channels, channel_mult, num_res_blocks, z_channels)
        self.quant_conv = nn.Conv3d(2 * z_channels, 2 * latent_channels, 1)
        self.post_quant_conv = nn.Conv3d(latent_channels, z_channels, 1)

    @classmethod
    def from_config(cls, vae_cfg: Any) -> OfficialVAE3D:
        """From a ``VAEConfig`` or the ``config["vae"]`` dict of a checkpoint."""
        from ..config import section_values

        vae_cfg = section_values(vae_cfg)
        return cls(vae_cfg["latent_channels"], vae_cfg["base_channels"], vae_cfg["channel_mult"],
                   vae_cfg["num_res_blocks"], vae_cfg.get("z_channels", 0))

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """x ``(B, 1, T, H, W)`` -> posterior over ``(B, E, T, H/f, W/f)``."""
        f = self.spatial_factor
        if x.ndim != 5 or x.shape[-1] % f or x.shape[-2] % f:
            raise ValueError(f"expected (B, 1, T, H, W) with H, W divisible by {f}, got {tuple(x.shape)}")
        with fp16_autocast(x.device.type):
            return DiagonalGaussian(self.quant_conv(self.encoder_3d(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z ``(B, E, T, h, w)`` -> ``(B, 1, T, f h, f w)``."""
        with fp16_autocast(z.device.type):
            return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, sample: bool | None = None,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussian]:
        posterior = self.encode(x)
        sample = self.training if sample is None else sample
        return self.decode(posterior.sample(generator) if sample else posterior.mode()), posterior

    @property
    def last_layer(self) -> torch.Tensor:
        return self.decoder.conv_out.weight

    def state_hash(self) -> str:
        return state_hash(self.state_dict())
