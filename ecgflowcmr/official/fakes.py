"""Random-weight checkpoints in the official formats, rebuilt from a small description.

The equivalence fixture (``tests/data/official/``) cannot hold the fake official checkpoints
themselves: the smallest official VAE with 8x compression (GroupNorm needs 32 channels) is about
5 MB. It holds their description instead (``fake_checkpoints.json``): for each file, the non-tensor entries of the
training dict and the name, shape and dtype of every tensor, as the official classes produced
them. ``fill`` gives every tensor deterministic values that depend only on (seed, name, shape),
from PCG64's raw 64-bit stream, which NumPy keeps identical across versions and platforms; so
``write_official_checkpoints`` recreates the files (the same entries and tensors) that
``benchmarks/official_fixture.py`` saved and ran through the official code.

Values by role (every tensor is random, the official zero-initialised layers included):
weights ``U(-a, a)`` with ``a = gain * sqrt(3 / fan_in)`` (``gain`` per file: 1 keeps a layer's
output variance, 0.5 keeps the residual VAE's activations near 1 as in a trained one); 1-D ``weight`` (norm scales)
``1 + U(-0.2, 0.2)``; biases ``U(-0.1, 0.1)``; BatchNorm ``running_mean`` ``U(-0.2, 0.2)``,
``running_var`` ``U(0.5, 1.5)``, ``num_batches_tracked`` an integer; ``pos_embed`` ``U(-0.5, 0.5)``.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import torch


def _uniform(seed: int, name: str, count: int) -> np.ndarray:
    """``count`` float64 in [0, 1) from the raw PCG64 stream seeded by (seed, name)."""
    key = int.from_bytes(hashlib.sha256(f"{seed}|{name}".encode()).digest()[:8], "little")
    raw = np.random.PCG64(key).random_raw(count) if count else np.zeros(0, dtype=np.uint64)
    return (raw >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def fill(name: str, shape, dtype: str = "float32", seed: int = 0, gain: float = 1.0) -> torch.Tensor:
    """The deterministic value of tensor ``name`` (see the module docstring for the roles);
    ``gain`` scales the weights of 2-D and larger tensors."""
    shape = tuple(int(s) for s in shape)
    count = math.prod(shape)
    u = _uniform(seed, name, count)
    leaf = name.rsplit(".", 1)[-1]
    if dtype.startswith("int"):
        return torch.tensor(1000 + int(u[0] * 1000) if count else 0, dtype=getattr(torch, dtype)).reshape(shape)
    v = 2.0 * u - 1.0
    if leaf == "running_var":
        values = 1.0 + 0.5 * v
    elif leaf == "running_mean":
        values = 0.2 * v
    elif leaf == "pos_embed":
        values = 0.5 * v
    elif len(shape) >= 2:
        values = v * (gain * math.sqrt(3.0 / math.prod(shape[1:])))
    elif leaf.endswith("weight") and len(shape) == 1:
        values = 1.0 + 0.2 * v
    else:                                          # biases, scalars
        values = 0.1 * v
    return torch.from_numpy(values.astype(np.float32)).reshape(shape).to(getattr(torch, dtype))


def uniform_tensor(name: str, shape, seed: int, low: float, high: float) -> torch.Tensor:
    """A float32 input tensor, uniform in [low, high), deterministic like ``fill``."""
    u = _uniform(seed, name, math.prod(int(s) for s in shape))
    return torch.from_numpy((low + (high - low) * u).astype(np.float32)).reshape(tuple(int(s) for s in shape))


def fake_state(spec: list, seed: int, gain: float = 1.0) -> dict:
    """``[[name, shape, dtype], ...]`` -> state dict of ``fill`` values (in that key order)."""
    return {name: fill(name, shape, dtype, seed, gain) for name, shape, dtype in spec}


def state_spec(state: dict) -> list:
    """The description of a state dict: ``[[name, shape, dtype], ...]``."""
    return [[k, list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in state.items()]


def build_file(entry: dict, seed: int):
    """One official file from its description: ``{"tensor": spec}`` (a bare tensor) or
    ``{"layout": {plain entries}, "states": {key: spec}}`` (a training dict)."""
    if "tensor" in entry:
        name, shape, dtype = entry["tensor"]
        return fill(name, shape, dtype, seed)
    out = dict(entry.get("layout", {}))
    for key, spec in entry["states"].items():
        out[key] = fake_state(spec, seed + entry.get("seed_offset", {}).get(key, 0), entry.get("gain", 1.0))
    return out


def write_official_checkpoints(spec: dict | str | Path, out_dir: str | Path) -> dict[str, Path]:
    """Write every file of ``spec`` (a dict or the path of ``fake_checkpoints.json``) into ``out_dir``;
    returns ``{name: path}`` (names: ecg, vae, flow, template)."""
    if not isinstance(spec, dict):
        spec = json.loads(Path(spec).read_text())
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, entry in spec["files"].items():
        path = out_dir / entry["filename"]
        torch.save(build_file(entry, spec["seed"]), path)
        paths[name] = path
    return paths
