"""VideoMAE pretraining on real cines plus drawn synthetic ones: one resumable run per table row.

Every row trains the same number of steps with the same seeds; only the cines differ. Batches
and masks come from generators seeded by ``(downstream.seed, step)``, so a resumed run draws
exactly what an uninterrupted one would have.
"""
from __future__ import annotations

import collections
import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..contract import IMAGE_SIZE, NUM_FRAMES
from ..data.datasets import cine_from_uint8
from ..utils.checkpoint import atomic_save, load_checkpoint
from ..utils.train import cosine_schedule, optimizer_step
from ..utils.trainer import LoopSettings, Stage, Trainer
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


class StepIndex:
    """The Trainer's "loader" for step-indexed pretraining: ``length`` placeholders per epoch. Each
    step draws its own batch from ``(downstream.seed, step)`` in ``PretrainStage.train_step``, so
    skipping the done steps of an epoch on resume costs nothing and draws exactly the same batches."""

    sampler = None

    def __init__(self, length: int):
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        return iter(range(self.length))


class PretrainStage(Stage):
    """VideoMAE pretraining on ``data``: AdamW (betas 0.9, 0.95; decay on every weight) with the
    shared warm-up + cosine schedule over ``pretrain_steps``, gradient norm clipped at 1."""

    name, best_key, epoch_means = "pretrain", "best_train_loss", ("loss",)

    def __init__(self, data: PretrainSet, ds, device: torch.device, fingerprint: str):
        self.ds, self.device, self.fingerprint = ds, device, fingerprint
        torch.manual_seed(int(ds.seed))
        self.model = VideoMAE.from_config(ds).to(device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=ds.pretrain_lr, weight_decay=ds.weight_decay,
                                           betas=(0.9, 0.95))
        self.scheduler = cosine_schedule(self.optimizer, ds.pretrain_warmup, ds.pretrain_steps)
        self.resized, self.n = ResizedCines(data, ds), len(data)
        self.batch = min(ds.pretrain_batch, self.n)
        self.recent: collections.deque = collections.deque(maxlen=20)

    def train_step(self, _, step: int) -> dict:
        ds = self.ds
        rng = np.random.default_rng([int(ds.seed), 21, step])
        cines = self.resized.batch(rng.choice(self.n, size=self.batch, replace=False))
        loss = self.model(cines.to(self.device),
                          generator=torch.Generator().manual_seed(int(ds.seed) * 1_000_003 + step))
        optimizer_step(loss, self.optimizer, self.scheduler, self.model.parameters(), 1.0)
        self.recent.append(float(loss.detach()))
        return {"loss": self.recent[-1]}

    def score(self, record: dict) -> float:
        return record["train_loss"]

    def state(self) -> dict:
        return {"optimizer": self.optimizer, "scheduler": self.scheduler}

    def extra(self) -> dict:
        return {"fingerprint": self.fingerprint}


def _fingerprint_of(path: Path) -> str | None:
    ckpt = load_checkpoint(path)
    return ckpt.get("fingerprint", ckpt.get("extra", {}).get("fingerprint"))


def pretrain(data: PretrainSet, ds, run_dir: Path, device: torch.device, log=print,
             stop_after_chunks: int | None = None) -> Path:
    """Train (or resume, or skip when done) one row; returns ``<run_dir>/encoder.pt``.

    Runs on the shared ``Trainer``: an "epoch" is a chunk of ``ckpt_every`` steps, after which
    ``last.pt`` is written. ``stop_after_chunks``: return after that many chunks of this call, as if
    the process had been killed there (tests of exact resume)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    final, last = run_dir / "encoder.pt", run_dir / "last.pt"
    fingerprint = data.fingerprint(ds)
    for path in (final, last):
        if path.is_file() and (saved := _fingerprint_of(path)) != fingerprint:
            raise RuntimeError(f"'{path}' was pretrained with other settings or data (fingerprint {saved}, "
                               f"now {fingerprint}). Delete '{run_dir}' to retrain it, or set "
                               "downstream.out_dir to another folder.")
    if final.is_file():
        log(f"downstream: {run_dir.name}: pretraining done, skipped")
        return final
    stage = PretrainStage(data, ds, device, fingerprint)
    chunk = max(1, min(ds.ckpt_every, ds.pretrain_steps))
    settings = LoopSettings(epochs=math.ceil(ds.pretrain_steps / chunk), max_steps=ds.pretrain_steps,
                            log_every=max(chunk, 50), val_every=1)
    config = {"downstream": {k: getattr(ds, k) for k in PRETRAIN_KEYS}}
    trainer = Trainer(stage, StepIndex(chunk), settings, run_dir, config, int(ds.seed), device,
                      logging.getLogger("ecgflowcmr.downstream"))
    ckpt = load_checkpoint(last) if last.is_file() else None
    trainer.restore(ckpt)
    if ckpt is not None:
        log(f"downstream: {run_dir.name}: resuming pretraining at step {trainer.state.step}")
    del ckpt
    counts = data.counts()
    log(f"downstream: {run_dir.name}: pretraining {ds.pretrain_steps} steps on {stage.n} cines {counts}")
    state = trainer.fit(stop_after_chunks)
    if not trainer.done():
        return final
    atomic_save({"encoder": stage.model.encoder.state_dict(), "arch": {k: getattr(ds, k) for k in ARCH_KEYS},
                 "fingerprint": fingerprint, "steps": state.step, "counts": counts,
                 "final_loss": float(np.mean(stage.recent)) if stage.recent else None}, final)
    for path in (last, trainer.best_path):
        path.unlink(missing_ok=True)
    return final
