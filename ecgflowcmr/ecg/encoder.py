"""The stable stage-1 API for stages 3 and 4, the benchmarks and the tests.

::

    from ecgflowcmr.ecg.encoder import load_ecg_encoder, CycleOutput
    enc = load_ecg_encoder("runs/demo/ecg/best.pt", device)     # eval mode, rebuilt from ckpt["config"]
    out: CycleOutput = enc(ecg)         # ecg (B, 12, 5000) float mV; never masks
    out.tokens    # (B, 50, D)  features of one R-R cycle resampled on the phase axis
                  #             (differentiable wrt the encoder parameters)
    out.pooled    # (B, D)      mean over tokens (adaLN conditioning)
    out.phase     # (B, 5000)   predicted phase in [0, 2pi), 0 at R-peaks
    out.start, out.end          # (B,) int64 samples (500 Hz) of the chosen cycle's R-peaks
    out.fallback  # (B,) bool   fewer than one complete cycle: centre 1 s window used instead
    enc.dim, enc.state_hash()

    enc = ECGEncoder.from_config(cfg.ecg)   # untrained, e.g. to load a fine-tuned state dict
    enc = build_ecg_encoder(cfg.ecg)        # the same for either ecg.arch (project, official)

``enc.extract_cycle(ecg)`` is the same as ``enc(ecg)``. The cycle rules (median / ensemble / window,
the fallback) are documented in ``ecgflowcmr.ecg.cycles``.
"""
from __future__ import annotations

import os

import torch

from ..contract import ECG_FS as FS
from ..utils.checkpoint import load_checkpoint, state_hash
from .cycles import MODES, CycleOutput, roi_align, select_cycles
from .pamae import ECGBackbone, check_ecg, sincos_to_phase


class ECGEncoder(ECGBackbone):
    """The PA-MAE encoder with cycle extraction. Same parameters (and state-dict keys) as
    ``PAMAE.encoder``."""

    def __init__(self, width: int = 128, depth: int = 4, heads: int = 4, num_tokens: int = 50,
                 cycle_mode: str = "median"):
        super().__init__(width, depth, heads)
        if cycle_mode not in MODES:
            raise ValueError(f"cycle_mode must be one of {MODES}, got {cycle_mode!r}")
        self.num_tokens = num_tokens
        self.cycle_mode = cycle_mode

    @classmethod
    def from_config(cls, ecg_cfg, cycle_mode: str | None = None) -> ECGEncoder:
        return cls(ecg_cfg.width, ecg_cfg.depth, ecg_cfg.heads, ecg_cfg.num_tokens,
                   cycle_mode or ecg_cfg.cycle_mode)

    def state_hash(self) -> str:
        return state_hash(self.state_dict())

    def forward(self, ecg: torch.Tensor, cycle_mode: str | None = None) -> CycleOutput:
        check_ecg(ecg)
        features = self.features(ecg)                                     # (B, P, D)
        phase = sincos_to_phase(self.phase_sincos(features), ecg.shape[-1])
        selection = select_cycles(phase, cycle_mode or self.cycle_mode, self.num_tokens, FS)
        tokens = roi_align(features, selection, self.stride)
        return CycleOutput(tokens=tokens, pooled=tokens.mean(dim=1), phase=phase, start=selection.start,
                           end=selection.end, fallback=selection.fallback, wraps=selection.wraps)

    extract_cycle = forward


def build_ecg_encoder(ecg_cfg, cycle_mode: str | None = None):
    """The untrained encoder an ``ECGConfig`` names: this project's (``ecg.arch=project``) or the
    published weights' (``official``, ``ecgflowcmr.ecg.official``); both give ``CycleOutput``s."""
    if getattr(ecg_cfg, "arch", "project") == "official":
        from .official import OfficialECGEncoder

        return OfficialECGEncoder.from_config(ecg_cfg, cycle_mode)
    return ECGEncoder.from_config(ecg_cfg, cycle_mode)


def encoder_state_from_pamae(model_state: dict) -> dict:
    """``PAMAE`` state dict -> the ``ECGEncoder`` state dict (keys under ``encoder.``)."""
    return {k[len("encoder."):]: v for k, v in model_state.items() if k.startswith("encoder.")}


def _ecg_config(ckpt: dict, path):
    """The ``ECGConfig`` a stage-1 checkpoint was trained with."""
    from ..config import section_from_dict

    if "ecg" not in ckpt.get("config", {}) or "model" not in ckpt:
        raise ValueError(f"'{path}' is not a stage-1 checkpoint (no model / config.ecg inside)")
    return section_from_dict("ecg", ckpt["config"]["ecg"])


def load_ecg_encoder(path: str | os.PathLike, device: str | torch.device = "cpu",
                     cycle_mode: str | None = None) -> ECGEncoder:
    """Rebuild the encoder from a stage-1 checkpoint (``runs/<exp>/ecg/best.pt``), in eval mode.
    ``cycle_mode`` overrides the one the checkpoint's config names."""
    ckpt = load_checkpoint(path, map_location="cpu", stage_hint="train_ecg.py")
    encoder = build_ecg_encoder(_ecg_config(ckpt, path), cycle_mode)
    encoder.load_state_dict(encoder_state_from_pamae(ckpt["model"]))
    return encoder.to(device).eval()


def load_pamae(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """The whole PA-MAE (encoder, decoder, phase head) of a stage-1 checkpoint, in eval mode,
    and its ``ECGConfig``."""
    from .pamae import PAMAE

    ckpt = load_checkpoint(path, map_location="cpu", stage_hint="train_ecg.py")
    ecg_cfg = _ecg_config(ckpt, path)
    if ecg_cfg.arch == "official":
        from .official import OfficialPAMAE as PAMAE
    model = PAMAE.from_config(ecg_cfg)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ecg_cfg
