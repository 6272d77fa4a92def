"""Shared fixtures. Everything runs on CPU, offline, in seconds."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
EXAMPLE_ECG_DIR = ROOT / "examples" / "ecg"
PTBXL_RECORDS = [f"HR0600{i}" for i in range(5)]

torch.set_num_threads(min(2, os.cpu_count() or 1))


def write_fake_prepared(root: Path, n: int = 12, seed: int = 0, masks: bool = True) -> Path:
    """A prepared dataset in the exact on-disk format, filled with random data (plumbing only)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    np.save(root / "ecg.npy", rng.normal(size=(n, 12, 5000)).astype(np.float32) * 0.1)
    np.save(root / "cine.npy", rng.integers(0, 256, size=(n, 50, 96, 96), dtype=np.uint8))
    if masks:
        np.save(root / "masks.npy", rng.integers(0, 6, size=(n, 50, 96, 96), dtype=np.uint8))
    rpeaks = np.full((n, 16), -1, dtype=np.int32)
    for i in range(n):
        peaks = np.arange(200, 5000, 500) + int(rng.integers(-50, 50))
        rpeaks[i, : len(peaks)] = peaks
    np.save(root / "rpeaks.npy", rpeaks)
    return write_prepared_tables(root, n)


def write_prepared_tables(root: Path, n: int) -> Path:
    """The tables of a prepared dataset for ``n`` subjects S0000.. (n-4 train, 2 val, 2 test)."""
    import pandas as pd

    split = ["train"] * (n - 4) + ["val"] * 2 + ["test"] * 2
    ids = [f"S{i:04d}" for i in range(n)]
    pd.DataFrame({"index": range(n), "subject_id": ids, "split": split}).to_csv(root / "subjects.csv", index=False)
    (root / "splits.json").write_text(json.dumps({s: [i for i, sp in zip(ids, split) if sp == s]
                                                  for s in ("train", "val", "test")}))
    (root / "qc_report.csv").write_text("subject_id,file,reason\n")
    (root / "meta.json").write_text(json.dumps({"n": n, "ecg_fs": 500, "num_frames": 50,
                                                "image_size": 96, "complete": True}))
    return root


@pytest.fixture
def fake_prepared(tmp_path) -> Path:
    return write_fake_prepared(tmp_path / "data")
