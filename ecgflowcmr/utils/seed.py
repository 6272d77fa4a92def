"""Seeding and RNG state capture, so that resume continues the same random stream."""
from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Python, numpy and torch (CPU + CUDA) RNG states as tensors / plain containers."""
    np_state = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]) + [random.getstate()[2] if random.getstate()[2] is not None else -1],
        "python_version": random.getstate()[0],
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    gauss = None if py[-1] == -1 else py[-1]
    random.setstate((state["python_version"], tuple(int(x) for x in py[:-1]), gauss))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        set_cuda_rng_states(state["cuda"])


def set_cuda_rng_states(states: list, device_count: int | None = None, setter=None) -> int:
    """Restore the saved CUDA generator states of the devices that exist now; returns how many.

    A run saved on N GPUs may resume on a machine (or a ``CUDA_VISIBLE_DEVICES``) with fewer or
    more: devices beyond the saved list keep their fresh seed, saved states beyond the visible
    devices are dropped (``torch.cuda.set_rng_state_all`` would raise IndexError)."""
    count = torch.cuda.device_count() if device_count is None else device_count
    setter = setter or (lambda st, index: torch.cuda.set_rng_state(st, index))
    restored = min(len(states), count)
    for index in range(restored):
        setter(states[index], index)
    return restored
