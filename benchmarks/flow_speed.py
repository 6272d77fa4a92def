#!/usr/bin/env python
"""Stage 3/4 speed on this machine: seconds per generated video and peak memory, per model size.

    python benchmarks/flow_speed.py [--sizes demo ukb] [--steps 1 2 4 10] [--batch 8] [--guidance 2]
        [--measure-up-to-steps-demo 10] [--measure-up-to-steps-ukb 1] [--json benchmarks/flow_speed.json]

For each size (``configs/<size>.yaml``: ``demo`` or ``ukb``, i.e. hidden 512, depth 8, heads 8) and
each Euler step count, the DiT ODE integration is run with classifier-free guidance (conditional and
unconditional passes batched in one forward: 2 x batch rows per call) for ``--batch`` videos. Weights
are random (speed does not depend on them). Also timed per video (CPU seconds): the stage-1 encoder
forward and the VAE decode at that size, so ``total = encoder + flow + decode`` is the whole
ECG -> cine cost.
Peak memory is the process's resident-set high-water mark during the measurement (``VmHWM``, reset
before it; weights and the Python process included) on CPU; ``torch.cuda.max_memory_allocated`` on
CUDA.

Euler costs the same forward at every step, so a long run can be extrapolated from a measured one:
step counts above ``--measure-up-to-steps-<size>`` are reported as ``measured seconds per step x
steps`` and flagged ``extrapolated`` (the UK Biobank size takes minutes per step on a 2-core CPU).
Both wall-clock seconds and process CPU seconds are reported: on a shared machine the wall clock
includes waiting for the cores, the CPU seconds do not (uncontended wall ~ CPU / threads used).
Last, one training step (forward + backward + AdamW) at demo size and batch ``flow.batch_size``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ecgflowcmr.config import load_config  # noqa: E402
from ecgflowcmr.flow.dit import build_dit  # noqa: E402
from ecgflowcmr.flow.samplers import guided_velocity, integrate  # noqa: E402
from ecgflowcmr.flow.transport import TemplateAnchor, flow_matching_loss  # noqa: E402

LATENT = (4, 50, 12, 12)


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


class PeakMemory:
    """Peak memory (MiB) during the enclosed block: CUDA allocator, or the process's CPU RSS
    high-water mark (``/proc/self/clear_refs`` resets it first)."""

    def __init__(self, device: torch.device):
        self.device, self.mib = device, float("nan")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.mib = torch.cuda.max_memory_allocated() / 2 ** 20
        else:
            self.mib = _rss_kb("VmHWM:") / 2 ** 10


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_flow(dit, batch: int, steps: int, guidance: float, ecg_dim: int, device) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds for ``batch`` videos, peak MiB) of Euler with guidance, random inputs."""
    tokens = torch.randn(batch, 50, ecg_dim, device=device)
    pooled = torch.randn(batch, ecg_dim, device=device)
    anchor = TemplateAnchor(torch.zeros(LATENT[0], 1, *LATENT[2:]), 1.0)
    z0 = anchor.sample(torch.randn(batch, *LATENT, device=device))
    model = lambda z, t, tok, pool, drop: dit(z, t, tok, pool, drop)      # noqa: E731
    with PeakMemory(device) as mem, torch.no_grad():
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        integrate(guided_velocity(model, tokens, pooled, guidance), z0, steps, "euler")
        _sync(device)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return seconds, cpu, mem.mib


def time_encoder(cfg, batch: int, device) -> float:
    from ecgflowcmr.ecg.encoder import ECGEncoder

    enc = ECGEncoder.from_config(cfg.ecg).to(device).eval()
    t = torch.arange(5000, device=device) / 500.0
    ecg = (torch.sin(2 * torch.pi * 1.2 * t) ** 21).expand(batch, 12, 5000).contiguous()
    with torch.no_grad():
        enc(ecg[:1])
        _sync(device)
        c0 = time.process_time()
        enc(ecg)
        _sync(device)
    return (time.process_time() - c0) / batch


def time_decode(cfg, device, videos: int = 1) -> tuple[float, float]:
    from ecgflowcmr.vae import VAE3D

    vae = VAE3D.from_config(cfg.vae).to(device).eval()
    z = torch.randn(videos, cfg.vae.latent_channels, 50, 12, 12, device=device)
    with PeakMemory(device) as mem, torch.no_grad():
        _sync(device)
        c0 = time.process_time()
        vae.decode(z)
        _sync(device)
    return (time.process_time() - c0) / videos, mem.mib


