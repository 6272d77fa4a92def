"""The networks of the published ECGFlowCMR weights (UK Biobank), behind this project's interfaces.

The official code (github.com/PKUDigitalHealth/ECGFlowCMR) trained three networks that differ from
this project's own. Each is rebuilt, with the same parameter names (so its state dict loads
unchanged) and the call signatures the generator uses, in the stage package it belongs to:

    ecg/official.py    ``OfficialECGEncoder`` (ResNet-style 1-D CNN with BatchNorm, 8x downsampling,
                       a feature projection and a phase head) -> ``CycleOutput``;
                       ``OfficialECGDecoder``; ``OfficialPAMAE`` (both, as in the stage-1
                       checkpoint); the official cycle cut
    vae/official.py    ``OfficialVAE3D``: 3-D VAE with dense attention at its two lowest resolutions
                       and the middle, ``(C, C, 1, 3, 3)`` downsampling convolutions, no temporal
                       compression
    flow/official.py   ``OfficialDiT``: learned (1, T, H*W, D) positions, blocks temporal -> cross ->
                       spatial -> MLP, exact GELU, global condition = MLP(mean projected ECG token),
                       null condition = zeroed ECG features

This subpackage holds what works on the official files, above the stages:

    checkpoints.py   reading the official files (training dicts or bare state dicts)
    units.py         which ECG scaling the stage-1 weights expect (reconstruction, R-peaks)
    fakes.py         random-weight checkpoints in the official formats (tests, the fixture)
    equivalence.py   this project's side of the fixture comparison (tests/data/official/)

Configs select them with ``ecg.arch``, ``vae.arch`` and ``flow.arch`` = ``official``;
``python -m ecgflowcmr.convert_official`` writes a run folder from the published files
(docs/official_weights.md).
"""
from __future__ import annotations
