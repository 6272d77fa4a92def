"""Stage-1/stage-2 stand-ins for the flow tests, and a builder of a complete tiny run folder.

``build_run`` writes a run folder with everything stage 3 reads: prepared data, ``ecg/best.pt``,
``vae/best.pt``, ``latents/{train,val,test}.npy`` + index CSVs and ``latents/template.pt``. The
stage-1/2 checkpoints come from the real modules at tiny sizes when they are importable;
otherwise (or on request, e.g. a fast fake VAE for tests that decode many videos) from small
fakes with the same interface, and ``use_bridges(monkeypatch, ...)`` points the flow's bridge
functions (``ecgflowcmr.flow.generator``) at them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from ecgflowcmr.ecg.cycles import Wraps
from ecgflowcmr.utils.checkpoint import state_hash

FAKE_DIM = 16


@dataclass
class FakeCycleOutput:
    tokens: torch.Tensor
    pooled: torch.Tensor
    phase: torch.Tensor
    start: torch.Tensor
    end: torch.Tensor
    fallback: torch.Tensor
    wraps: object = None


FAKE_RPEAKS = tuple(range(250, 5000, 500))      # the fake encoder's R-peaks: 60 bpm, the first at 0.5 s


class FakeECGEncoder(nn.Module):
    """(B, 12, 5000) -> 50 tokens of width ``dim`` (strided conv); fixed cycle 1000..1500; R-peaks
    (phase wraps) at ``FAKE_RPEAKS``."""

    def __init__(self, dim: int = FAKE_DIM):
        super().__init__()
        self.dim = dim
        self.conv = nn.Conv1d(12, dim, kernel_size=100, stride=100)

    @classmethod
    def from_config(cls, ecg_cfg) -> FakeECGEncoder:
        return cls(dim=FAKE_DIM)

    def state_hash(self) -> str:
        return state_hash(self.state_dict())

    def forward(self, ecg: torch.Tensor) -> FakeCycleOutput:
        tokens = self.conv(ecg).transpose(1, 2)                  # (B, 50, dim)
        b = ecg.shape[0]
        times = torch.tensor(FAKE_RPEAKS, dtype=torch.float32).expand(b, -1)
        wraps = Wraps(times, torch.ones_like(times, dtype=torch.bool), torch.zeros(b, ecg.shape[-1]))
        return FakeCycleOutput(tokens, tokens.mean(1), torch.zeros(b, ecg.shape[-1]),
                               torch.full((b,), 1000), torch.full((b,), 1500), torch.zeros(b, dtype=torch.bool),
                               wraps)


class FakeVAE(nn.Module):
    """decode: (B, C, 50, 12, 12) -> (B, 1, 50, 96, 96) (1x1 conv, nearest x8, tanh)."""

    def __init__(self, channels: int = 4):
        super().__init__()
        self.conv = nn.Conv3d(channels, 1, 1)

    def state_hash(self) -> str:
        return state_hash(self.state_dict())

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(F.interpolate(self.conv(z), scale_factor=(1, 8, 8), mode="nearest"))


def _fake_load_encoder(path, device, cycle_mode=None):
    ckpt = torch.load(path, weights_only=True)
    enc = FakeECGEncoder()
    enc.load_state_dict(ckpt["model"])
    return enc.to(device).eval(), {"config": ckpt["config"]["ecg"], "hash": enc.state_hash()}


def _fake_encoder_from_spec(spec, device):
    enc = FakeECGEncoder.from_config(None)
    enc.load_state_dict(spec["state_dict"])
    return enc.to(device).eval()


def _fake_load_vae(path, device):
    ckpt = torch.load(path, weights_only=True)
    vae = FakeVAE()
    vae.load_state_dict(ckpt["model"])
    return vae.to(device).eval(), {"config": ckpt["config"]["vae"], "state_dict": vae.state_dict(),
                                   "hash": vae.state_hash()}


def _fake_vae_from_spec(spec, device):
    vae = FakeVAE()
    vae.load_state_dict(spec["state_dict"])
    return vae.to(device).eval()


def real_modules_available() -> bool:
    try:
        from ecgflowcmr.ecg.encoder import load_ecg_encoder  # noqa: F401
        from ecgflowcmr.ecg.pamae import PAMAE  # noqa: F401
        from ecgflowcmr.vae import VAE3D, load_vae  # noqa: F401
    except ImportError:
        return False
    return True


def tiny_config(run_dir: Path, *overrides: str):
    """A config for the tiny run folder: tiny stage-1/2/3 sizes, CPU."""
    from ecgflowcmr.config import load_config

    return load_config(None, [f"run_dir={run_dir}", "device=cpu", "ecg.width=16", "ecg.depth=1", "ecg.heads=2",
                              "vae.base_channels=8", "vae.attention=false",
                              "flow.hidden=32", "flow.depth=1", "flow.heads=2", "flow.patch_size=2",
                              "flow.batch_size=4", "flow.warmup_steps=0", "flow.lr=1e-3", "flow.epochs=2",
                              "flow.log_every=1", "infer.steps=2", "infer.batch_size=3", *overrides])


def _write_stage_checkpoints(run_dir: Path, cfg, real_ecg: bool, real_vae: bool, channels: int):
    """ecg/best.pt and vae/best.pt; returns the VAE (for its hash)."""
    (run_dir / "ecg").mkdir(parents=True, exist_ok=True)
    (run_dir / "vae").mkdir(parents=True, exist_ok=True)
    if real_ecg:
        from ecgflowcmr.ecg.pamae import PAMAE

        ecg_state = PAMAE.from_config(cfg.ecg).state_dict()
    else:
        ecg_state = FakeECGEncoder().state_dict()
    torch.save({"model": ecg_state, "config": cfg.to_dict()}, run_dir / "ecg" / "best.pt")
    if real_vae:
        from ecgflowcmr.vae import VAE3D

        vae = VAE3D.from_config(cfg.vae)
    else:
        vae = FakeVAE(channels)
    torch.save({"model": vae.state_dict(), "config": cfg.to_dict(), "optimizer": {}}, run_dir / "vae" / "best.pt")
    return vae


def use_bridges(monkeypatch, real_ecg: bool, real_vae: bool) -> None:
    """Point the flow's bridges at the fakes for the stages that are not real."""
    from ecgflowcmr.flow import generator

    if not real_ecg:
        monkeypatch.setattr(generator, "load_stage1_encoder", _fake_load_encoder)
        monkeypatch.setattr(generator, "encoder_from_spec", _fake_encoder_from_spec)
    if not real_vae:
        monkeypatch.setattr(generator, "load_stage2_vae", _fake_load_vae)
        monkeypatch.setattr(generator, "vae_from_spec", _fake_vae_from_spec)


