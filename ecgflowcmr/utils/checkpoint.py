"""Atomic checkpoints that load with ``weights_only=True`` and resume a run exactly.

A checkpoint is a plain dict::

    {"model": state_dict, "ema": state_dict | None, "optimizer": ..., "scheduler": ...,
     "scaler": ..., "step": int, "epoch": int, "rng": {...}, "config": cfg.to_dict(),
     "extra": {...}}            # stage-specific plain data (best metric, hashes, ...)

Only tensors and plain containers go in, so a checkpoint from elsewhere cannot run code.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .seed import rng_state, set_rng_state


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                    stage_hint: str | None = None) -> dict:
    """Load a checkpoint safely (``weights_only=True``); a clear error if it is missing."""
    path = Path(path)
    if not path.is_file():
        hint = f" (written by {stage_hint})" if stage_hint else ""
        raise FileNotFoundError(f"checkpoint '{path}' not found{hint}")
    return torch.load(path, map_location=map_location, weights_only=True)


def checkpoint_to_resume(last_path: str | os.PathLike, resume: bool, fresh: bool, script: str,
                         log=None) -> dict | None:
    """The checkpoint a training run continues from, or None to start from scratch.

    ``resume``: ``last_path`` must exist; ``fresh``: ignore it; neither: continue it if it exists.
    ``script`` names the stage's script in the error when ``resume`` finds nothing.
    """
    from ..config import ConfigError

    if resume and fresh:
        raise ConfigError("--resume and --fresh contradict each other")
    if resume:
        return load_checkpoint(last_path, stage_hint=f"{script} (nothing to resume)")
    if fresh or not Path(last_path).is_file():
        return None
    ckpt = load_checkpoint(last_path)
    if log is not None:
        log.info("found %s: resuming it (pass --fresh to start over)", last_path)
    return ckpt


def file_hash(path: str | os.PathLike, length: int = 16) -> str:
    """sha256 of a file's bytes (first ``length`` hex digits): names a checkpoint for provenance."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:length]


def state_hash(state_dict: dict, length: int = 16) -> str:
    """Hash of a state dict's tensors (names, shapes, bytes): identifies weights independent of file."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name]
        h.update(name.encode())
        if isinstance(t, torch.Tensor):
            t = t.detach().cpu().contiguous()
            h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
            # reshape(-1): a 0-dim tensor (BatchNorm's num_batches_tracked) cannot be viewed as bytes
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:length]


def state_dict_mismatch(own: dict, state: dict) -> tuple[list, list, list]:
    """How ``state`` differs from a module's own state dict ``own``: (keys missing from ``state``,
    keys ``own`` lacks, ``(key, shape in state, shape in own)`` of the keys whose shapes differ);
    all empty when a strict load would succeed. Lists follow the dicts' key order."""
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in own.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    return missing, unexpected, shapes


def make_checkpoint(model: torch.nn.Module, optimizer=None, scheduler=None, scaler=None,
                    ema: torch.nn.Module | None = None, step: int = 0, epoch: int = 0,
                    config: dict | None = None, extra: dict | None = None, **more_state) -> dict:
    """Collect everything a run needs to continue. ``more_state``: other named state dicts
    (e.g. ``disc=..., disc_optimizer=...``) stored under their names."""
    from .dist import unwrap

    ckpt = {
        "model": unwrap(model).state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "step": int(step),
        "epoch": int(epoch),
        "rng": rng_state(),
        "config": config or {},
        "extra": extra or {},
    }
    for name, obj in more_state.items():
        ckpt[name] = obj.state_dict() if hasattr(obj, "state_dict") else obj
    return ckpt


def restore_checkpoint(ckpt: dict, model: torch.nn.Module, optimizer=None, scheduler=None,
                       scaler=None, ema: torch.nn.Module | None = None, restore_rng: bool = True,
                       **more_state) -> tuple[int, int]:
    """Load state saved by ``make_checkpoint`` into live objects; returns (step, epoch)."""
    from .dist import unwrap

    unwrap(model).load_state_dict(ckpt["model"])
    if ema is not None and ckpt.get("ema") is not None:
        ema.load_state_dict(ckpt["ema"])
    if optimizer is not None and ckpt.get("optimizer") is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
    if scheduler is not None and ckpt.get("scheduler") is not None:
        scheduler.load_state_dict(ckpt["scheduler"])
    if scaler is not None and ckpt.get("scaler") is not None:
        scaler.load_state_dict(ckpt["scaler"])
    for name, obj in more_state.items():
        if ckpt.get(name) is not None:
            obj.load_state_dict(ckpt[name])
    if restore_rng and "rng" in ckpt:
        set_rng_state(ckpt["rng"])
    return int(ckpt["step"]), int(ckpt["epoch"])
