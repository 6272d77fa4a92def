"""Functional metrics: LV area-time curves from a segmenter that is independent of the generator.

Segmenter: a small 2D U-Net (``SegUNet``, half resolution, 3 levels) trained on the *real* cines
and ground-truth masks of the prepared train split (labels 0 bg, 1 LV, 2 RV, 3 LA, 4 RA,
5 myocardium), validated on the val split (per-class Dice written to metrics.json). It never sees a
generated cine while training, so it measures generated videos and real videos with one ruler. It
is cached next to the evaluation outputs (``segmenter.pt``, plain tensors) and retrained only when
the prepared data changes.

From the LV label per frame:
- LV area curve A(t), t = 0..49 (pixels), frame 0 = R-peak = end-diastole;
- ES frame = argmin A(t);
- area EF (percentage points) = 100 * (A(0) - min A) / A(0): end-diastole is frame 0 by the cine
  contract (the phantom's ``ef_area`` ground truth uses the same definition);
- ES-frame error between two curves: circular, min(|a - b|, 50 - |a - b|) frames;
- curve correlation (Pearson) and RMSE (pixels, and relative to the reference's max area).
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

NUM_CLASSES = 6
LV_LABEL = 1
SEGMENTER_VERSION = 2  # bump when SegUNet or its training changes: cached segmenters are retrained
LABEL_NAMES = {0: "background", 1: "LV", 2: "RV", 3: "LA", 4: "RA", 5: "myocardium"}


# ----------------------------------------------------------------------------------------------
# Segmenter
# ----------------------------------------------------------------------------------------------


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(min(8, cout), cout), nn.SiLU(),
        nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(min(8, cout), cout), nn.SiLU())


class SegUNet(nn.Module):
    """Small U-Net: (N, 1, H, W) in [-1, 1] -> (N, classes, H, W) logits.

    It works at half resolution (2 x 2 average pool in, bilinear logits out) with three pooling
    levels, so its receptive field spans most of a 96 x 96 frame: telling the LV from the left
    atrium across the valve plane needs that context, and half resolution keeps a CPU step cheap.
    H and W must be divisible by 16."""

    def __init__(self, classes: int = NUM_CLASSES, width: int = 8):
        super().__init__()
        w = width
        self.enc1, self.enc2, self.enc3, self.enc4 = _block(1, w), _block(w, 2 * w), _block(2 * w, 4 * w), \
            _block(4 * w, 8 * w)
        self.up3, self.dec3 = nn.ConvTranspose2d(8 * w, 4 * w, 2, stride=2), _block(8 * w, 4 * w)
        self.up2, self.dec2 = nn.ConvTranspose2d(4 * w, 2 * w, 2, stride=2), _block(4 * w, 2 * w)
        self.up1, self.dec1 = nn.ConvTranspose2d(2 * w, w, 2, stride=2), _block(2 * w, w)
        self.head = nn.Conv2d(w, classes, 1)
        self.config = {"classes": classes, "width": width}

    def forward(self, x):
        size = x.shape[-2:]
        x = F.avg_pool2d(x, 2)
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        e3 = self.enc3(F.max_pool2d(e2, 2))
        e4 = self.enc4(F.max_pool2d(e3, 2))
        d3 = self.dec3(torch.cat([self.up3(e4), e3], 1))
        d2 = self.dec2(torch.cat([self.up2(d3), e2], 1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], 1))
        return F.interpolate(self.head(d1), size=size, mode="bilinear", align_corners=False)


def dice_per_class(pred: np.ndarray, target: np.ndarray, classes: int = NUM_CLASSES) -> dict[str, float]:
    """Dice of each label over all pixels of the given stacks (labels absent from both: skipped)."""
    pred, target = np.asarray(pred), np.asarray(target)
    out = {}
    for c in range(1, classes):
        p, t = pred == c, target == c
        denom = p.sum() + t.sum()
        if denom == 0:
            continue
        out[LABEL_NAMES.get(c, str(c))] = float(2.0 * np.logical_and(p, t).sum() / denom)
    return out


@dataclass
class FitResult:
    model: SegUNet
    steps: int
    final_loss: float
    seconds: float


def fit_segmenter(images_u8, masks, steps: int = 400, batch_size: int = 16, lr: float = 3e-3,
                  seed: int = 0, device: torch.device | str = "cpu", width: int = 8,
                  crop: int | None = None) -> FitResult:
    """Train SegUNet on frames. images_u8: (M, H, W) uint8 (array or memmap-like with fancy
    indexing), masks: (M, H, W) integer labels. Each step draws random whole frames (or, with
    ``crop``, a random ``crop`` x ``crop`` window of each; the net is fully convolutional)."""
    import time

    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    model = SegUNet(width=width).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.15)
    m = len(images_u8)
    start, loss_value = time.time(), float("nan")
    model.train()
    for _ in range(steps):
        idx = np.sort(rng.integers(0, m, min(batch_size, m)))
        imgs = np.asarray(images_u8[idx], dtype=np.float32) / 127.5 - 1.0
        labs = np.asarray(masks[idx], dtype=np.int64)
        h, w = imgs.shape[-2:]
        if crop and crop < min(h, w):
            rows, cols = rng.integers(0, h - crop + 1, len(idx)), rng.integers(0, w - crop + 1, len(idx))
            imgs = np.stack([im[r:r + crop, c:c + crop] for im, r, c in zip(imgs, rows, cols)])
            labs = np.stack([lb[r:r + crop, c:c + crop] for lb, r, c in zip(labs, rows, cols)])
        x = torch.from_numpy(imgs)[:, None].to(device)
        y = torch.from_numpy(labs).to(device)
        if torch.rand((), generator=gen) < 0.5:  # flips keep the anatomy's labels valid
            x, y = x.flip(-1), y.flip(-1)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        loss_value = float(loss.detach())
    model.eval()
    return FitResult(model, steps, loss_value, time.time() - start)


@torch.no_grad()
def segment(model: nn.Module, cines_u8, batch_size: int = 64, device: torch.device | str = "cpu") -> np.ndarray:
    """Labels (N, T, H, W) uint8 for uint8 cines (N, T, H, W)."""
    device = torch.device(device)
    model = model.to(device).eval()
    cines = np.asarray(cines_u8)
    n, t, h, w = cines.shape
    flat = cines.reshape(n * t, h, w)
    out = np.empty((n * t, h, w), dtype=np.uint8)
    for s in range(0, n * t, batch_size):
        x = torch.from_numpy(flat[s:s + batch_size].astype(np.float32) / 127.5 - 1.0)[:, None].to(device)
        out[s:s + batch_size] = model(x).argmax(1).to(torch.uint8).cpu().numpy()
    return out.reshape(n, t, h, w)


def _prepared_fingerprint(prepared) -> str:
    meta = json.dumps(prepared.meta, sort_keys=True)
    subjects = "|".join(prepared.subjects["subject_id"].astype(str)) + "|".join(prepared.subjects["split"].astype(str))
    return hashlib.sha256((str(Path(prepared.root).resolve()) + meta + subjects).encode()).hexdigest()[:16]


def segmenter_for(prepared, cache_path: str | Path | None, steps: int = 400, seed: int = 0,
                  device: torch.device | str = "cpu", val_subjects: int = 16, log=None) -> tuple[SegUNet, dict]:
    """Load the cached segmenter for this prepared dataset, or train it on the train split's masks
    and validate it (Dice per class) on the val split (falls back to test when val is empty)."""
    if prepared.masks is None:
        raise FileNotFoundError(f"'{prepared.root}/masks.npy' is missing: the segmenter needs ground-truth masks")
    fingerprint = _prepared_fingerprint(prepared)
    cache_path = Path(cache_path) if cache_path else None
    if cache_path is not None and cache_path.is_file():
        blob = torch.load(cache_path, map_location="cpu", weights_only=True)
        if (blob.get("fingerprint") == fingerprint and int(blob.get("steps", -1)) == steps
                and blob.get("version") == SEGMENTER_VERSION):
            model = SegUNet(**blob["config"])
            model.load_state_dict(blob["model"], strict=True)
            return model.eval(), dict(json.loads(blob["info"]), cached=True)
    train_idx = prepared.split_indices("train")
    if len(train_idx) == 0:
        raise RuntimeError(f"prepared dataset '{prepared.root}' has no train split to fit the segmenter on")
    # Frames of the train subjects, addressed lazily: (subject index, frame) pairs.
    frames = prepared.cine.shape[1]

    class _Frames:
        def __init__(self, arr):
            self.arr = arr

        def __len__(self):
            return len(train_idx) * frames

        def __getitem__(self, idx):
            idx = np.asarray(idx)
            return np.stack([np.asarray(self.arr[train_idx[i // frames], i % frames]) for i in idx])

    if log:
        log(f"training the LV segmenter on {len(train_idx)} train subjects ({steps} steps)")
    fit = fit_segmenter(_Frames(prepared.cine), _Frames(prepared.masks), steps=steps, seed=seed, device=device)
    val_idx = prepared.split_indices("val")
    val_split = "val"
    if len(val_idx) == 0:
        val_idx, val_split = prepared.split_indices("test"), "test"
    val_idx = val_idx[:val_subjects]
    info = {"architecture": "SegUNet(width=8): 2D U-Net per frame, 3 levels at half resolution",
            "trained_on": "train split ground-truth masks",
            "train_subjects": int(len(train_idx)), "steps": steps, "final_loss": fit.final_loss,
            "train_seconds": round(fit.seconds, 1), "validated_on": f"{val_split} split",
            "val_subjects": int(len(val_idx)), "dice": {}}
    if len(val_idx):
        cines = np.stack([np.asarray(prepared.cine[i]) for i in val_idx])
        truth = np.stack([np.asarray(prepared.masks[i]) for i in val_idx])
        info["dice"] = dice_per_class(segment(fit.model, cines, device=device), truth)
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_suffix(".tmp")
        torch.save({"model": fit.model.state_dict(), "config": fit.model.config, "fingerprint": fingerprint,
                    "steps": steps, "version": SEGMENTER_VERSION, "info": json.dumps(info)}, tmp)
        tmp.replace(cache_path)
    if log:
        dice = ", ".join(f"{k} {float(v):.3f}" for k, v in info["dice"].items()) or "not validated"
        log(f"LV segmenter trained in {fit.seconds:.0f} s ({val_split} Dice: {dice})"
            + (f"; saved to {cache_path}" if cache_path is not None else ""))
    return fit.model, dict(info, cached=False)


# ----------------------------------------------------------------------------------------------
# Curves and their metrics
# ----------------------------------------------------------------------------------------------


def lv_area_curves(labels) -> np.ndarray:
    """(N, T, H, W) labels -> (N, T) LV area in pixels."""
    labels = np.asarray(labels)
    return (labels == LV_LABEL).sum(axis=(-1, -2)).astype(np.float64)


def es_frame(curves) -> np.ndarray:
    """(N, T) -> (N,) index of the minimum area."""
    return np.argmin(np.asarray(curves), axis=-1)


def ef_area(curves) -> np.ndarray:
    """(N, T) -> (N,) area ejection fraction 100 * (A(0) - min A) / A(0), in percentage points
    (frame 0 = end-diastole; NaN when the LV is empty at frame 0)."""
    c = np.asarray(curves, dtype=np.float64)
    top, low = c[..., 0], c.min(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(top > 0, 100.0 * (top - low) / np.where(top > 0, top, 1.0), np.nan)


def circular_frame_error(a, b, period: int = 50) -> np.ndarray:
    d = np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) % period
    return np.minimum(d, period - d)


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x - x.mean(), y - y.mean()
    denom = math.sqrt(float((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / denom) if denom > 0 else float("nan")


def compare_curves(pred, ref, period: int = 50) -> dict[str, np.ndarray]:
    """Per-pair metrics between (N, T) curves ``pred`` and reference ``ref``."""
    pred, ref = np.asarray(pred, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if pred.shape != ref.shape:
        raise ValueError(f"curves must have one shape, got {pred.shape} and {ref.shape}")
    ref_max = ref.max(axis=-1)
    rmse = np.sqrt(((pred - ref) ** 2).mean(axis=-1))
    return {
        "es_frame_error": circular_frame_error(es_frame(pred), es_frame(ref), period),
        "ef_area_error": np.abs(ef_area(pred) - ef_area(ref)),
        "curve_corr": np.array([_pearson(p, r) for p, r in zip(pred, ref)]),
        "curve_rmse_px": rmse,
        "curve_rmse_rel": np.where(ref_max > 0, rmse / np.where(ref_max > 0, ref_max, 1.0), np.nan),
    }


def summarise(per_pair: dict[str, np.ndarray]) -> dict[str, float | int]:
    """Mean of each per-pair metric (NaNs ignored) plus the count of pairs it covers."""
    out: dict[str, float | int] = {}
    for key, values in per_pair.items():
        v = np.asarray(values, dtype=np.float64)
        ok = np.isfinite(v)
        out[key] = float(v[ok].mean()) if ok.any() else float("nan")
        out[f"{key}_n"] = int(ok.sum())
    return out


def compare_to_ground_truth(curves, gt_es=None, gt_ef=None, period: int = 50) -> dict[str, np.ndarray]:
    """Per-video errors of curve-derived ES frame / area EF against tabulated ground truth.
    ``gt_ef`` may be a fraction (all values <= 1) or percent; it is compared in percentage points."""
    out = {}
    if gt_es is not None:
        gt_es = np.asarray(gt_es, dtype=np.float64)
        ok = np.isfinite(gt_es)
        err = np.full(gt_es.shape, np.nan)
        err[ok] = circular_frame_error(es_frame(curves)[ok], gt_es[ok], period)
        out["es_frame_error"] = err
    if gt_ef is not None:
        gt_ef = np.asarray(gt_ef, dtype=np.float64)
        finite = gt_ef[np.isfinite(gt_ef)]
        scale = 100.0 if finite.size and np.nanmax(np.abs(finite)) <= 1.0 else 1.0
        out["ef_area_error"] = np.abs(ef_area(curves) - gt_ef * scale)
    return out
