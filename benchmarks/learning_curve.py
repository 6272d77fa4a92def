#!/usr/bin/env python
"""Learning curve of one flow variant on the phantom benchmark: how far does compute alone go?

    python benchmarks/learning_curve.py --config configs/phantom_bench.yaml --variant full \
        --steps 250,500,1000,2000,3000

One long run (``<run_dir>/curves/<variant>/``, linking the base run's data, encoder, VAE and
latents, as the benchmark's ablations do) saves its EMA weights at each step count
(``flow.snapshot_steps``); each snapshot is scored on the test split like a benchmark row (EF MAE,
EF r, LV-curve r, FID, and the ECG-swap test), against the flat lines of the benchmark's
nearest-neighbour, population-mean and VAE-reconstruction rows (``bench/phantom_bench.json``; run
``benchmarks/phantom.py`` first). The cosine schedule spans the whole run, so an early snapshot is
taken at a higher learning rate than a run of that length would end on.

Writes ``<run_dir>/bench/learning_curve_<variant>.{json,md,png}``; scored snapshots are kept, so a
re-run only scores what is new.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import phantom as bench  # noqa: E402

from ecgflowcmr.config import load_config  # noqa: E402
from ecgflowcmr.flow.generator import ECGToCine  # noqa: E402

COLUMNS = (("ef_area_mae", "EF MAE (points)"), ("ef_area_corr", "EF r"), ("curve_corr", "LV-curve r"),
           ("fid", "FID (10 frames/video)"), ("swap_ef_corr_owner", "swap: EF r with the ECG's owner"))
FLAT = ("nearest_neighbour", "population_mean", "vae_reconstruction")


def train_curve(cfg_path: str, cfg, variant: str, steps: list[int], extra: list[str], threads: int | None) -> Path:
    """Train (or resume) the long run; returns its folder."""
    base = cfg.run_path
    run_dir = base / "curves" / variant
    overrides, retrain = bench.TRAINED[variant]
    if retrain:
        raise SystemExit(f"variant '{variant}' retrains {' and '.join(retrain)}; "
                         "learning curves take flow-only variants")
    for _, folders in bench.STAGES.values():
        for folder in folders:
            bench.link(base / folder, run_dir / folder)
    n_train = len(json.loads((cfg.data_root / "splits.json").read_text())["train"])
    per_epoch = max(1, n_train // cfg.flow.batch_size)
    epochs = math.ceil(max(steps) / per_epoch)
    run = [*extra, f"run_dir={run_dir}", f"data.root={cfg.data_root.resolve()}", *overrides,
           f"flow.epochs={epochs}", f"flow.max_steps={max(steps)}", f"flow.val_every={max(1, epochs // 8)}",
           "flow.snapshot_steps=[" + ",".join(str(s) for s in steps) + "]"]
    bench.run_stage("train_flow.py", cfg_path, run, base / "bench" / "logs" / f"curve_{variant}_flow.log", threads)
    return run_dir


def plot(result: dict, flat: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted(int(s) for s in result["snapshots"])
    fig, axes = plt.subplots(1, len(COLUMNS), figsize=(4 * len(COLUMNS), 3.4))
    for ax, (key, label) in zip(axes, COLUMNS):
        ys = [result["snapshots"][str(s)].get(key) for s in steps]
        ax.plot(steps, [np.nan if y is None else y for y in ys], "o-", color="C0", label=result["variant"])
        for i, name in enumerate(FLAT):
            # a retrieval follows the ECG it is given by construction: its swap line is its own EF r
            value = flat.get(name, {}).get("ef_area_corr" if key == "swap_ef_corr_owner" else key)
            if value is not None and np.isfinite(value):
                ax.axhline(value, color=f"C{i + 1}", ls="--", lw=1, label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("flow steps (batch 8)")
        ax.set_title(label, fontsize=10)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Learning curve: {result['variant']} ({result['config']}, test n = {result['n']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--config", default="configs/phantom_bench.yaml")
    parser.add_argument("--variant", default="full", choices=list(bench.TRAINED))
    parser.add_argument("--steps", default="250,500,1000,2000,3000")
    parser.add_argument("--no-train", action="store_true", help="score the snapshots that exist")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the training run")
    parser.add_argument("--fid-frames", type=int, default=10)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    steps = sorted({int(s) for s in args.steps.split(",") if s})
    out = cfg.run_path / "bench"
    run_dir = cfg.run_path / "curves" / args.variant
    if not args.no_train:
        run_dir = train_curve(args.config, cfg, args.variant, steps, args.overrides, args.threads)
    table = out / "phantom_bench.json"
    if not table.is_file():
        raise SystemExit(f"'{table}' is missing: run benchmarks/phantom.py --config {args.config} first "
                         "(its baselines are the flat lines), then this again with --no-train")
    flat = json.loads(table.read_text())["rows"]
    json_path = out / f"learning_curve_{args.variant}.json"
    result = json.loads(json_path.read_text()) if json_path.is_file() else {}
    result.update(variant=args.variant, config=args.config, overrides=bench.TRAINED[args.variant][0])
    result.setdefault("snapshots", {})
    device = torch.device("cuda" if cfg.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    scorer = bench.Scorer(cfg, out, device, fid_frames=args.fid_frames or None)
    ecg = np.asarray(scorer.prepared.ecg[scorer.test], dtype=np.float32)
    inf = cfg.infer
    for step in steps:
        path = run_dir / "flow" / "snapshots" / f"step_{step:06d}.pt"
        if str(step) in result["snapshots"] or not path.is_file():
            continue
        gen = ECGToCine.from_checkpoint(path, device)
        cines, spv = bench.generate_split(gen, ecg, scorer.ids, inf.sampler, inf.steps, inf.guidance,
                                          inf.seed, inf.batch_size)
        row = {k: v for k, v in scorer.score(cines, spv).items() if not k.startswith("_")}
        swap = bench.faithfulness(gen, scorer, ecg, inf.seed, inf.batch_size, inf.steps)
        row["swap_ef_corr_owner"] = swap["ef_area_corr_with_ecg_owner"]
        row["swap_ef_corr_slot"] = swap["ef_area_corr_with_slot_subject"]
        result["snapshots"][str(step)] = row
        result["n"] = row["n_videos"]
        json_path.write_text(json.dumps(result, indent=1))
        print(step, {k: bench.fmt(v) for k, v in row.items()}, flush=True)
    cols = [c for c, _ in COLUMNS]
    lines = [f"# Learning curve: {args.variant} ({args.config}, test split, n = {result.get('n')})", "",
             "| flow steps | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for step in sorted(int(s) for s in result["snapshots"]):
        row = result["snapshots"][str(step)]
        lines.append(f"| {step} | " + " | ".join(bench.fmt(row.get(c)) for c in cols) + " |")
    for name in FLAT:
        if name in flat:
            lines.append(f"| {name} (flat) | " + " | ".join(bench.fmt(flat[name].get(c)) for c in cols) + " |")
    (out / f"learning_curve_{args.variant}.md").write_text("\n".join(lines) + "\n")
    if result["snapshots"]:
        plot(result, flat, out / f"learning_curve_{args.variant}.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
