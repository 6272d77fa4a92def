"""Stage 1 of the published weights: the official phase-aware ECG encoder and its decoder.

Shapes (B records, 12 leads, L = 5000 samples at 500 Hz, F = ``base_filters``, D = ``out_dim``,
P = L / 8 = 625 positions)::

    ecg (B, 12, L) times ``input_scale``; no normalisation (the official code feeds the stored
                   values as they are, and BatchNorm in eval mode makes the encoder scale-sensitive)
      -> stem: conv 7 stride 2, BN, ReLU, max-pool 3 stride 2                          (B, F, L/4)
      -> layer1 (F), layer2 (2F, stride 2), layer3 (4F), layer4 (8F)                  (B, 8F, P)
         two residual blocks each: conv3-BN-ReLU-conv3-BN plus a shortcut (1x1 conv + BN where
         the shape changes), ReLU
      -> feature_proj (1x1 conv)                            (B, D, P)  the features
      -> phase_head (1x1 conv to 256, ReLU, 1x1 conv to 2)  (B, 2, P)  (sin, cos) of the phase
    decoder: 1x1 conv to 8F; three times linear x2 upsampling, conv3, BN, ReLU (4F, 2F, F);
             conv7 to the 12 leads: (B, D, P) -> (B, 12, L)

Position p is centred on sample 8p (the strided convolutions and the pooling are centred), and the
official phase labels were read there (every 8th sample), whereas this project's encoder centres
position p on sample 8p + 3.5. The phase labels rise from 0 at an R-peak to 2 pi at the next one.

Cycle choice (``cycle_mode``):

* ``official``, the official cut on the P positions: atan2 of the head's (sin, cos) falls by more
  than 3 rad where the phase passes pi, i.e. mid-beat. With at least two such jumps the crop runs
  from the position after the middle jump's predecessor to the position after the middle jump
  (one mid-beat-to-mid-beat cycle); with fewer, the middle third of the record; a crop shorter than
  10 positions becomes the whole record (both flagged ``fallback``). The crop is resampled to
  ``num_tokens`` by linear interpolation (``align_corners=False``). The published flow was trained
  on these tokens, so this is the mode that reproduces it.
* ``median`` / ``ensemble`` / ``window``: this project's R-to-R cycles (``ecg/cycles.py``) on the
  same features, with the phase read on the 8p grid.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..contract import ECG_FS as FS
from ..contract import NUM_LEADS
from ..utils.checkpoint import state_hash
from ..utils.device import fp16_autocast
from .cycles import MODES, CycleOutput, roi_align, select_cycles
from .pamae import check_ecg

STRIDE = 8                       # samples per feature position
PHASE_HIDDEN = 256               # hidden width of the phase head (fixed in the official code)
JUMP = -3.0                      # rad: a fall of atan2 by more than this is the phase passing pi
MIN_CROP = 10                    # positions: a shorter official crop falls back to the whole record
CYCLE_MODES = MODES + ("official",)


class ResidualBlock1d(nn.Module):
    """conv3 (stride s) - BN - ReLU - conv3 - BN, plus the input (1x1 conv + BN where the shape
    changes), then ReLU. ``(B, C_in, N)`` -> ``(B, C_out, N / s)``."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv1d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm1d(c_out)
        self.conv2 = nn.Conv1d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm1d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv1d(c_in, c_out, 1, stride=stride, bias=False),
                                            nn.BatchNorm1d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.downsample is None else self.downsample(x)
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + skip)


def _stage(c_in: int, c_out: int, stride: int, blocks: int = 2) -> nn.Sequential:
    rest = [ResidualBlock1d(c_out, c_out) for _ in range(blocks - 1)]
    return nn.Sequential(ResidualBlock1d(c_in, c_out, stride), *rest)


# ----------------------------------------------------------------------------------------------
# Phase and cycles on the 8p grid
# ----------------------------------------------------------------------------------------------


def phase_on_samples(sincos: torch.Tensor, length: int, stride: int = STRIDE) -> torch.Tensor:
    """``(B, 2, P)`` (sin, cos) at samples ``stride * p`` -> ``(B, length)`` phase in [0, 2 pi):
    sin and cos interpolated linearly between positions (held after the last), then atan2."""
    positions = sincos.shape[-1]
    coord = torch.arange(length, device=sincos.device, dtype=torch.float64) / stride
    i0 = coord.floor().long().clamp(max=positions - 1)
    i1 = (i0 + 1).clamp(max=positions - 1)
    w = (coord - i0.to(coord.dtype)).clamp(0, 1).float()
    s = sincos.float()
    values = s[..., i0] * (1 - w) + s[..., i1] * w
    return torch.remainder(torch.atan2(values[:, 0], values[:, 1]), 2 * math.pi)


