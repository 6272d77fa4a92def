"""Device selection and mixed precision (bf16 autocast on CUDA only)."""
from __future__ import annotations

import contextlib

import torch


def select_device(name: str = "auto") -> torch.device:
    """``auto`` -> the local CUDA device if present (LOCAL_RANK-aware under torchrun), else CPU."""
    from .dist import local_rank

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank()}"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device '{name}' requested in the config but CUDA is not available; "
                               "set device=cpu or device=auto")
        torch.cuda.set_device(device)
    return device


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA when enabled; a no-op context on CPU (CPU runs stay fp32)."""
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def fp16_autocast(device_type: str):
    """The official networks trained under fp16 autocast: where the caller enabled CUDA autocast
    (this project's is bf16), run them in fp16 as they were trained; otherwise change nothing."""
    if device_type == "cuda" and torch.is_autocast_enabled("cuda"):
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()
