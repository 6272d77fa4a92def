"""Evaluate generated cines against real ones: FID, FVD, LPIPS, PSNR, SSIM, LV functional metrics.

``python evaluation.py --config configs/demo.yaml --real split:test --fake runs/demo/samples
[--unpaired] [eval.fid_variant=paper ...]``

Writes ``<run_dir>/eval/metrics.json`` (every metric with its variant, N videos / frames, weight
sha256 hashes, bootstrap CIs when eval.bootstrap > 0), ``per_video.csv`` and ``report.md`` with
plots. Pretrained networks (FID Inception, I3D, LPIPS AlexNet) are read from eval.weights_dir
(default: the torch hub checkpoint folder) and never downloaded; a metric whose file is missing is
reported as unavailable with the file name, URL and folder, and the run still exits 0.
"""
from __future__ import annotations

import argparse
import logging
import shlex
import sys


def build_parser() -> argparse.ArgumentParser:
    from ecgflowcmr.cli import stage_parser

    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--real", default="split:test",
                        help="split:<train|val|test|all> of the prepared dataset, or a folder of .npy / .nii.gz cines")
    parser.add_argument("--fake", default=None,
                        help="folder of generated cines (default: infer.out_dir or <run_dir>/samples)")
    parser.add_argument("--unpaired", action="store_true", help="distribution metrics only (no pairing by subject)")
    parser.add_argument("--samples", choices=("first", "all"), default="first",
                        help="several samples per ECG: pair only sample 0 (first) or every sample (all)")
    parser.add_argument("--metrics", default="fid,fvd,lpips,psnr,ssim,functional",
                        help="comma-separated subset of fid,fvd,lpips,psnr,ssim,functional")
    parser.add_argument("--fid-frames", type=int, default=0,
                        help="frames per video entering FID, evenly spaced (0 = all frames, the standard)")
    parser.add_argument("--segmenter-steps", type=int, default=400,
                        help="training steps of the LV segmenter (cached in the eval folder)")
    parser.add_argument("--out", default=None, help="output folder (default: eval.out_dir or <run_dir>/eval)")
    return parser


def main(argv=None) -> int:
    from ecgflowcmr.cli import parse_stage_args

    cfg, args = parse_stage_args(__doc__.splitlines()[0], parser=build_parser(), argv=argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    log = logging.getLogger("ecgflowcmr.eval")

    from pathlib import Path

    from ecgflowcmr.config import save_config
    from ecgflowcmr.metrics.pipeline import evaluate
    from ecgflowcmr.metrics.report import write_outputs

    out_dir = Path(args.out or cfg.eval.out_dir or cfg.stage_dir("eval"))
    fake = args.fake or cfg.infer.out_dir or str(cfg.stage_dir("samples"))
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    try:
        result = evaluate(args.real, fake, cfg=cfg, paired=not args.unpaired, samples=args.samples,
                          out_dir=out_dir, metrics=metrics, segmenter_steps=args.segmenter_steps,
                          fid_frames=args.fid_frames or None, seed=cfg.seed, log=log.info)
    except (FileNotFoundError, ValueError) as err:
        log.error("%s", err)
        return 1
    command = "python evaluation.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    paths = write_outputs(result, out_dir, command=command)
    save_config(cfg, out_dir / "config.yaml")
    for name, entry in result["metrics"].items():
        if entry.get("available"):
            value = entry.get("value")
            log.info("%-10s %s", name, f"{value:.4g}" if isinstance(value, float) else "see metrics.json")
        else:
            log.info("%-10s unavailable: %s", name, entry.get("message") or entry.get("reason"))
    print(paths["metrics"])
    print(paths["report"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
