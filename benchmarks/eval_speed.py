#!/usr/bin/env python
"""Time evaluation.py's metrics on N generated vs N real cines (default 100 vs 100).

    python benchmarks/eval_speed.py                          # synthetic cines, every metric whose weights exist
    python benchmarks/eval_speed.py --data-root runs/demo/data   # phantom cines + the functional metrics
    python benchmarks/eval_speed.py --metrics fid --fid-frames 10 --device cuda

Real cines: synthetic moving blobs, or the first N subjects of a prepared dataset (``--data-root``).
Generated cines: the real ones with Gaussian noise and a 2-frame time shift, so every metric has
something to measure. Prints one JSON object: seconds per metric, frames per second where it
applies, the variant of each number and which metrics were unavailable (and why).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def synthetic_cines(n: int, seed: int = 0, t: int = 50, size: int = 96) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = np.empty((n, 1, t, size, size), dtype=np.float32)
    for i in range(n):
        cx, cy, r = rng.uniform(0.35, 0.65), rng.uniform(0.35, 0.65), rng.uniform(0.1, 0.2)
        for f in range(t):
            rr = r * (1 - 0.3 * math.sin(math.pi * f / t))
            blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * rr ** 2))
            out[i, 0, f] = -0.7 + 1.4 * blob + 0.05 * rng.normal(size=(size, size))
    return np.clip(out, -1, 1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-videos", type=int, default=100)
    parser.add_argument("--metrics", default="fid,fvd,lpips,psnr,ssim,functional")
    parser.add_argument("--weights", default="", help="weights folder ('' = torch hub checkpoint folder)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=16, help="as eval.batch_size")
    parser.add_argument("--fid-frames", type=int, default=0, help="frames per video for FID (0 = all 50)")
    parser.add_argument("--fid-variant", default="standard", choices=("standard", "paper"))
    parser.add_argument("--fvd-variant", default="standard", choices=("standard", "paper"))
    parser.add_argument("--data-root", default="", help="prepared dataset: real cines + segmenter training")
    parser.add_argument("--segmenter-steps", type=int, default=400)
    parser.add_argument("--out", default="", help="also write the JSON here")
    args = parser.parse_args(argv)

    import torch

    from ecgflowcmr.metrics.io import from_array
    from ecgflowcmr.metrics.pipeline import evaluate
    from ecgflowcmr.utils.device import select_device

    device = select_device(args.device)
    rng = np.random.default_rng(1)
    if args.data_root:
        from ecgflowcmr.metrics.io import load_prepared_split

        full = load_prepared_split(args.data_root, "all")
        real = full.subset(np.arange(min(args.n_videos, len(full))))
        metrics = args.metrics.split(",")
    else:
        real = from_array(synthetic_cines(args.n_videos), source="synthetic")
        metrics = [m for m in args.metrics.split(",") if m != "functional"]
    fake_float = real.cines.astype(np.float32) / 127.5 - 1.0
    fake_float = np.roll(fake_float, 2, axis=1) + rng.normal(0, 0.05, fake_float.shape).astype(np.float32)
    fake = from_array(np.clip(fake_float, -1, 1), subjects=real.subjects, source="real + noise + 2-frame shift")
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.time()
    result = evaluate(real, fake, device=device, metrics=metrics, weights=args.weights,
                      fid_variant=args.fid_variant, fvd_variant=args.fvd_variant, batch_size=args.batch_size,
                      fid_frames=args.fid_frames or None, segmenter_steps=args.segmenter_steps,
                      data_root=args.data_root or None, out_dir=None, bootstrap=0)
    total = time.time() - start
    timing = result["timing_seconds"]
    n = len(real)
    frames = int(real.cines.shape[0] * real.cines.shape[1])
    report = {"device": str(device), "torch_threads": torch.get_num_threads(), "n_real_videos": n,
              "n_fake_videos": len(fake), "frames_per_video": int(real.cines.shape[1]),
              "total_seconds": round(total, 1),
              "metrics": {}}
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)
    for name, entry in result["metrics"].items():
        row = {"available": bool(entry.get("available")), "seconds": timing.get(name)}
        if entry.get("available"):
            row["value"] = entry.get("value")
            row["variant"] = entry.get("variant") or entry.get("description")
            if name == "fid":
                row["frames_through_network"] = entry["n_real_frames"] + entry["n_fake_frames"]
                row["variant"] = f"{entry['variant']}: {entry['description']}"
            if name == "fvd":
                row["variant"] = f"{entry['variant']}: {entry['description']}"
            if name in ("psnr", "ssim", "lpips"):
                row["frames"] = 2 * frames
            if name == "functional":
                row["segmenter_train_seconds"] = entry["segmenter"].get("train_seconds")
                row["segmenter_dice"] = entry["segmenter"].get("dice")
        else:
            row["reason"] = entry.get("message") or entry.get("reason")
        if row.get("seconds") and row.get("frames_through_network"):
            row["frames_per_second"] = round(row["frames_through_network"] / row["seconds"], 1)
        report["metrics"][name] = row
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
