#!/usr/bin/env python
"""What buys VAE fidelity on the phantom bench for the least CPU time?

    python benchmarks/vae_study.py --config configs/phantom_bench.yaml --only bench,steps_2x,width_24

Every generator over these latents is capped by the VAE (the bench's ``vae_reconstruction`` row).
Each variant retrains stage 2 alone (``<run_dir>/vae_study/<name>/``, linking the base run's
prepared data) with one change to the bench's VAE, then encodes the 51 test cines (posterior mean),
decodes them and scores them like a benchmark row: PSNR / SSIM against the real cine, FID (10
frames/video), LV-curve r and area-EF error through the bench's segmenter. The table puts each
variant's training seconds (wall and CPU) beside its scores, so a change can be judged against
simply training longer (``steps_2x``). ``bench`` re-uses the base run's VAE as it is.

Writes ``<run_dir>/bench/vae_study.{md,json}``; finished variants are skipped, so a re-run only
trains and scores what is new.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import phantom as bench  # noqa: E402

from ecgflowcmr.config import load_config  # noqa: E402
from ecgflowcmr.flow.generator import load_stage2_vae  # noqa: E402

# name -> overrides on the bench config's VAE (1030 steps of batch 4, 5-frame clips, width 16, L1 only)
VARIANTS = {
    "bench": [],
    "steps_2x": ["vae.epochs=20"],
    "width_24": ["vae.base_channels=24"],
    "clip_10": ["vae.clip_frames=10"],
    "batch_8": ["vae.batch_size=8"],
    "adversarial": ["vae.disc_weight=0.5", "vae.disc_start=500", "vae.disc_channels=32"],
    "lr_4e-3": ["vae.lr=4.0e-3"],
}
COLUMNS = ("train_seconds", "train_cpu_seconds", "psnr", "ssim", "fid", "curve_corr", "ef_area_mae")


def train(cfg_path: str, cfg, name: str, extra: list[str]) -> Path:
    """Stage 2 of one variant (skipped when finished); returns its ``vae/best.pt``."""
    base = cfg.run_path
    if name == "bench":
        return base / "vae" / "best.pt"
    run_dir = base / "vae_study" / name
    run = [*extra, f"run_dir={run_dir}", f"data.root={cfg.data_root.resolve()}", *VARIANTS[name]]
    bench.run_stage("train_disentangle_vae3d.py", cfg_path, run, base / "bench" / "logs" / f"vae_{name}.log")
    return run_dir / "vae" / "best.pt"


def train_seconds(ckpt: Path) -> tuple[float | None, float | None]:
    """Wall and CPU seconds of the stage-2 run, from the last epoch of its ``log.jsonl``."""
    log = ckpt.parent / "log.jsonl"
    last = {}
    for line in log.read_text().splitlines() if log.exists() else []:
        entry = json.loads(line)
        if "seconds" in entry:
            last = entry
    return last.get("seconds"), last.get("cpu_seconds")


def write_table(rows: dict, out: Path, cfg_path: str) -> str:
    previous = out / "vae_study.json"
    if previous.exists():
        old = json.loads(previous.read_text())
        if old.get("config") == cfg_path:
            rows = {**old["rows"], **rows}
    rows = dict(sorted(rows.items(), key=lambda kv: list(VARIANTS).index(kv[0]) if kv[0] in VARIANTS else 99))
    lines = [f"# VAE study ({cfg_path}, test split reconstructions)", "",
             "| variant | overrides | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 2) + "|"]
    for name, row in rows.items():
        lines.append(f"| {name} | {' '.join(VARIANTS.get(name, [])) or '(bench VAE)'} | "
                     + " | ".join(bench.fmt(row.get(c), 1 if "seconds" in c else 3) for c in COLUMNS) + " |")
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "vae_study.md").write_text(text)
    (out / "vae_study.json").write_text(json.dumps({"config": cfg_path, "rows": rows}, indent=1))
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--config", default="configs/phantom_bench.yaml")
    parser.add_argument("--only", default="", help="comma-separated variants (default: all)")
    parser.add_argument("--fid-frames", type=int, default=10)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    names = [n for n in args.only.split(",") if n] or list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    device = torch.device("cuda" if cfg.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    out = cfg.run_path / "bench"
    done = json.loads((out / "vae_study.json").read_text())["rows"] if (out / "vae_study.json").exists() else {}
    scorer = None
    for name in names:
        if name in done:
            print(f"{name}: scored already", flush=True)
            continue
        ckpt = train(args.config, cfg, name, args.overrides)
        scorer = scorer or bench.Scorer(cfg, out, device, fid_frames=args.fid_frames or None)
        vae, _ = load_stage2_vae(ckpt, device)
        t0 = time.perf_counter()
        cines = bench.vae_reconstruction(SimpleNamespace(vae=vae.eval(), device=device), scorer.prepared,
                                         scorer.test, cfg.infer.batch_size)
        row = scorer.score(cines, (time.perf_counter() - t0) / len(cines))
        row["train_seconds"], row["train_cpu_seconds"] = train_seconds(ckpt)
        print(write_table({name: {k: v for k, v in row.items() if not k.startswith("_")}}, out, args.config),
              flush=True)


if __name__ == "__main__":
    main()
