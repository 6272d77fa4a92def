"""Phase-Aware Masked Autoencoder (PA-MAE) for 12-lead ECGs.

Shapes (B records, 12 leads, L = 5000 samples at 500 Hz, stride S = 8, P = L / S = 625 positions,
D = ``ecg.width``)::

    ecg (B, 12, L) mV
      -> ECGNormalizer: minus the per-lead median of the record, divided by a fixed per-lead scale
         (RMS of the training set, a buffer saved with the weights; not per record, so that the
         QRS voltage, which carries hypertrophy, reaches the features)
      -> ConvStem: three stride-2 1-D ResNet stages 12 -> D/4 -> D/2 -> D, then five dilated
         residual blocks (dilation 1..16) at the P level                               (B, P, D)
      -> masking (training only): exactly round(rho * P) positions per record replaced by a learned
         mask token (initialised at zero, i.e. "zeroed" at the start of training)
      -> + sinusoidal positions, ``depth`` pre-LN transformer blocks with rotary position
         embedding on queries and keys, LayerNorm                        -> features (B, P, D)
    decoder: ``decoder_depth`` transformer blocks + a linear "unpatchify" to 12 x S samples per
             position -> (B, 12, L) reconstruction of the normalised ECG (MSE over all samples)
    phase head: MLP on the features of the *unmasked* input -> (sin phi, cos phi) at every position
             (MSE against labels from ``phase.py``, averaged over each position's S samples)

Why a convolutional stem and a transformer: an R-peak is a local shape that a few convolutions find
and place to within a sample, and the stem gives the 8x downsampling cheaply; but the phase of a
sample depends on where the previous and the *next* R-peaks are (up to 1.5 s = 190 positions away at
40 bpm), which a transformer sees in one layer and a CNN only with a very deep stack. The masked
reconstruction makes the same features carry the waveform morphology. Three choices made training
converge in the few hundred CPU steps of the demo (measured on phantom ECGs, phase error after 120
steps): the dilated blocks (local beat context before attention; 0.19 -> 0.14 rad at 60 steps),
q/k weights initialised with Xavier rather than std 0.02 (attention is not uniform from the start;
0.25 -> 0.19 rad at 60 steps), and rotary positions (relative timing; reconstruction MSE 0.61 ->
0.43 at equal phase error, 0.12 vs 0.13 rad).

Training runs the transformer on both the masked input (for reconstruction) and the unmasked input
(for the phase head, since inference never masks): the two are stacked into one batch of 2B, the
stem is shared. Loss = L_rec + lambda * L_phase (``ecg.phase_weight``); lambda = 1 balances them:
the gradient norms of the two terms on the encoder are within a factor 1.3-3 of each other, from
initialisation to the end of a demo run.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..contract import ECG_SAMPLES as ECG_LENGTH
from ..contract import NUM_LEADS

STRIDE = 8
NUM_POSITIONS = ECG_LENGTH // STRIDE
DILATIONS = (1, 2, 4, 8, 16)     # dilated residual blocks at the 625-position level of the stem


def check_ecg(ecg: torch.Tensor) -> None:
    """Raise a clear error unless ``ecg`` is a float (B, 12, 5000) tensor."""
    if not isinstance(ecg, torch.Tensor):
        raise TypeError(f"ecg must be a torch.Tensor of shape (B, 12, 5000), got {type(ecg).__name__}")
    if ecg.ndim != 3 or ecg.shape[1] != NUM_LEADS or ecg.shape[2] != ECG_LENGTH:
        hint = " (add a batch dimension: ecg[None])" if ecg.ndim == 2 else ""
        raise ValueError(f"ecg must have shape (B, {NUM_LEADS}, {ECG_LENGTH}) = 10 s, 12 leads at 500 Hz, "
                         f"got {tuple(ecg.shape)}{hint}")
    if not ecg.is_floating_point():
        raise TypeError(f"ecg must be a float tensor in mV, got {ecg.dtype}")


def sinusoidal_positions(num: int, dim: int) -> torch.Tensor:
    """(num, dim) fixed sine/cosine position table."""
    pos = torch.arange(num, dtype=torch.float32)[:, None]
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    table = torch.zeros(num, dim)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return table


class ECGNormalizer(nn.Module):
    """(B, 12, L) mV -> (B, 12, L): minus the per-lead median, divided by ``lead_scale`` (12,)."""

    def __init__(self, leads: int = NUM_LEADS):
        super().__init__()
        self.register_buffer("lead_scale", torch.ones(leads))

    @torch.no_grad()
    def fit(self, ecgs: np.ndarray | torch.Tensor) -> None:
        """Set ``lead_scale`` to the per-lead RMS of median-removed training records (N, 12, L)."""
        x = torch.as_tensor(np.asarray(ecgs, dtype=np.float32))
        x = x - x.median(dim=-1, keepdim=True).values
        rms = x.pow(2).mean(dim=(0, 2)).sqrt()
        self.lead_scale.copy_(rms.clamp_min(1e-3).to(self.lead_scale))

    def forward(self, ecg: torch.Tensor) -> torch.Tensor:
        ecg = ecg - ecg.median(dim=-1, keepdim=True).values
        return ecg / self.lead_scale[:, None].to(ecg.dtype)


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(8, channels), channels)


class ResBlock1d(nn.Module):
    """Pre-activation residual block (GroupNorm: per-record, so outputs do not depend on the batch)."""

    def __init__(self, channels: int, kernel: int = 5, dilation: int = 1):
        super().__init__()
        pad = dilation * (kernel // 2)
        self.body = nn.Sequential(
            _group_norm(channels), nn.GELU(),
            nn.Conv1d(channels, channels, kernel, padding=pad, dilation=dilation),
            _group_norm(channels), nn.GELU(),
            nn.Conv1d(channels, channels, kernel, padding=kernel // 2))

    def forward(self, x):
        return x + self.body(x)


class ConvStem(nn.Module):
    """(B, 12, L) -> (B, L/8, D): three stride-2 stages (conv + ResBlock), then dilated ResBlocks
    (dilations 1..16, kernel 3: a receptive field of about +-0.5 s around each position)."""

    def __init__(self, width: int, leads: int = NUM_LEADS):
        super().__init__()
        chans = [leads, max(width // 4, 16), max(width // 2, 32), width]
        layers = []
        for c_in, c_out in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv1d(c_in, c_out, 7, stride=2, padding=3), ResBlock1d(c_out)]
        layers += [ResBlock1d(width, 3, d) for d in DILATIONS]
        layers += [_group_norm(width), nn.GELU(), nn.Conv1d(width, width, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x).transpose(1, 2)


def rotary_tables(num: int, head_dim: int, base: float = 1000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(num, head_dim) cos and sin tables of rotary position embedding (wavelengths 2pi to
    2pi * base positions: from one position to the whole record)."""
    inv_freq = base ** (-torch.arange(0, head_dim // 2, dtype=torch.float32) / max(head_dim // 2 - 1, 1))
    angle = torch.arange(num, dtype=torch.float32)[:, None] * inv_freq[None]
    angle = torch.cat([angle, angle], dim=-1)
    return angle.cos(), angle.sin()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class TransformerBlock(nn.Module):
    """Pre-LN self-attention (rotary positions on queries and keys) + MLP over (B, N, D)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x, rope: tuple[torch.Tensor, torch.Tensor] | None = None):
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = _rotate(q, *rope), _rotate(k, *rope)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + self.proj(attn)
        return x + self.mlp(self.norm2(x))


def _init_weights(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    for m in module.modules():          # larger q/k than 0.02: attention is not uniform from step 0
        if isinstance(m, TransformerBlock):
            nn.init.xavier_uniform_(m.qkv.weight)


def random_mask(batch: int, positions: int, ratio: float, device=None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, P) bool, True = masked; exactly ``round(ratio * P)`` positions per record."""
    count = int(round(ratio * positions))
    noise = torch.rand(batch, positions, generator=generator)
    rank = noise.argsort(dim=1).argsort(dim=1)
    return (rank < count).to(device)


class ECGBackbone(nn.Module):
    """Normaliser + conv stem + (masked) transformer + phase head. The part stage 3 keeps."""

    def __init__(self, width: int = 128, depth: int = 4, heads: int = 4, length: int = ECG_LENGTH,
                 stride: int = STRIDE):
        super().__init__()
        if width % heads:
            raise ValueError(f"ecg.width={width} must be divisible by ecg.heads={heads}")
        self.width, self.length, self.stride = width, length, stride
        self.positions = length // stride
        self.normalizer = ECGNormalizer()
        self.stem = ConvStem(width)
        self.mask_token = nn.Parameter(torch.zeros(width))
        self.register_buffer("pos", sinusoidal_positions(self.positions, width), persistent=False)
        cos, sin = rotary_tables(self.positions, width // heads)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.blocks = nn.ModuleList([TransformerBlock(width, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.phase_head = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, 2))
        _init_weights(self)

    @property
    def dim(self) -> int:
        return self.width

    def embed(self, ecg: torch.Tensor) -> torch.Tensor:
        """(B, 12, L) mV -> (B, P, D) stem tokens."""
        check_ecg(ecg)
        return self.stem(self.normalizer(ecg))

    def contextualise(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, P, D) stem tokens (+ (B, P) bool mask) -> (B, P, D) features."""
        if mask is not None:
            tokens = torch.where(mask[..., None], self.mask_token.to(tokens.dtype), tokens)
        x = tokens + self.pos.to(tokens.dtype)
        for block in self.blocks:
            x = block(x, (self.rope_cos, self.rope_sin))
        return self.norm(x)

    def features(self, ecg: torch.Tensor) -> torch.Tensor:
        """(B, 12, L) -> (B, P, D) features of the unmasked input."""
        return self.contextualise(self.embed(ecg))

    def phase_sincos(self, features: torch.Tensor) -> torch.Tensor:
        """(B, P, D) -> (B, P, 2) predicted (sin phi, cos phi) (not normalised)."""
        return self.phase_head(features)


class PAMAEDecoder(nn.Module):
    """(B, P, D) features -> (B, 12, P * stride) normalised ECG."""

    def __init__(self, width: int, depth: int, heads: int, positions: int, stride: int,
                 leads: int = NUM_LEADS):
        super().__init__()
        self.stride, self.leads = stride, leads
        self.proj = nn.Linear(width, width)
        self.register_buffer("pos", sinusoidal_positions(positions, width), persistent=False)
        cos, sin = rotary_tables(positions, width // heads)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.blocks = nn.ModuleList([TransformerBlock(width, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, leads * stride)
        _init_weights(self)

    def forward(self, features):
        x = self.proj(features) + self.pos.to(features.dtype)
        for block in self.blocks:
            x = block(x, (self.rope_cos, self.rope_sin))
        out = self.head(self.norm(x))                                   # (B, P, 12 * S)
        b, p, _ = out.shape
        return out.reshape(b, p, self.leads, self.stride).permute(0, 2, 1, 3).reshape(b, self.leads, p * self.stride)


class PAMAE(nn.Module):
    """The whole stage-1 model. ``encoder`` is what ``encoder.ECGEncoder`` loads."""

    def __init__(self, width: int = 128, depth: int = 4, heads: int = 4, decoder_depth: int = 2,
                 mask_ratio: float = 0.5):
        super().__init__()
        self.mask_ratio = mask_ratio
        self.encoder = ECGBackbone(width, depth, heads)
        self.decoder = PAMAEDecoder(width, decoder_depth, heads, self.encoder.positions, self.encoder.stride)

    @classmethod
    def from_config(cls, ecg_cfg) -> PAMAE:
        _refuse_official(ecg_cfg)
        return cls(ecg_cfg.width, ecg_cfg.depth, ecg_cfg.heads, ecg_cfg.decoder_depth, ecg_cfg.mask_ratio)

    def forward(self, ecg: torch.Tensor, mask_ratio: float | None = None,
                generator: torch.Generator | None = None, target: torch.Tensor | None = None) -> dict:
        """ecg (B, 12, L) mV -> {"recon" (B, 12, L), "target" (B, 12, L) normalised ECG,
        "sincos" (B, P, 2) from the unmasked input, "mask" (B, P) bool}. ``target`` (B, 12, L) mV:
        what to reconstruct, when not ``ecg`` itself (the record before noise was added to it)."""
        enc = self.encoder
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        tokens = enc.embed(ecg)
        b = tokens.shape[0]
        mask = random_mask(b, enc.positions, ratio, tokens.device, generator)
        both = torch.cat([tokens, tokens], dim=0)
        both_mask = torch.cat([mask, torch.zeros_like(mask)], dim=0)
        feats = enc.contextualise(both, both_mask)
        masked_feats, clean_feats = feats[:b], feats[b:]
        return {"recon": self.decoder(masked_feats), "target": enc.normalizer(ecg if target is None else target),
                "sincos": enc.phase_sincos(clean_feats), "mask": mask}


def _refuse_official(ecg_cfg) -> None:
    """Training builds this project's PA-MAE; the official encoder only loads converted weights."""
    if getattr(ecg_cfg, "arch", "project") != "project":
        from ..config import ConfigError

        raise ConfigError("config key 'ecg.arch': train_ecg.py trains this project's PA-MAE (arch project); "
                          "ecg.arch=official is for the published weights (python -m ecgflowcmr.convert_official)")


def pamae_losses(out: dict, phase_label: torch.Tensor, phase_weight: float) -> dict:
    """Losses from ``PAMAE.forward`` and (B, P, 2) (sin, cos) labels: {"loss", "rec", "phase"}."""
    rec = F.mse_loss(out["recon"].float(), out["target"].float())
    phase = F.mse_loss(out["sincos"].float(), phase_label.float())
    return {"loss": rec + phase_weight * phase, "rec": rec, "phase": phase}


def sincos_to_phase(sincos: torch.Tensor, length: int) -> torch.Tensor:
    """(B, P, 2) (sin, cos) at position centres -> (B, length) phase in [0, 2pi), linear upsampling
    of sin and cos (position p centred on sample p * S + (S - 1) / 2), then atan2."""
    up = F.interpolate(sincos.float().transpose(1, 2), size=length, mode="linear", align_corners=False)
    return torch.remainder(torch.atan2(up[:, 0], up[:, 1]), 2 * math.pi)


def circular_abs_error(pred: torch.Tensor | np.ndarray, true: torch.Tensor | np.ndarray):
    """|pred - true| wrapped to [0, pi] (radians)."""
    diff = pred - true
    if isinstance(diff, torch.Tensor):
        return (torch.remainder(diff + math.pi, 2 * math.pi) - math.pi).abs()
    return np.abs(np.remainder(diff + np.pi, 2 * np.pi) - np.pi)
