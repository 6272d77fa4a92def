"""A small video ViT over cines, its VideoMAE pretraining head and its fine-tuning head.

Cine ``(B, 1, T, H, W)`` -> tubelets of ``tubelet x patch x patch`` voxels -> tokens
``(B, N, D)`` with ``N = (T / tubelet) * (H / patch)^2``, ordered time-major (``t h w``), plus a
fixed sin-cos position embedding (3-D, so the same weights read any token subset). Tube masking
(VideoMAE): one random set of spatial positions is hidden in every tubelet in time, so a masked
patch cannot be copied from its neighbour frame.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from timm.models.vision_transformer import Block


def resize_cine(cine: torch.Tensor, frames: int, size: int) -> torch.Tensor:
    """``(B, 1, 50, 96, 96)`` -> ``(B, 1, frames, size, size)`` (trilinear; identity when equal)."""
    if tuple(cine.shape[2:]) == (frames, size, size):
        return cine
    return F.interpolate(cine, size=(frames, size, size), mode="trilinear", align_corners=False)


def sincos_3d(grid_t: int, grid_s: int, dim: int) -> torch.Tensor:
    """Fixed position embedding ``(grid_t * grid_s^2, dim)`` in ``t h w`` order: a third of the
    channels (rounded to an even count) per axis, the remainder zero."""
    per_axis = (dim // 3) // 2 * 2

    def axis(n: int) -> torch.Tensor:
        if per_axis == 0:
            return torch.zeros(n, 0)
        omega = 1.0 / 10000 ** (torch.arange(per_axis // 2, dtype=torch.float64) / max(1, per_axis // 2))
        angles = torch.arange(n, dtype=torch.float64)[:, None] * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    t, h, w = torch.meshgrid(torch.arange(grid_t), torch.arange(grid_s), torch.arange(grid_s), indexing="ij")
    emb = torch.cat([axis(grid_t)[t.flatten()], axis(grid_s)[h.flatten()], axis(grid_s)[w.flatten()]], dim=1)
    return F.pad(emb, (0, dim - emb.shape[1])).float()


class VideoViT(nn.Module):
    """Tubelet embedding + timm ``Block`` s. ``forward(cine, keep)`` -> tokens ``(B, n, D)``.

    ``keep``: ``(B, n)`` indices of the tokens to encode (MAE), or None for all ``N``.
    """

    def __init__(self, frames: int = 50, image_size: int = 96, tubelet: int = 2, patch: int = 16,
                 width: int = 192, depth: int = 6, heads: int = 3, mlp_ratio: float = 4.0):
        super().__init__()
        self.frames, self.image_size, self.tubelet, self.patch = frames, image_size, tubelet, patch
        self.grid_t, self.grid_s = frames // tubelet, image_size // patch
        self.num_tokens = self.grid_t * self.grid_s ** 2
        self.patch_dim = tubelet * patch * patch
        self.width = width
        self.embed = nn.Linear(self.patch_dim, width)
        self.register_buffer("pos", sincos_3d(self.grid_t, self.grid_s, width), persistent=False)
        self.blocks = nn.ModuleList([Block(width, heads, mlp_ratio, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.apply(_init)

    @classmethod
    def from_config(cls, ds) -> VideoViT:
        return cls(ds.frames, ds.image_size, ds.tubelet, ds.patch, ds.width, ds.depth, ds.heads, ds.mlp_ratio)

    def patchify(self, cine: torch.Tensor) -> torch.Tensor:
        """``(B, 1, T, H, W)`` (any T, H, W: resized first) -> patches ``(B, N, tubelet*patch*patch)``."""
        cine = resize_cine(cine, self.frames, self.image_size)
        return rearrange(cine, "b c (t pt) (h ph) (w pw) -> b (t h w) (c pt ph pw)",
                         pt=self.tubelet, ph=self.patch, pw=self.patch)

    def encode_patches(self, patches: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        tokens = self.embed(patches) + self.pos
        if keep is not None:
            tokens = torch.gather(tokens, 1, keep[..., None].expand(-1, -1, tokens.shape[-1]))
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)

    def forward(self, cine: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        return self.encode_patches(self.patchify(cine), keep)


def tube_mask(batch: int, grid_t: int, grid_s: int, ratio: float, generator: torch.Generator | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Tube masking: the same ``round(grid_s^2 * (1 - ratio))`` visible spatial positions in
    every time step. Returns ``(keep (B, n_keep), masked (B, n_masked))`` token indices (t h w order)."""
    n_spatial = grid_s * grid_s
    n_visible = max(1, int(round(n_spatial * (1 - ratio))))
    order = torch.argsort(torch.rand(batch, n_spatial, generator=generator), dim=1)
    offsets = torch.arange(grid_t)[None, :, None] * n_spatial          # (1, T', 1)

    def tokens(spatial: torch.Tensor) -> torch.Tensor:                  # (B, k) -> (B, T' * k), t-major
        return (offsets + spatial.sort(dim=1).values[:, None, :]).flatten(1)

    return tokens(order[:, :n_visible]), tokens(order[:, n_visible:])


