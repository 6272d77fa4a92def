#!/usr/bin/env python
"""Peak memory (and time) of one stage-2 training step at ``ukb.yaml`` sizes, batch 1.

    python benchmarks/vae_memory.py                       # CPU, configs/ukb.yaml, G + D step
    python benchmarks/vae_memory.py --device cuda         # GPU peak (torch.cuda.max_memory_allocated)
    python benchmarks/vae_memory.py --config configs/demo.yaml vae.clip_frames=0

One step is exactly what ``train_disentangle_vae3d.py`` does per batch (``VAETrainer.train_step``):
VAE forward with a posterior sample, L1 + KL (+ LPIPS when its weights are present), the PatchGAN
generator term with the adaptive weight, the G update, then the discriminator's hinge update
(``disc_start`` is set to 0 so both networks are measured). On CPU the peak is the process's
maximum resident set size (``ru_maxrss``) minus the resident size just before the step, which is
what the step itself adds (activations, gradients, optimiser state created on the first step).
Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--config", default=str(ROOT / "configs" / "ukb.yaml"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--no-gan", action="store_true", help="measure the VAE step alone")
    parser.add_argument("--frames", type=int, default=0,
                        help="frames per video (default data.num_frames = 50); activations scale linearly")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)

    import torch

    from ecgflowcmr.config import load_config
    from ecgflowcmr.vae.losses import MissingWeightsError
    from ecgflowcmr.vae.trainer import VAETrainer

    overrides = [f"device={args.device}", "vae.disc_start=0", f"vae.batch_size={args.batch}"]
    if args.no_gan:
        overrides.append("vae.disc_weight=0")
    cfg = load_config(args.config, overrides + list(args.overrides))
    device = torch.device(args.device)
    note = ""
    try:
        trainer = VAETrainer(cfg, device, total_steps=10)
    except MissingWeightsError:
        note = "LPIPS excluded: alexnet-owt-7be5be79.pth not in the weights folder (not measured)"
        cfg.vae.perceptual_weight = 0.0
        trainer = VAETrainer(cfg, device, total_steps=10)
    frames = args.frames or cfg.data.num_frames
    cine = torch.rand(args.batch, 1, frames, cfg.data.image_size, cfg.data.image_size) * 2 - 1
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = rss_bytes()
    t0, c0 = time.time(), time.process_time()
    stats = trainer.train_step(cine)
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.time() - t0, time.process_time() - c0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = {
        "config": str(args.config), "device": str(device), "batch": args.batch,
        "threads": torch.get_num_threads(), "frames": frames, "size": cfg.data.image_size,
        "vae_params_M": round(sum(p.numel() for p in trainer.model.parameters()) / 1e6, 2),
        "disc_params_M": round(sum(p.numel() for p in trainer.disc.parameters()) / 1e6, 2) if trainer.use_gan else 0,
        "gan": trainer.use_gan, "lpips": trainer.lpips is not None,
        "rss_before_step_GiB": round(before / 2**30, 2), "peak_rss_GiB": round(peak / 2**30, 2),
        "step_added_GiB": round((peak - before) / 2**30, 2),
        "step_wall_s": round(wall, 1), "step_cpu_s": round(cpu, 1), "loss": round(float(stats["loss"]), 4),
    }
    if device.type == "cuda":
        out["cuda_peak_allocated_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    if note:
        out["note"] = note
    print(json.dumps(out))


if __name__ == "__main__":
    main()
