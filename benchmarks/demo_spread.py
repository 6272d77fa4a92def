#!/usr/bin/env python
"""The demo's figures over training seeds: mean, sample std and every run.

    make demo && make demo SEED=1 && make demo SEED=2
    python benchmarks/demo_spread.py runs/demo runs/demo_seed1 runs/demo_seed2

Reads each run's ``eval/metrics.json`` (written by ``evaluation.py``) and prints one markdown table:
fidelity, the functional readouts of the generated test cines against the phantom's ground truth
and masks, and the floor of the segmenter on the real cines.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

# (label, path into metrics.json's "metrics")
ROWS = (
    ("FID (standard TF Inception, 10 frames/video)", ("fid", "value")),
    ("PSNR (dB, paired with the real cine)", ("psnr", "value")),
    ("SSIM", ("ssim", "value")),
    ("ES-frame error vs ground truth (frames, mean)", ("functional", "generated_vs_ground_truth", "es_frame_error")),
    ("area-EF error vs ground truth (points)", ("functional", "generated_vs_ground_truth", "ef_area_error")),
    ("LV area-curve r vs ground-truth masks", ("functional", "generated_vs_real_masks", "curve_corr")),
    ("floor: area-EF error of the real cines", ("functional", "real_vs_ground_truth", "ef_area_error")),
)


def lookup(metrics: dict, path: tuple[str, ...]) -> float | None:
    node = metrics
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    if isinstance(node, dict) and not node.get("available", True):
        return None
    return float(node) if isinstance(node, (int, float)) else None


def table(runs: list[Path]) -> str:
    loaded = []
    for run in runs:
        path = run / "eval" / "metrics.json"
        if not path.exists():
            raise SystemExit(f"'{path}' is missing: run `make demo` (and evaluation.py) for '{run}' first")
        loaded.append(json.loads(path.read_text())["metrics"])
    lines = [f"| metric | mean +- std over {len(runs)} runs | " + " | ".join(r.name for r in runs) + " |",
             "|---" * (len(runs) + 2) + "|"]
    for label, path in ROWS:
        values = [lookup(m, path) for m in loaded]
        ok = np.array([v for v in values if v is not None], dtype=np.float64)
        summary = (f"{ok.mean():.3g} +- {ok.std(ddof=1):.2g}" if len(ok) > 1 else
                   f"{ok[0]:.3g}" if len(ok) else "n/a")
        lines.append(f"| {label} | {summary} | " + " | ".join("n/a" if v is None else f"{v:.3g}" for v in values)
                     + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders, e.g. runs/demo runs/demo_seed1")
    print(table(parser.parse_args(argv).runs))


if __name__ == "__main__":
    main(sys.argv[1:])
