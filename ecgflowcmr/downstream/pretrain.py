"""VideoMAE pretraining on real cines plus drawn synthetic ones: one resumable run per table row.

Every row trains the same number of steps with the same seeds; only the cines differ. Batches
and masks come from generators seeded by ``(downstream.seed, step)``, so a resumed run draws
exactly what an uninterrupted one would have.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..contract import IMAGE_SIZE, NUM_FRAMES
from ..data.datasets import cine_from_uint8
from ..utils.checkpoint import atomic_save, load_checkpoint
from .vit import VideoMAE, resize_cine

ARCH_KEYS = ("frames", "image_size", "tubelet", "patch", "width", "depth", "heads", "mlp_ratio")
PRETRAIN_KEYS = ARCH_KEYS + ("decoder_width", "decoder_depth", "decoder_heads", "mask_ratio", "pretrain_steps",
                             "pretrain_batch", "pretrain_lr", "pretrain_warmup", "weight_decay", "seed")


@dataclass
class PretrainSet:
    """What one row pretrains on: real prepared rows plus ``(source, (ecg, k) rows)`` draws."""

    prepared: object
    real_rows: np.ndarray
    synthetic: list = field(default_factory=list)     # [(source, draws (n, 2))]

    def __len__(self) -> int:
        return len(self.real_rows) + sum(len(d) for _, d in self.synthetic)

    def counts(self) -> dict:
        out = {"real": int(len(self.real_rows))}
        for source, draws in self.synthetic:
            out[source.name] = int(len(draws))
            out[f"{source.name}_distinct_ecgs"] = int(len(np.unique(draws[:, 0]))) if len(draws) else 0
        return out

    def cine(self, i: int) -> np.ndarray:
        """uint8 ``(50, 96, 96)`` of item ``i`` (real items first, then each draw in order)."""
        if i < len(self.real_rows):
            return np.asarray(self.prepared.cine[self.real_rows[i]])
        i -= len(self.real_rows)
        for source, draws in self.synthetic:
            if i < len(draws):
                return source.cine(int(draws[i, 0]), int(draws[i, 1]))
            i -= len(draws)
        raise IndexError(i)

    def fingerprint(self, ds) -> str:
        h = hashlib.sha256(json.dumps({k: getattr(ds, k) for k in PRETRAIN_KEYS}, sort_keys=True).encode())
        h.update(np.asarray(self.real_rows, np.int64).tobytes())
        for source, draws in self.synthetic:
            h.update(source.name.encode() + np.asarray(draws, np.int64).tobytes())
        return h.hexdigest()[:16]


def batch_tensor(items: list[np.ndarray], ds) -> torch.Tensor:
    """uint8 cines -> float ``(B, 1, frames, size, size)`` in [-1, 1]."""
    cine = cine_from_uint8(torch.from_numpy(np.stack(items)))[:, None]
    return resize_cine(cine, ds.frames, ds.image_size)


class ResizedCines:
    """``data``'s cines at the ViT's input size, each resized once and kept while the whole set fits
    in ``limit_bytes`` (resizing 96 -> 48 px was a fifth of a CPU step); otherwise resized per batch.
    Values are those of ``batch_tensor``: the interpolation treats every cine on its own."""

    def __init__(self, data: PretrainSet, ds, limit_bytes: float = 2e9):
        self.data, self.ds = data, ds
        size = ds.frames * ds.image_size ** 2 * 4
        self.keep = (ds.frames, ds.image_size) != (NUM_FRAMES, IMAGE_SIZE) and len(data) * size <= limit_bytes
        self.memo: dict[int, torch.Tensor] = {}

    def batch(self, items) -> torch.Tensor:
        """float ``(B, 1, frames, size, size)`` of the item indices ``items``."""
        if not self.keep:
            return batch_tensor([self.data.cine(int(i)) for i in items], self.ds)
        missing = [int(i) for i in items if int(i) not in self.memo]
        if missing:
            for i, x in zip(missing, batch_tensor([self.data.cine(i) for i in missing], self.ds)):
                self.memo[i] = x.clone()
        return torch.stack([self.memo[int(i)] for i in items])


def lr_at(step: int, ds) -> float:
    """Linear warmup, then cosine to 0 at ``pretrain_steps``."""
    if step < ds.pretrain_warmup:
        return ds.pretrain_lr * (step + 1) / ds.pretrain_warmup
    progress = (step - ds.pretrain_warmup) / max(1, ds.pretrain_steps - ds.pretrain_warmup)
    return ds.pretrain_lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def pretrain(data: PretrainSet, ds, run_dir: Path, device: torch.device, log=print) -> Path:
    """Train (or resume, or skip when done) one row; returns ``<run_dir>/encoder.pt``."""
    from tqdm import tqdm

    run_dir.mkdir(parents=True, exist_ok=True)
    final, last = run_dir / "encoder.pt", run_dir / "last.pt"
    fingerprint = data.fingerprint(ds)
    for path in (final, last):
        if path.is_file():
            saved = load_checkpoint(path).get("fingerprint")
            if saved != fingerprint:
                raise RuntimeError(f"'{path}' was pretrained with other settings or data (fingerprint {saved}, "
                                   f"now {fingerprint}). Delete '{run_dir}' to retrain it, or set "
                                   "downstream.out_dir to another folder.")
    if final.is_file():
        log(f"downstream: {run_dir.name}: pretraining done, skipped")
        return final
    torch.manual_seed(int(ds.seed))
    model = VideoMAE.from_config(ds).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=ds.pretrain_lr, weight_decay=ds.weight_decay, betas=(0.9, 0.95))
    step = 0
    if last.is_file():
        ckpt = load_checkpoint(last)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        step = int(ckpt["step"])
        log(f"downstream: {run_dir.name}: resuming pretraining at step {step}")
    n = len(data)
    batch = min(ds.pretrain_batch, n)
    counts = data.counts()
    log(f"downstream: {run_dir.name}: pretraining {ds.pretrain_steps} steps on {n} cines {counts}")
    model.train()
    resized = ResizedCines(data, ds)
    losses = []
    bar = tqdm(total=ds.pretrain_steps, initial=step, desc=f"pretrain {run_dir.name}", unit="step")
    while step < ds.pretrain_steps:
        rng = np.random.default_rng([int(ds.seed), 21, step])
        cines = resized.batch(rng.choice(n, size=batch, replace=False))
        for group in opt.param_groups:
            group["lr"] = lr_at(step, ds)
        loss = model(cines.to(device), generator=torch.Generator().manual_seed(int(ds.seed) * 1_000_003 + step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        losses.append(float(loss.detach()))
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        if step % ds.ckpt_every == 0 and step < ds.pretrain_steps:
            atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                         "fingerprint": fingerprint}, last)
    bar.close()
    atomic_save({"encoder": model.encoder.state_dict(), "arch": {k: getattr(ds, k) for k in ARCH_KEYS},
                 "fingerprint": fingerprint, "steps": step, "counts": counts,
                 "final_loss": float(np.mean(losses[-20:])) if losses else None}, final)
    if last.is_file():
        last.unlink()
    return final
