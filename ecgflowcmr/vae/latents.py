"""Cached latents of every split and the anatomical template (stage 2 -> stage 3).

Files under ``runs/<exp>/latents/``::

    {split}.npy          float32 (N_split, C, 50, 12, 12), posterior mode, memory-mapped,
                         rows in prepared-dataset split order (``Prepared.split_indices(split)``)
    {split}_index.csv    row, index (prepared array index), subject_id
    {split}.done.npy     bool (N_split,): rows written (resume; kept after completion)
    {split}.progress.json  {"n", "shape", "vae_hash", "complete"} (resume marker)
    template.pt          {"template": (C, 1, h, w) mean of train latents over subjects and frames,
                          "mean": (C,), "std": (C,) per-channel statistics over train,
                          "vae_hash": str, "n_subjects": int}

Extraction streams: a batch is encoded, written into the memory-mapped file, flushed, and only then
marked done. After an interruption the next call reopens the file and encodes only the rows not
marked: none is recomputed or lost. A marker from other VAE weights (hash) or another shape starts
the split afresh. Under torchrun the rows left are split over the ranks, which write into the same
memmaps (the run folder is shared, as checkpoints already require), so extraction takes 1/N of the
time instead of keeping N-1 ranks at a barrier past the collective timeout.
The template and statistics are streaming float64 sums over the memory-mapped train latents, by
rank 0 (seconds per GB of latents).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.datasets import SPLITS, Prepared, cine_from_uint8
from ..utils import dist as udist
from ..utils.checkpoint import atomic_save

log = logging.getLogger("ecgflowcmr")


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def split_complete(out_dir: str | Path, split: str, vae_hash: str) -> bool:
    marker = _read_json(Path(out_dir) / f"{split}.progress.json")
    return bool(marker and marker.get("complete") and marker.get("vae_hash") == vae_hash
                and (Path(out_dir) / f"{split}.npy").is_file())


def _open_split(prepared: Prepared, split: str, out_dir: Path, shape: list[int], vae_hash: str,
                indices: np.ndarray) -> None:
    """Rank 0: keep a resumable extraction of ``split`` (same VAE hash and shape), or start afresh:
    an invalidated marker first, then the latents memmap, the all-False done mask and the index."""
    npy, done_npy, marker_path = out_dir / f"{split}.npy", out_dir / f"{split}.done.npy", \
        out_dir / f"{split}.progress.json"
    marker = _read_json(marker_path)
    if (marker is not None and marker.get("vae_hash") == vae_hash and marker.get("shape") == shape
            and npy.is_file() and (marker.get("complete") or done_npy.is_file())):
        latents = np.load(npy, mmap_mode="r")
        if list(latents.shape) == shape and latents.dtype == np.float32:
            return
    _write_json_atomic(marker_path, {"n": shape[0], "shape": shape, "vae_hash": vae_hash, "complete": False})
    np.lib.format.open_memmap(npy, mode="w+", dtype=np.float32, shape=tuple(shape)).flush()
    np.lib.format.open_memmap(done_npy, mode="w+", dtype=np.bool_, shape=(shape[0],)).flush()
    import pandas as pd

    index_csv = out_dir / f"{split}_index.csv"
    pd.DataFrame({"row": np.arange(shape[0]), "index": indices,
                  "subject_id": prepared.subject_ids(indices)}).to_csv(index_csv.with_suffix(".csv.tmp"), index=False)
    os.replace(index_csv.with_suffix(".csv.tmp"), index_csv)


@torch.no_grad()
def extract_split(vae, prepared: Prepared, split: str, out_dir: str | Path, device: torch.device,
                  batch_size: int = 4, vae_hash: str | None = None, progress: bool = True) -> Path:
    """Encode one split (posterior mode) into ``out_dir/{split}.npy``; resumable. Returns the path.

    Under torchrun every rank calls this: the rows still to do are split over the ranks, each
    writes its rows into the shared memmap and marks them in ``{split}.done.npy`` (so a resumed
    run, with any number of ranks, does only what is left), and rank 0 closes the split."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vae_hash = vae_hash or vae.state_hash()
    indices = prepared.split_indices(split)
    n = len(indices)
    t, size = prepared.cine.shape[1], prepared.cine.shape[2]
    f = vae.spatial_factor
    shape = [n, vae.latent_channels, t, size // f, size // f]
    npy, done_npy, marker_path = out_dir / f"{split}.npy", out_dir / f"{split}.done.npy", \
        out_dir / f"{split}.progress.json"
    if udist.is_main():
        _open_split(prepared, split, out_dir, shape, vae_hash, indices)
    udist.barrier()
    if _read_json(marker_path).get("complete"):
        return npy
    latents = np.lib.format.open_memmap(npy, mode="r+")
    done = np.lib.format.open_memmap(done_npy, mode="r+")
    todo = np.flatnonzero(~np.asarray(done))
    udist.barrier()                      # every rank has read the to-do list before any row is marked
    mine = np.array_split(todo, udist.world_size())[udist.rank()]
    if udist.is_main() and len(todo) < n:
        log.info("latents/%s: resuming, %d of %d rows left", split, len(todo), n)

    was_training = vae.training
    vae.eval()
    bar = tqdm(total=len(mine), desc=f"latents {split}", disable=not progress or not udist.is_main(), leave=False)
    for lo in range(0, len(mine), batch_size):
        rows = mine[lo:lo + batch_size]
        cine = np.stack([np.asarray(prepared.cine[int(i)]) for i in indices[rows]])
        x = cine_from_uint8(torch.from_numpy(cine)).unsqueeze(1).to(device)   # (B, 1, T, H, W)
        latents[rows] = vae.encode(x).mode().float().cpu().numpy()
        latents.flush()                  # the rows are on disk before they count as done
        done[rows] = True
        done.flush()
        bar.update(len(rows))
    bar.close()
    vae.train(was_training)
    del latents
    udist.barrier()
    if udist.is_main():
        if not np.asarray(done).all():
            raise RuntimeError(f"latents/{split}: {int((~np.asarray(done)).sum())} rows were not written")
        _write_json_atomic(marker_path, {"n": n, "shape": shape, "vae_hash": vae_hash, "complete": True})
    del done
    udist.barrier()
    return npy


def compute_template(train_npy: str | Path, vae_hash: str, chunk: int = 64) -> dict:
    """Streaming float64 statistics of cached train latents ``(N, C, T, h, w)``."""
    latents = np.load(train_npy, mmap_mode="r")
    n, c, t, h, w = latents.shape
    if n == 0:
        raise ValueError(f"'{train_npy}' has no rows: the train split is empty, no template")
    pos_sum = np.zeros((c, h, w), dtype=np.float64)       # sum over subjects and frames
    ch_sq = np.zeros(c, dtype=np.float64)
    for lo in range(0, n, chunk):
        block = np.asarray(latents[lo:lo + chunk], dtype=np.float64)
        pos_sum += block.sum(axis=(0, 2))
        ch_sq += np.square(block).sum(axis=(0, 2, 3, 4))
    per_channel = float(n * t * h * w)
    ch_mean = pos_sum.sum(axis=(1, 2)) / per_channel
    ch_var = np.maximum(ch_sq / per_channel - ch_mean ** 2, 0.0)
    template = (pos_sum / float(n * t))[:, None]           # (C, 1, h, w)
    return {"template": torch.from_numpy(template.astype(np.float32)),
            "mean": torch.from_numpy(ch_mean.astype(np.float32)),
            "std": torch.from_numpy(np.sqrt(ch_var).astype(np.float32)),
            "vae_hash": str(vae_hash), "n_subjects": int(n)}


def extract_all(vae, data_root: str | Path, out_dir: str | Path, device: torch.device,
                batch_size: int = 4, splits=SPLITS, progress: bool = True) -> dict:
    """Cache the latents of every split and write ``template.pt``; skips finished work. Every
    rank calls it under torchrun (the splits are sharded; rank 0 writes the template)."""
    out_dir = Path(out_dir)
    prepared = Prepared(data_root)
    vae_hash = vae.state_hash()
    for split in splits:
        if udist.all_gather_object(split_complete(out_dir, split, vae_hash))[0]:   # rank 0 decides
            if udist.is_main():
                log.info("latents/%s.npy is complete for VAE %s; skipped", split, vae_hash)
            continue
        extract_split(vae, prepared, split, out_dir, device, batch_size, vae_hash, progress)
        if udist.is_main():
            log.info("latents/%s.npy written (%d rows)", split, len(prepared.split_indices(split)))
    template_path = out_dir / "template.pt"
    if udist.is_main():
        _write_template(out_dir, template_path, vae_hash)
    udist.barrier()
    return torch.load(template_path, map_location="cpu", weights_only=True)


def _write_template(out_dir: Path, template_path: Path, vae_hash: str) -> None:
    if template_path.is_file():
        old = torch.load(template_path, map_location="cpu", weights_only=True)
        if old.get("vae_hash") == vae_hash:
            return
    template = compute_template(out_dir / "train.npy", vae_hash)
    atomic_save(template, template_path)
    log.info("latents/template.pt written: template %s from %d train subjects",
             tuple(template["template"].shape), template["n_subjects"])
