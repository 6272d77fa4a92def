"""Stage 3 of the published weights: the official ECG-conditioned video DiT (velocity network).

``z_t (B, C, T, H, W)``, flow time ``t (B,)`` in [0, 1] and ECG tokens ``(B, S, E)`` -> velocity
``(B, C, T, H, W)``. Latents are the VAE's own (unscaled); the published weights: C 4, T 50,
H = W 12, E 768, hidden 512, depth 8, heads 8.

How it differs from this project's ``flow/dit.py``:

* tokens are single latent pixels (no patches) plus a **learned** position embedding
  ``pos_embed (1, T, H*W, D)``;
* ``t`` enters the sinusoidal embedding as it is (no x1000 scaling): [cos | sin] features;
* each block runs temporal self-attention (B*H*W sequences of T), cross-attention from every latent
  token to the S ECG tokens, spatial self-attention (B*T sequences of H*W), then an exact-GELU MLP,
  every branch adaLN modulated and gated (chunk order: spatial, temporal, cross, MLP);
* the ECG tokens get no position embedding; they are projected (``ecg_proj``, a ``Linear`` unless
  E equals the hidden width) and the global condition is ``t_emb + MLP(mean of the projected
  tokens)`` (``ecg_global_proj``);
* the null condition of classifier-free guidance is the zeroed ECG features (no learned null).

Attention weights keep ``nn.MultiheadAttention``'s layout (``in_proj_weight (3D, D)`` = [W_q; W_k;
W_v], ``in_proj_bias``, ``out_proj``), so the official state dict loads as it is. The official
cross-attention repeats the ECG keys for every latent position; here the T*H*W queries of a video
attend to its S tokens once, which is the same computation without the copies.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..utils.attention import sdpa
from ..utils.device import fp16_autocast


class TimestepEmbedder(nn.Module):
    """``t (B,)`` -> ``(B, D)``: [cos | sin](t * 10000^(-k/half)) through a SiLU MLP."""

    def __init__(self, hidden: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_embedding_size // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class PackedAttention(nn.Module):
    """Multi-head attention with ``nn.MultiheadAttention``'s parameters: ``x (N, S, D)`` attends to
    itself, or to ``context (N, S_kv, D)``."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        n, s, d = x.shape
        return x.view(n, s, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        n, s, d = x.shape
        if context is None:
            q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        else:
            q = F.linear(x, self.in_proj_weight[:d], self.in_proj_bias[:d])
            k, v = F.linear(context, self.in_proj_weight[d:], self.in_proj_bias[d:]).chunk(2, dim=-1)
        out = sdpa(self._split(q), self._split(k), self._split(v))                  # (N, heads, S, d_h)
        return self.out_proj(out.transpose(1, 2).reshape(n, s, d))


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN with per-video ``shift, scale (B, D)`` on ``x (B, ..., D)``."""
    view = (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
    return x * (1 + scale.view(view)) + shift.view(view)


def _gate(gate: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return gate.view((x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)) * x


class DiTBlock(nn.Module):
    """Temporal attn -> cross-attn to the ECG -> spatial attn -> MLP on ``x (B, T, L, D)``."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        norm = lambda: nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)  # noqa: E731
        # the official names: norm1 spatial, norm2 temporal, norm3 cross, norm4 MLP
        self.norm1, self.norm2, self.norm3, self.norm4 = norm(), norm(), norm(), norm()
        self.attn_spatial = PackedAttention(hidden, heads)
        self.attn_temporal = PackedAttention(hidden, heads)
        self.attn_cross = PackedAttention(hidden, heads)
        mlp_hidden = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden, mlp_hidden), nn.GELU(), nn.Linear(mlp_hidden, hidden))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 12 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """``x (B, T, L, D)``, ``c (B, D)``, ``context (B, S, D)`` projected ECG tokens."""
        b, t, n, d = x.shape
        (sh_s, sc_s, g_s, sh_t, sc_t, g_t,
         sh_c, sc_c, g_c, sh_m, sc_m, g_m) = self.adaLN_modulation(c).chunk(12, dim=1)

        # 1. temporal: (B*L, T, D)
        h = _modulate(self.norm2(x), sh_t, sc_t).transpose(1, 2).reshape(b * n, t, d)
        x = x + _gate(g_t, self.attn_temporal(h).view(b, n, t, d).transpose(1, 2))
        # 2. cross: the T*L latent tokens of a video -> its S ECG tokens
        h = _modulate(self.norm3(x), sh_c, sc_c).reshape(b, t * n, d)
        x = x + _gate(g_c, self.attn_cross(h, context).view(b, t, n, d))
        # 3. spatial: (B*T, L, D)
        h = _modulate(self.norm1(x), sh_s, sc_s).reshape(b * t, n, d)
        x = x + _gate(g_s, self.attn_spatial(h).view(b, t, n, d))
        # 4. MLP
        return x + _gate(g_m, self.mlp(_modulate(self.norm4(x), sh_m, sc_m)))