@torch.no_grad()
def official_cut(sincos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The official cycle on ``(B, 2, P)`` (sin, cos): ``start``, ``end`` (B,) int64 positions
    (end exclusive) and ``fallback`` (B,) bool. See the module docstring."""
    angle = torch.atan2(sincos[:, 0], sincos[:, 1])      # in the head's dtype, as the official code
    positions = angle.shape[1]
    falls = (angle[:, 1:] - angle[:, :-1]) < JUMP
    starts, ends, fallback = [], [], []
    for row in falls:
        jumps = torch.nonzero(row).flatten().tolist()
        if len(jumps) < 2:
            start, end, fell_back = positions // 3, 2 * positions // 3, True
        else:
            mid = len(jumps) // 2
            start, end, fell_back = jumps[mid - 1] + 1, jumps[mid] + 1, False
            if end - start < MIN_CROP:
                start, end, fell_back = 0, positions, True
        starts.append(start)
        ends.append(end)
        fallback.append(fell_back)
    as_tensor = lambda values, dtype: torch.tensor(values, dtype=dtype, device=sincos.device)  # noqa: E731
    return as_tensor(starts, torch.int64), as_tensor(ends, torch.int64), as_tensor(fallback, torch.bool)


def crop_resample(x: torch.Tensor, start: torch.Tensor, end: torch.Tensor, size: int) -> torch.Tensor:
    """``(B, C, P)`` -> ``(B, C, size)``: each row's ``[start, end)`` resampled linearly
    (``align_corners=False``), row by row as the official ROI-Align does (differentiable in x)."""
    rows = [F.interpolate(x[b:b + 1, :, int(s):int(e)], size=size, mode="linear", align_corners=False)
            for b, (s, e) in enumerate(zip(start.tolist(), end.tolist()))]
    return torch.cat(rows, dim=0)


# ----------------------------------------------------------------------------------------------
# Encoder, decoder
# ----------------------------------------------------------------------------------------------


class OfficialECGEncoder(nn.Module):
    """The official stage-1 encoder with this project's encoder interface:
    ``enc(ecg (B, 12, 5000)) -> CycleOutput`` (tokens (B, T, D), pooled, phase (B, 5000), start,
    end, fallback). Parameter names are the official ones (``stem.0.weight``, ``layer1.0.bn1.*``,
    ``feature_proj.*``, ``phase_head.*``)."""

    def __init__(self, out_dim: int = 768, base_filters: int = 64, num_tokens: int = 50,
                 cycle_mode: str = "official", input_scale: float = 1.0, in_channels: int = NUM_LEADS):
        super().__init__()
        if cycle_mode not in CYCLE_MODES:
            raise ValueError(f"cycle_mode must be one of {CYCLE_MODES}, got {cycle_mode!r}")
        f = base_filters
        self.out_dim, self.base_filters, self.num_tokens = out_dim, base_filters, num_tokens
        self.cycle_mode, self.input_scale, self.stride = cycle_mode, float(input_scale), STRIDE
        self.stem = nn.Sequential(nn.Conv1d(in_channels, f, 7, stride=2, padding=3, bias=False), nn.BatchNorm1d(f),
                                  nn.ReLU(), nn.MaxPool1d(3, stride=2, padding=1))
        self.layer1 = _stage(f, f, 1)
        self.layer2 = _stage(f, 2 * f, 2)
        self.layer3 = _stage(2 * f, 4 * f, 1)
        self.layer4 = _stage(4 * f, 8 * f, 1)
        self.feature_proj = nn.Conv1d(8 * f, out_dim, 1)
        self.phase_head = nn.Sequential(nn.Conv1d(8 * f, PHASE_HIDDEN, 1), nn.ReLU(), nn.Conv1d(PHASE_HIDDEN, 2, 1))

    @classmethod
    def from_config(cls, ecg_cfg, cycle_mode: str | None = None) -> OfficialECGEncoder:
        return cls(ecg_cfg.width, ecg_cfg.base_filters, ecg_cfg.num_tokens, cycle_mode or ecg_cfg.cycle_mode,
                   ecg_cfg.input_scale)

    @property
    def dim(self) -> int:
        return self.out_dim

    def state_hash(self) -> str:
        return state_hash(self.state_dict())

    def raw(self, ecg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, 12, L)`` -> features ``(B, D, L/8)`` and (sin, cos) ``(B, 2, L/8)`` (the official
        ``force_indices="return_raw"`` output)."""
        with fp16_autocast(ecg.device.type):
            h = self.stem(ecg * self.input_scale)
            h = self.layer4(self.layer3(self.layer2(self.layer1(h))))
            return self.feature_proj(h), self.phase_head(h)

    def features(self, ecg: torch.Tensor) -> torch.Tensor:
        """``(B, 12, L)`` -> ``(B, L/8, D)`` features (no cycle)."""
        return self.raw(ecg)[0].transpose(1, 2)

    def forward(self, ecg: torch.Tensor, cycle_mode: str | None = None) -> CycleOutput:
        check_ecg(ecg)
        mode = cycle_mode or self.cycle_mode
        if mode not in CYCLE_MODES:
            raise ValueError(f"cycle_mode must be one of {CYCLE_MODES}, got {mode!r}")
        feats, sincos = self.raw(ecg)
        phase = phase_on_samples(sincos, ecg.shape[-1], self.stride)
        if mode == "official":
            start, end, fallback = official_cut(sincos)
            tokens = crop_resample(feats, start, end, self.num_tokens).transpose(1, 2)
            return CycleOutput(tokens=tokens, pooled=tokens.mean(dim=1), phase=phase, start=start * self.stride,
                               end=end * self.stride, fallback=fallback)
        selection = select_cycles(phase, mode, self.num_tokens, FS)
        # roi_align centres position p on sample 8p + 3.5; here it is 8p: shift the token times
        centred = dataclasses.replace(selection, times=selection.times + (self.stride - 1) / 2)
        tokens = roi_align(feats.transpose(1, 2), centred, self.stride)
        return CycleOutput(tokens=tokens, pooled=tokens.mean(dim=1), phase=phase, start=selection.start,
                           end=selection.end, fallback=selection.fallback, wraps=selection.wraps)

    extract_cycle = forward

    def official_forward(self, ecg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the official ``forward(ecg)`` returns: tokens ``(B, T, D)`` of the official cut and
        the phase angle ``(B, T)`` in (-pi, pi] resampled with them."""
        feats, sincos = self.raw(ecg)
        start, end, _ = official_cut(sincos)
        tokens = crop_resample(feats, start, end, self.num_tokens)
        phase = crop_resample(sincos, start, end, self.num_tokens)
        return tokens.transpose(1, 2), torch.atan2(phase[:, 0], phase[:, 1])


def _upsample_stage(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="linear", align_corners=False),
                         nn.Conv1d(c_in, c_out, 3, padding=1), nn.BatchNorm1d(c_out), nn.ReLU())


class OfficialECGDecoder(nn.Module):
    """``(B, D, P)`` features -> ``(B, 12, 8P)`` ECG in the units the encoder was fed."""

    def __init__(self, in_dim: int = 768, out_channels: int = NUM_LEADS, base_filters: int = 64):
        super().__init__()
        f = base_filters
        self.proj = nn.Conv1d(in_dim, 8 * f, 1)
        self.up1 = _upsample_stage(8 * f, 4 * f)
        self.up2 = _upsample_stage(4 * f, 2 * f)
        self.up3 = _upsample_stage(2 * f, f)
        self.final_conv = nn.Conv1d(f, out_channels, 7, padding=3)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        with fp16_autocast(feats.device.type):
            return self.final_conv(self.up3(self.up2(self.up1(self.proj(feats)))))


class OfficialPAMAE(nn.Module):
    """The stage-1 checkpoint's model: ``encoder`` and ``decoder`` (state-dict keys ``encoder.*``,
    ``decoder.*``, as the official training wrapper saved them)."""

    def __init__(self, out_dim: int = 768, base_filters: int = 64, num_tokens: int = 50,
                 cycle_mode: str = "official", input_scale: float = 1.0, mask_ratio: float = 0.5):
        super().__init__()
        self.mask_ratio = mask_ratio
        self.encoder = OfficialECGEncoder(out_dim, base_filters, num_tokens, cycle_mode, input_scale)
        self.decoder = OfficialECGDecoder(out_dim, NUM_LEADS, base_filters)

    @classmethod
    def from_config(cls, ecg_cfg) -> OfficialPAMAE:
        return cls(ecg_cfg.width, ecg_cfg.base_filters, ecg_cfg.num_tokens, ecg_cfg.cycle_mode,
                   ecg_cfg.input_scale, ecg_cfg.mask_ratio)

    def reconstruct(self, ecg: torch.Tensor) -> torch.Tensor:
        """``(B, 12, L)`` -> unmasked reconstruction ``(B, 12, L)`` of ``ecg * input_scale``."""
        return self.decoder(self.encoder.raw(ecg)[0])

    def forward(self, ecg: torch.Tensor, mask_ratio: float | None = None,
                generator: torch.Generator | None = None, target: torch.Tensor | None = None) -> dict:
        """The official masked reconstruction: each feature position zeroed with probability
        ``mask_ratio``. Returns ``{"recon", "target" (the scaled input), "sincos" (B, P, 2),
        "mask" (B, P) True = masked}`` like ``PAMAE.forward``."""
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        feats, sincos = self.encoder.raw(ecg)
        b, _, p = feats.shape
        keep = torch.rand(b, 1, p, generator=generator).to(feats.device) > ratio
        recon = self.decoder(feats * keep.to(feats.dtype))
        scale = self.encoder.input_scale
        return {"recon": recon, "target": (ecg if target is None else target) * scale,
                "sincos": sincos.transpose(1, 2), "mask": ~keep[:, 0]}