class VideoMAE(nn.Module):
    """Encoder on the visible tokens, a light decoder on all, the loss on the masked ones only
    (per-patch normalised pixels, as VideoMAE)."""

    def __init__(self, encoder: VideoViT, decoder_width: int = 128, decoder_depth: int = 2,
                 decoder_heads: int = 4, mask_ratio: float = 0.9):
        super().__init__()
        self.encoder = encoder
        self.mask_ratio = mask_ratio
        self.to_decoder = nn.Linear(encoder.width, decoder_width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_width))
        self.register_buffer("pos", sincos_3d(encoder.grid_t, encoder.grid_s, decoder_width), persistent=False)
        self.blocks = nn.ModuleList([Block(decoder_width, decoder_heads, 4.0, qkv_bias=True)
                                     for _ in range(decoder_depth)])
        self.norm = nn.LayerNorm(decoder_width)
        self.head = nn.Linear(decoder_width, encoder.patch_dim)
        self.apply(_init)
        nn.init.normal_(self.mask_token, std=0.02)

    @classmethod
    def from_config(cls, ds) -> VideoMAE:
        return cls(VideoViT.from_config(ds), ds.decoder_width, ds.decoder_depth, ds.decoder_heads, ds.mask_ratio)

    def forward(self, cine: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``cine (B, 1, T, H, W)`` -> scalar loss (MSE on the masked tubelets)."""
        enc = self.encoder
        patches = enc.patchify(cine)                                       # (B, N, P)
        keep, masked = tube_mask(patches.shape[0], enc.grid_t, enc.grid_s, self.mask_ratio, generator)
        keep, masked = keep.to(cine.device), masked.to(cine.device)
        visible = self.to_decoder(enc.encode_patches(patches, keep))       # (B, n_keep, Dd)
        b, n, d = patches.shape[0], enc.num_tokens, visible.shape[-1]
        tokens = self.mask_token.expand(b, n, d).clone()
        tokens.scatter_(1, keep[..., None].expand(-1, -1, d), visible)
        tokens = tokens + self.pos
        for block in self.blocks:
            tokens = block(tokens)
        pred = self.head(self.norm(tokens))                                # (B, N, P)
        target = patches
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True, unbiased=True) + 1e-6).sqrt()
        index = masked[..., None].expand(-1, -1, pred.shape[-1])
        return F.mse_loss(torch.gather(pred, 1, index), torch.gather(target, 1, index))


class Finetuner(nn.Module):
    """Encoder + mean-pooled tokens -> ``(B, n_classes + n_regression)`` outputs."""

    def __init__(self, encoder: VideoViT, outputs: int):
        super().__init__()
        self.encoder = encoder
        self.norm = nn.LayerNorm(encoder.width)
        self.head = nn.Linear(encoder.width, outputs)
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, cine: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.encoder(cine).mean(dim=1)))


def _init(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = ["VideoViT", "VideoMAE", "Finetuner", "tube_mask", "sincos_3d", "resize_cine", "count_parameters"]