class OfficialDiT(nn.Module):
    """The official velocity network with this project's DiT interface:
    ``forward(z_t, t, ecg_tokens, ecg_pooled, drop)`` (``ecg_pooled`` is unused: the global
    condition comes from the tokens; ``drop (B,)`` True = the null condition, zeroed tokens),
    ``arch`` (constructor arguments, stored in flow checkpoints)."""

    def __init__(self, latent_channels: int = 4, num_frames: int = 50, latent_size: int = 12,
                 ecg_dim: int = 768, hidden: int = 512, depth: int = 8, heads: int = 8, mlp_ratio: float = 4.0):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"flow.hidden={hidden} must be divisible by flow.heads={heads}")
        self.arch = dict(arch="official", latent_channels=latent_channels, num_frames=num_frames,
                         latent_size=latent_size, ecg_dim=ecg_dim, hidden=hidden, depth=depth, heads=heads,
                         mlp_ratio=mlp_ratio)
        self.grad_checkpoint = False
        self.x_embedder = nn.Linear(latent_channels, hidden)
        self.t_embedder = TimestepEmbedder(hidden)
        self.ecg_proj = nn.Linear(ecg_dim, hidden) if ecg_dim != hidden else nn.Identity()
        self.ecg_global_proj = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_frames, latent_size * latent_size, hidden))
        self.blocks = nn.ModuleList([DiTBlock(hidden, heads, mlp_ratio) for _ in range(depth)])
        self.final_adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.final_norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.final_linear = nn.Linear(hidden, latent_channels)

    @classmethod
    def from_arch(cls, arch: dict) -> OfficialDiT:
        return cls(**{k: v for k, v in arch.items() if k != "arch"})

    def predict_velocity(self, z_t: torch.Tensor, t: torch.Tensor, ecg_feat: torch.Tensor) -> torch.Tensor:
        """The official call: ``z_t (B, C, T, H, W)``, ``t (B,)``, ``ecg_feat (B, S, E)``."""
        b, c, frames, hh, ww = z_t.shape
        x = self.x_embedder(z_t.permute(0, 2, 3, 4, 1).reshape(b, frames, hh * ww, c)) + self.pos_embed
        context = self.ecg_proj(ecg_feat)                                           # (B, S, D)
        c_global = self.t_embedder(t) + self.ecg_global_proj(context.mean(dim=1))   # (B, D)
        for block in self.blocks:
            if self.grad_checkpoint and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, c_global, context, use_reentrant=False)
            else:
                x = block(x, c_global, context)
        shift, scale = self.final_adaLN_modulation(c_global).chunk(2, dim=1)
        x = self.final_linear(_modulate(self.final_norm(x), shift, scale))          # (B, T, L, C)
        return x.reshape(b, frames, hh, ww, c).permute(0, 4, 1, 2, 3)

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, ecg_tokens: torch.Tensor,
                ecg_pooled: torch.Tensor | None = None, drop: torch.Tensor | None = None) -> torch.Tensor:
        if drop is not None:
            ecg_tokens = ecg_tokens * (~drop.bool()).to(ecg_tokens.dtype)[:, None, None]
        with fp16_autocast(z_t.device.type):
            return self.predict_velocity(z_t, t, ecg_tokens)