def build_run(run_dir: Path, n: int = 12, seed: int = 0, real_ecg: bool | None = None,
              real_vae: bool | None = None) -> Path:
    """A complete tiny run folder for stage 3 (stage-1/2 checkpoints, structured latents).

    ``real_*=None``: the real stage-1/2 modules when importable, else the fakes (then call
    ``use_bridges``). The latents are a fixed anatomy plus a subject offset plus a motion whose
    phase is read from the subject's ECG, so a conditional model has something to learn."""
    from tests.conftest import write_fake_prepared

    real = real_modules_available()
    real_ecg = real if real_ecg is None else real_ecg
    real_vae = real if real_vae is None else real_vae
    run_dir = Path(run_dir)
    cfg = tiny_config(run_dir)
    channels = cfg.vae.latent_channels
    data = write_fake_prepared(run_dir / "data", n=n, seed=seed)
    torch.manual_seed(seed)
    vae = _write_stage_checkpoints(run_dir, cfg, real_ecg, real_vae, channels)

    subjects = pd.read_csv(data / "subjects.csv", dtype={"subject_id": str})
    ecg = np.load(data / "ecg.npy", mmap_mode="r")
    rng = np.random.default_rng(seed)
    anatomy = rng.normal(size=(channels, 1, 12, 12)).astype(np.float32)
    frames = np.arange(50, dtype=np.float32)
    lat_dir = run_dir / "latents"
    lat_dir.mkdir(parents=True, exist_ok=True)
    train_latents = None
    for split in ("train", "val", "test"):
        rows = subjects.index[subjects["split"] == split].to_numpy()
        z = np.zeros((len(rows), channels, 50, 12, 12), np.float32)
        for r, idx in enumerate(rows):
            phase = float(np.abs(ecg[idx, 0, :500]).mean()) * 20
            motion = np.sin(2 * np.pi * frames / 50 + phase)[None, :, None, None]
            z[r] = 2.0 + anatomy + 0.3 * rng.normal(size=(channels, 1, 1, 1)) + 0.5 * motion * anatomy
        np.save(lat_dir / f"{split}.npy", z)
        pd.DataFrame({"row": np.arange(len(rows)), "index": rows,
                      "subject_id": subjects["subject_id"].to_numpy()[rows]}).to_csv(
            lat_dir / f"{split}_index.csv", index=False)
        if split == "train":
            train_latents = z
    torch.save({"template": torch.from_numpy(train_latents.mean(axis=(0, 2))[:, None]),
                "mean": torch.from_numpy(train_latents.mean(axis=(0, 2, 3, 4))),
                "std": torch.from_numpy(train_latents.std(axis=(0, 2, 3, 4))),
                "vae_hash": vae.state_hash(), "n_subjects": int(train_latents.shape[0])},
               lat_dir / "template.pt")
    return run_dir