def time_train_step(cfg, device, repeats: int = 3) -> dict:
    fl = cfg.flow
    dit = build_dit(fl, LATENT, ecg_dim=cfg.ecg.width).to(device)
    opt = torch.optim.AdamW(dit.parameters(), lr=fl.lr)
    b = fl.batch_size
    anchor = TemplateAnchor(torch.zeros(LATENT[0], 1, *LATENT[2:]), fl.alpha)
    z1 = torch.randn(b, *LATENT, device=device)
    tokens, pooled = torch.randn(b, 50, cfg.ecg.width, device=device), torch.randn(b, cfg.ecg.width, device=device)
    times, cpus = [], []
    for i in range(repeats + 1):
        with PeakMemory(device) as mem:
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            loss = flow_matching_loss(dit, z1, anchor, torch.rand(b, device=device), torch.randn_like(z1),
                                      ecg_tokens=tokens, ecg_pooled=pooled)
            opt.zero_grad()
            loss.backward()
            opt.step()
            _sync(device)
        if i:                                                 # first step warms up
            times.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
    return {"batch": b, "seconds_per_step": statistics.median(times), "cpu_seconds_per_step": statistics.median(cpus),
            "seconds_per_sample": statistics.median(times) / b, "peak_mib": mem.mib}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["demo", "ukb"])
    parser.add_argument("--steps", nargs="+", type=int, default=[1, 2, 4, 10])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--measure-up-to-steps-demo", type=int, default=10)
    parser.add_argument("--measure-up-to-steps-ukb", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-decode", action="store_true", help="skip the VAE decode / encoder timings")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "flow_speed.json"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    result = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                          "device": str(device)},
              "batch": args.batch, "guidance": args.guidance, "sampler": "euler", "sizes": {}}
    rows = []
    for size in args.sizes:
        cfg = load_config(ROOT / "configs" / f"{size}.yaml")
        fl = cfg.flow
        dit = build_dit(fl, LATENT, ecg_dim=cfg.ecg.width).to(device).eval()
        n_params = sum(p.numel() for p in dit.parameters())
        limit = getattr(args, f"measure_up_to_steps_{size}", 10)
        entry = {"hidden": fl.hidden, "depth": fl.depth, "heads": fl.heads, "patch_size": fl.patch_size,
                 "dit_parameters": n_params, "steps": {}}
        print(f"[{size}] DiT {n_params / 1e6:.1f} M parameters (hidden {fl.hidden}, depth {fl.depth}, "
              f"heads {fl.heads}, patch {fl.patch_size}); batch {args.batch}, guidance {args.guidance}", flush=True)
        time_flow(dit, 1, 1, 1.0, cfg.ecg.width, device)                   # warm-up
        per_step, measured = None, None
        for steps in sorted(args.steps):
            if per_step is not None and steps > limit:
                seconds, cpu = per_step[0] * steps, per_step[1] * steps
                mib, how = entry["steps"][str(measured)]["peak_mib"], "extrapolated"
            else:
                seconds, cpu, mib = time_flow(dit, args.batch, steps, args.guidance, cfg.ecg.width, device)
                per_step, measured, how = (seconds / steps, cpu / steps), steps, "measured"
            entry["steps"][str(steps)] = {"seconds_per_video": seconds / args.batch,
                                          "cpu_seconds_per_video": cpu / args.batch, "peak_mib": mib, "how": how}
            print(f"  {steps:>2} Euler steps: {seconds / args.batch:8.2f} s/video wall,"
                  f" {cpu / args.batch:8.2f} CPU-s/video,"
                  f" peak {mib:7.0f} MiB  ({how})", flush=True)
        if not args.no_decode:
            entry["encoder_seconds_per_video"] = time_encoder(cfg, args.batch, device)
            entry["decode_seconds_per_video"], entry["decode_peak_mib"] = time_decode(cfg, device)
            print(f"  encoder {entry['encoder_seconds_per_video']:.3f} CPU-s/video; VAE decode "
                  f"{entry['decode_seconds_per_video']:.2f} CPU-s/video"
                  f" (peak {entry['decode_peak_mib']:.0f} MiB)", flush=True)
        if size == "demo":
            entry["train_step"] = time_train_step(cfg, device)
            ts = entry["train_step"]
            print(f"  training step (batch {ts['batch']}): {ts['seconds_per_step']:.2f} s wall, "
                  f"{ts['cpu_seconds_per_step']:.2f} CPU-s ({ts['seconds_per_sample']:.3f} s/sample), "
                  f"peak {ts['peak_mib']:.0f} MiB", flush=True)
        result["sizes"][size] = entry
        for steps, r in entry["steps"].items():
            total = r["cpu_seconds_per_video"] + entry.get("encoder_seconds_per_video", 0) + \
                entry.get("decode_seconds_per_video", 0)
            rows.append(f"| {size} | {steps} | {r['seconds_per_video']:.2f} | {r['cpu_seconds_per_video']:.2f} | "
                        f"{total:.2f} | {r['peak_mib']:.0f} | {r['how']} |")
        del dit
    print("\n| size | Euler steps | flow s/video (wall) | flow CPU-s/video | total CPU-s/video (+encoder+decode) "
          "| flow peak MiB | |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
        print(f"\nwritten {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
