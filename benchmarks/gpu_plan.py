#!/usr/bin/env python
"""Plan each stage on a CUDA GPU in bf16 without one: parameters, peak memory, FLOPs, time.

    python benchmarks/gpu_plan.py --config configs/ukb.yaml
    python benchmarks/gpu_plan.py --config configs/ukb.yaml --gpus 8 --utilisation 0.3 flow.batch_size=8

Per stage (PA-MAE; VAE with its PatchGAN and LPIPS when on; flow DiT; generation with guidance as
``infer`` says): parameters, static memory (weights, gradients, AdamW, EMA, DDP buckets), saved
activations of a bf16 training step, the peak, the headroom on a ``--gpu-gb`` GPU, FLOPs per step
and per generated video, and the time this implies on an A100 / H100 at ``--utilisation`` of the
bf16 dense peak (A100 312, H100 SXM 989 TFLOP/s). How memory and FLOPs are estimated (fake
tensors with CUDA's autocast rules and flash attention): ``ecgflowcmr/gpu_plan.py``.
Exits 1 when a stage leaves less than ``--min-headroom``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--config", default=str(ROOT / "configs" / "ukb.yaml"))
    parser.add_argument("--subjects", type=int, default=42000,
                        help="paired subjects (UK Biobank: about 42k); the train share follows data.split_fractions")
    parser.add_argument("--gpus", type=int, default=1, help="data-parallel GPUs (batch sizes are per GPU)")
    parser.add_argument("--utilisation", type=float, default=0.4, help="fraction of the bf16 dense peak")
    parser.add_argument("--gpu-gb", type=float, default=80.0, help="GPU memory in GB (10^9 bytes)")
    parser.add_argument("--min-headroom", type=float, default=0.10)
    parser.add_argument("--json", default="", help="also write the numbers here")
    parser.add_argument("--measure", action="store_true",
                        help="also run each stage's step on this machine's GPU (random inputs): steps/s, peak")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. flow.batch_size=8")
    args = parser.parse_args(argv)

    from ecgflowcmr import gpu_plan
    from ecgflowcmr.config import load_config

    cfg = load_config(args.config, list(args.overrides))
    t0 = time.time()
    stages = gpu_plan.plan(cfg, args.subjects, args.gpus)
    print(f"{args.config}: {args.subjects} subjects ({cfg.data.split_fractions[0]:.0%} train), "
          f"{args.gpus} GPU(s), {args.utilisation:.0%} of the bf16 dense peak; a run = the configured epochs\n")
    print(gpu_plan.format_table(stages, args.gpu_gb, args.utilisation))
    gpu_bytes = args.gpu_gb * 1e9
    short = [s.stage for s in stages if s.headroom(gpu_bytes) < args.min_headroom]
    flow = stages[-1]
    sequences = (flow.infer_batch * (2 if cfg.infer.guidance != 1 else 1)
                 * (cfg.data.image_size // 8 // cfg.flow.patch_size) ** 2)
    print(f"\nflow: {flow.train.activations / flow.batch / 2**30:.2f} GiB of activations per video in a training "
          f"step; generation: {cfg.infer.steps} {cfg.infer.sampler} steps, guidance {cfg.infer.guidance}, "
          f"temporal-attention sequences per DiT call {sequences}")
    print(f"every stage leaves >= {args.min_headroom:.0%} of {args.gpu_gb:.0f} GB: "
          f"{'yes' if not short else 'NO (' + ', '.join(short) + ')'}   [{time.time() - t0:.0f} s to plan]")
    if args.measure:
        import torch

        if not torch.cuda.is_available():
            print("--measure needs a CUDA GPU; none is visible")
            return 2
        print(f"\nmeasured on {torch.cuda.get_device_name()} (bf16, random inputs, fused AdamW):")
        for stage, (name, section, step_fn) in zip(stages, gpu_plan.STAGES):
            got = gpu_plan.measure_cuda(cfg, section, step_fn)
            print(f"  {name}: {got['steps_per_s']:.2f} steps/s, {got['samples_per_s']:.1f} samples/s, "
                  f"peak {got['peak_gib']:.2f} GiB allocated (planned {stage.train.peak / 2**30:.2f})")
            torch.cuda.empty_cache()
        got = gpu_plan.measure_cuda_generation(cfg)
        print(f"  generation: {got['videos_per_s']:.2f} videos/s at batch {cfg.infer.batch_size}, "
              f"peak {got['peak_gib']:.2f} GiB (planned {flow.infer.peak / 2**30:.2f})")
    if args.json:
        rows = [{"stage": s.stage, "batch": s.batch, "params": s.params, "static_bytes": s.train.static,
                 "activation_bytes": s.train.activations, "peak_bytes": s.train.peak,
                 "headroom": s.headroom(gpu_bytes), "train_flops": s.train_flops,
                 "steps_per_epoch": s.steps_per_epoch, "epochs": s.epochs,
                 "infer_peak_bytes": s.infer.peak if s.infer else None, "video_flops": s.video_flops or None}
                for s in stages]
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 1 if short else 0


if __name__ == "__main__":
    sys.exit(main())
