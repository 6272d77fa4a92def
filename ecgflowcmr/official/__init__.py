"""The networks of the published ECGFlowCMR weights (UK Biobank), behind this project's interfaces.

The official code (github.com/PKUDigitalHealth/ECGFlowCMR) trained three networks that differ from
this project's own; the modules here rebuild them with the same parameter names, so their state
dicts load unchanged, and with the call signatures the generator uses:

    ecg.py    ``OfficialECGEncoder`` (ResNet-style 1-D CNN with BatchNorm, 8x downsampling, a
              feature projection and a phase head) -> ``CycleOutput``; ``OfficialECGDecoder``;
              ``OfficialPAMAE`` (both, as in the stage-1 checkpoint); the official cycle cut
    vae.py    ``OfficialVAE3D``: 3-D VAE with dense attention at its two lowest resolutions and
              the middle, ``(C, C, 1, 3, 3)`` downsampling convolutions, no temporal compression
    dit.py    ``OfficialDiT``: learned (1, T, H*W, D) positions, blocks temporal -> cross ->
              spatial -> MLP, exact GELU, global condition = MLP(mean projected ECG token),
              null condition = zeroed ECG features
    checkpoints.py   reading the official files (training dicts or bare state dicts)
    units.py         which ECG scaling the stage-1 weights expect (reconstruction, R-peaks)
    fakes.py         random-weight checkpoints in the official formats (tests, the fixture)
    equivalence.py   this project's side of the fixture comparison (tests/data/official/)

Configs select them with ``ecg.arch``, ``vae.arch`` and ``flow.arch`` = ``official``;
``python -m ecgflowcmr.convert_official`` writes a run folder from the published files
(docs/official_weights.md).
"""
from __future__ import annotations

import contextlib

import torch


def fp16_autocast(device_type: str):
    """The official networks trained under fp16 autocast: where the caller enabled CUDA autocast
    (this project's is bf16), run them in fp16 as they were trained; otherwise change nothing."""
    if device_type == "cuda" and torch.is_autocast_enabled("cuda"):
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()
