"""ECG-conditioned video DiT: the velocity network of the Anatomy-Motion Disentangled Flow.

Input is a (normalised) VAE latent video ``z_t`` of shape ``(B, C, T, H, W)`` (C=4, T=50, H=W=12),
the flow time ``t`` ``(B,)`` and the stage-1 ECG condition: 50 cycle-aligned tokens
``(B, S=50, E)`` plus a pooled vector ``(B, E)``. Output is the velocity, same shape as ``z_t``.

Layout (one clear module, in the spirit of facebookresearch/DiT ``models.py``):

* **Tokens**: each frame is cut into ``p x p`` latent patches (``flow.patch_size`` 1 or 2), giving
  ``(B, T, L, D)`` with ``L = (H/p) * (W/p)``; a fixed sin-cos embedding over (T, h, w) is added
  (the 1-D temporal part plus the 2-D spatial part, both of width D).
* **Blocks** (``flow.depth``), each with four residual branches, every one adaLN-Zero modulated
  (shift, scale, gate from the global condition ``c``, gates zero at init so the block starts as
  the identity):
    1. spatial self-attention within each frame      (B*T sequences of L tokens)
    2. temporal self-attention at each position      (B*L sequences of T tokens)
    3. cross-attention from every latent token to the 50 ECG tokens. Queries are reshaped to
       ``(B, T*L, D)`` and attend to keys/values ``(B, S, D)``: the ECG keys exist once per video,
       never copied per spatial position (the official code repeats them L=144 times).
       The ECG tokens carry the same temporal sin-cos embedding as the frames, so frame ``t``
       can find "its" ECG token ``t`` (the tokens are phase-aligned to the 50 frames).
    4. MLP.
  All attention goes through ``F.scaled_dot_product_attention`` (self-attention via
  ``utils.attention``, which splits calls of more than 65,535 sequences: CUDA's kernel limit).
* **Frame-aligned ECG embedding**: the 50 ECG tokens are phase-aligned to the 50 frames (stage 1
  resamples one R-R cycle onto the frame grid), so token ``t`` is also projected and added to every
  latent token of frame ``t`` at the input. This is a cheap, strong prior (the motion of frame t
  is driven by the ECG at that phase); cross-attention still lets any frame read the whole cycle.
  Used when the number of ECG tokens equals the number of frames.
* **Global condition**: ``c = TimestepEmbedder(t) + MLP(pooled ECG)``.
* **Final layer**: adaLN (shift, scale) + linear to ``p*p*C``, zero-initialised, then unpatchify.
* **Null condition** (classifier-free guidance): learned ``null_tokens (S, E)`` and
  ``null_pooled (E,)``; ``forward(..., drop=mask)`` swaps them in for the rows where ``mask`` is
  True, so conditional and unconditional passes share one batched forward.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..utils.attention import sdpa

# ----------------------------------------------------------------------------------------------
# Fixed sin-cos positional embeddings
# ----------------------------------------------------------------------------------------------


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """``(N,)`` positions -> ``(N, dim)`` [sin | cos] embedding (dim even)."""
    assert dim % 2 == 0, "sin-cos embedding width must be even"
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = positions.to(torch.float64)[:, None] * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1).float()


def sincos_2d(dim: int, h: int, w: int) -> torch.Tensor:
    """``(h*w, dim)``: half the width encodes the row, half the column (dim divisible by 4)."""
    assert dim % 4 == 0, "2-D sin-cos embedding width must be divisible by 4"
    rows = torch.arange(h).repeat_interleave(w)
    cols = torch.arange(w).repeat(h)
    return torch.cat([sincos_1d(dim // 2, rows), sincos_1d(dim // 2, cols)], dim=1)


def sincos_3d(dim: int, t: int, h: int, w: int) -> torch.Tensor:
    """``(t, h*w, dim)`` = temporal 1-D embedding + spatial 2-D embedding (broadcast sum)."""
    return sincos_1d(dim, torch.arange(t))[:, None, :] + sincos_2d(dim, h, w)[None]


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------


def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``(B, D)`` -> broadcastable against ``like (B, ..., D)``."""
    return v.view((like.shape[0],) + (1,) * (like.dim() - 2) + (like.shape[-1],))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: ``x * (1 + scale) + shift`` with per-sample ``shift, scale (B, D)`` (one fused op)."""
    return torch.addcmul(_per_sample(shift, x), x, _per_sample(1 + scale, x))


def gated_residual(x: torch.Tensor, gate: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """``x + gate * branch`` with a per-sample ``gate (B, D)`` (one fused op)."""
    return torch.addcmul(x, _per_sample(gate, branch), branch)


class TimestepEmbedder(nn.Module):
    """Scalar flow time ``t in [0, 1]`` -> ``(B, D)`` via sinusoidal features and an MLP.
    ``t`` is scaled by 1000 so the frequencies cover the unit interval like DiT's integer steps."""

    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = (t.float() * 1000.0)[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class SelfAttention(nn.Module):
    """Multi-head self-attention over the second-to-last axis of ``(N, S, D)``."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, s, d = x.shape
        qkv = self.qkv(x).view(n, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = sdpa(qkv[0], qkv[1], qkv[2])                                 # (N, heads, S, d_h)
        return self.proj(out.transpose(1, 2).reshape(n, s, d))


class CrossAttention(nn.Module):
    """Queries ``(B, Nq, D)`` attend to a per-video context ``(B, S, D)``; the context is never
    expanded over queries (shape-checked in ``tests/test_dit.py``)."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(hidden, hidden)
        self.kv = nn.Linear(hidden, 2 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, nq, d = x.shape
        s = context.shape[1]
        dh = d // self.heads
        q = self.q(x).view(b, nq, self.heads, dh).transpose(1, 2)           # (B, heads, Nq, dh)
        kv = self.kv(context).view(b, s, 2, self.heads, dh).permute(2, 0, 3, 1, 4)  # (2, B, heads, S, dh)
        out = F.scaled_dot_product_attention(q, kv[0], kv[1])             # (B, heads, Nq, dh)
        return self.proj(out.transpose(1, 2).reshape(b, nq, d))


class DiTBlock(nn.Module):
    """Spatial attn -> temporal attn -> ECG cross-attn -> MLP, each adaLN-Zero gated.

    ``x``: ``(B, T, L, D)`` latent tokens; ``c``: ``(B, D)`` global condition;
    ``context``: ``(B, S, D)`` projected ECG tokens.
    """

    def __init__(self, hidden: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        norm = lambda: nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)  # noqa: E731
        self.norm_spatial, self.norm_temporal, self.norm_cross, self.norm_mlp = norm(), norm(), norm(), norm()
        self.attn_spatial = SelfAttention(hidden, heads)
        self.attn_temporal = SelfAttention(hidden, heads)
        self.attn_cross = CrossAttention(hidden, heads)
        mlp_hidden = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden, mlp_hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(mlp_hidden, hidden))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 12 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, t, n, d = x.shape
        (sh_s, sc_s, g_s, sh_t, sc_t, g_t,
         sh_c, sc_c, g_c, sh_m, sc_m, g_m) = self.adaLN_modulation(c).chunk(12, dim=1)

        # 1. spatial: (B*T, L, D) -- a view, no copy
        h = modulate(self.norm_spatial(x), sh_s, sc_s).reshape(b * t, n, d)
        x = gated_residual(x, g_s, self.attn_spatial(h).view(b, t, n, d))

        # 2. temporal: (B*L, T, D)
        h = modulate(self.norm_temporal(x), sh_t, sc_t).transpose(1, 2).reshape(b * n, t, d)
        x = gated_residual(x, g_t, self.attn_temporal(h).view(b, n, t, d).transpose(1, 2))

        # 3. cross-attention: all T*L latent tokens of a video -> that video's S ECG tokens
        h = modulate(self.norm_cross(x), sh_c, sc_c).reshape(b, t * n, d)
        x = gated_residual(x, g_c, self.attn_cross(h, context).view(b, t, n, d))

        # 4. MLP
        return gated_residual(x, g_m, self.mlp(modulate(self.norm_mlp(x), sh_m, sc_m)))


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.linear = nn.Linear(hidden, out_dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


class FlowDiT(nn.Module):
    """Velocity network ``v(z_t, t, ECG)``.

    Args:
        latent_channels, num_frames, latent_size: latent video shape ``(C, T, H=W)``.
        ecg_dim: width E of the stage-1 ECG tokens; ecg_tokens: their number S (50).
        pooled_dim: width P of the pooled condition it reads (default E; E + k with a morphology code of k
            numbers). A wider pooled input is read up to P: the code appended for the anchor alone
            (``flow.morphology_in=anchor``).
        hidden, depth, heads, patch_size, mlp_ratio: from the ``flow`` config section.
    """

    def __init__(self, latent_channels: int = 4, num_frames: int = 50, latent_size: int = 12,
                 ecg_dim: int = 128, ecg_tokens: int = 50, hidden: int = 128, depth: int = 4,
                 heads: int = 4, patch_size: int = 1, mlp_ratio: float = 4.0, pooled_dim: int | None = None):
        super().__init__()
        pooled_dim = int(pooled_dim or ecg_dim)
        if latent_size % patch_size:
            raise ValueError(f"latent size {latent_size} is not divisible by flow.patch_size={patch_size}")
        if hidden % heads or hidden % 4:
            raise ValueError(f"flow.hidden={hidden} must be divisible by flow.heads={heads} and by 4")
        self.arch = dict(latent_channels=latent_channels, num_frames=num_frames, latent_size=latent_size,
                         ecg_dim=ecg_dim, ecg_tokens=ecg_tokens, hidden=hidden, depth=depth, heads=heads,
                         patch_size=patch_size, mlp_ratio=mlp_ratio, pooled_dim=pooled_dim)
        self.channels, self.patch = latent_channels, patch_size
        self.grid = latent_size // patch_size
        self.x_embedder = nn.Linear(latent_channels * patch_size ** 2, hidden)
        self.t_embedder = TimestepEmbedder(hidden)
        self.ecg_proj = nn.Linear(ecg_dim, hidden)
        self.ecg_frame_proj = nn.Linear(ecg_dim, hidden) if ecg_tokens == num_frames else None
        self.pooled_embedder = nn.Sequential(nn.Linear(pooled_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.null_tokens = nn.Parameter(torch.zeros(ecg_tokens, ecg_dim))
        self.null_pooled = nn.Parameter(torch.zeros(pooled_dim))
        self.register_buffer("pos_embed", sincos_3d(hidden, num_frames, self.grid, self.grid), persistent=False)
        self.register_buffer("ecg_pos_embed", sincos_1d(hidden, torch.linspace(0, num_frames - 1, ecg_tokens)),
                             persistent=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden, heads, mlp_ratio) for _ in range(depth)])
        self.final = FinalLayer(hidden, latent_channels * patch_size ** 2)
        self.grad_checkpoint = False        # a training choice, not architecture: not in ``arch``
        self.initialize_weights()

    def initialize_weights(self) -> None:
        def _basic(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        self.apply(_basic)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        nn.init.normal_(self.null_tokens, std=0.02)
        nn.init.normal_(self.null_pooled, std=0.02)
        for block in self.blocks:                      # adaLN-Zero: every residual branch off
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final.linear.weight)       # zero velocity at init
        nn.init.zeros_(self.final.linear.bias)

    # -- patches <-> latent -------------------------------------------------------------------
    def patchify(self, z: torch.Tensor) -> torch.Tensor:
        """``(B, C, T, H, W)`` -> ``(B, T, L, C*p*p)``."""
        b, c, t, hh, ww = z.shape
        p, g = self.patch, self.grid
        z = z.view(b, c, t, g, p, g, p).permute(0, 2, 3, 5, 1, 4, 6)      # B T gh gw C p p
        return z.reshape(b, t, g * g, c * p * p)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, L, C*p*p)`` -> ``(B, C, T, H, W)``."""
        b, t, _, _ = x.shape
        p, g, c = self.patch, self.grid, self.channels
        x = x.view(b, t, g, g, c, p, p).permute(0, 4, 1, 2, 5, 3, 6)      # B C T gh p gw p
        return x.reshape(b, c, t, g * p, g * p)

    # -- conditioning -------------------------------------------------------------------------
    def apply_null(self, ecg_tokens: torch.Tensor, ecg_pooled: torch.Tensor,
                   drop: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Replace the condition by the learned null where ``drop (B,)`` is True."""
        if drop is None:
            return ecg_tokens, ecg_pooled
        keep = (~drop.bool()).to(ecg_tokens.dtype)
        tokens = (ecg_tokens * keep[:, None, None]
                  + self.null_tokens.to(ecg_tokens.dtype)[None] * (1 - keep[:, None, None]))
        pooled = ecg_pooled * keep[:, None] + self.null_pooled.to(ecg_pooled.dtype)[None] * (1 - keep[:, None])
        return tokens, pooled

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, ecg_tokens: torch.Tensor,
                ecg_pooled: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """``z_t (B, C, T, H, W)``, ``t (B,)``, ``ecg_tokens (B, S, E)``, ``ecg_pooled (B, P)``,
        ``drop (B,)`` bool (True = unconditional) -> velocity ``(B, C, T, H, W)``."""
        width = self.arch["pooled_dim"]
        if ecg_pooled.shape[-1] < width:
            raise ValueError(f"pooled ECG condition of width {ecg_pooled.shape[-1]}, the DiT reads {width}")
        ecg_tokens, ecg_pooled = self.apply_null(ecg_tokens, ecg_pooled[..., :width], drop)
        x = self.x_embedder(self.patchify(z_t)) + self.pos_embed.to(z_t.dtype)        # (B, T, L, D)
        if self.ecg_frame_proj is not None:                                            # frame t <- token t
            x = x + self.ecg_frame_proj(ecg_tokens).unsqueeze(2)
        context = self.ecg_proj(ecg_tokens) + self.ecg_pos_embed.to(z_t.dtype)         # (B, S, D)
        c = self.t_embedder(t) + self.pooled_embedder(ecg_pooled)                      # (B, D)
        for block in self.blocks:
            if self.grad_checkpoint and torch.is_grad_enabled():
                # recomputed in backward: only the block inputs stay saved (memory for compute)
                x = torch.utils.checkpoint.checkpoint(block, x, c, context, use_reentrant=False)
            else:
                x = block(x, c, context)
        return self.unpatchify(self.final(x, c))


def build_dit(flow_cfg, latent_shape: tuple[int, int, int, int], ecg_dim: int, ecg_tokens: int = 50,
              pooled_dim: int | None = None) -> FlowDiT:
    """``FlowDiT`` from the ``flow`` config section and the latent shape ``(C, T, H, W)``."""
    c, t, h, w = latent_shape
    if h != w:
        raise ValueError(f"latent frames must be square, got {h} x {w}")
    if getattr(flow_cfg, "arch", "project") != "project":
        from ..config import ConfigError

        raise ConfigError("config key 'flow.arch': train_flow.py trains this project's DiT (arch project); "
                          "flow.arch=official is for the published weights (python -m ecgflowcmr.convert_official)")
    dit = FlowDiT(latent_channels=c, num_frames=t, latent_size=h, ecg_dim=ecg_dim, ecg_tokens=ecg_tokens,
                  hidden=flow_cfg.hidden, depth=flow_cfg.depth, heads=flow_cfg.heads,
                  patch_size=flow_cfg.patch_size, mlp_ratio=flow_cfg.mlp_ratio, pooled_dim=pooled_dim)
    dit.grad_checkpoint = bool(getattr(flow_cfg, "grad_checkpoint", False))
    return dit


def dit_from_arch(arch: dict) -> nn.Module:
    """Rebuild from the ``arch`` dict stored in a flow checkpoint (``arch["arch"] == "official"``:
    the published weights' DiT, ``ecgflowcmr.flow.official``)."""
    if arch.get("arch", "project") == "official":
        from .official import OfficialDiT

        return OfficialDiT.from_arch(arch)
    return FlowDiT(**arch)
