#!/usr/bin/env python
"""The phantom benchmark: the chosen model, its ablations, the paper's model with each lever, baselines.

    python benchmarks/phantom.py --config configs/phantom_bench.yaml            # trains what is missing
    python benchmarks/phantom.py --config configs/demo.yaml --only full,euler_1  # reuse the demo run

Training variants each get a run folder ``<run_dir>/ablations/<name>/`` that links the base run's
prepared data, VAE and cached latents (and its stage-1 encoder unless the variant retrains it), so
every variant is trained on identical latents. Finished stages are skipped on re-runs.
Sampling variants reuse the full model's checkpoint. Baselines:
  * nearest neighbour: the training cine whose ECG is nearest (cosine, pooled stage-1 features);
  * template only: the decoded template, the same static frame 50 times (animated by nothing);
  * population mean: no cine, only readouts: every test subject gets the training split's median ES
    frame and mean area-EF (the functional columns a generator must beat to show it reads the ECG).
Ceiling: ``vae_reconstruction``, the real test cine through the VAE (posterior mean, decoded): what
any generator over these latents could reach at best.
Every variant is scored on the test split against the phantom's ground truth. Writes
``<run_dir>/bench/phantom_bench.{md,json}``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ecgflowcmr.config import load_config  # noqa: E402
from ecgflowcmr.data.datasets import Prepared, cine_from_uint8  # noqa: E402
from ecgflowcmr.flow.generator import ECGToCine, sample_seed  # noqa: E402
from ecgflowcmr.flow.retrieval import nearest_rows, pooled_features  # noqa: E402
from ecgflowcmr.metrics import functional  # noqa: E402
from ecgflowcmr.metrics import linear as L  # noqa: E402
from ecgflowcmr.metrics.io import CineSet  # noqa: E402
from ecgflowcmr.metrics.pipeline import evaluate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# The motion part of the bench's normalised latents (latent minus its time mean) holds 11.7 % of their
# variance around the template (train split, 410 subjects); weight 7 gives it about as much of the
# loss as the rest (8 x 11.7 % vs 88.3 %). configs/phantom_bench.yaml uses it.
MOTION_WEIGHT = 7
# The paper's flow: population-template anchor, alpha 1.0, plain velocity loss.
PAPER = ["flow.anchor=template", "flow.alpha=1.0", "flow.motion_weight=0"]
# name -> (config overrides on configs/phantom_bench.yaml, stages retrained besides the flow: "ecg" and/or
# "vae"; the others are the base run's). "full" is the chosen model (ECG anchor, alpha 0.5, motion
# weight 7); every other row changes one thing, at the same step budget unless its name says otherwise.
TRAINED = {
    "full": ([], ()),
    "seed_1": (["seed=1"], ()),                               # run-to-run spread of the flow stage
    "seed_2": (["seed=2"], ()),
    "no_pamae": (["ecg.phase_weight=0", "ecg.cycle_mode=window"], ("ecg",)),
    "template_anchor": (["flow.anchor=template"], ()),        # the paper's anchor, the other choices kept
    "no_template": (["flow.anchor=template", "flow.use_template=false"], ()),  # z0 = eps: no anchor at all
    "no_motion_weight": (["flow.motion_weight=0"], ()),
    "alpha_0.25": (["flow.alpha=0.25"], ()),
    "alpha_0.25_seed_1": (["flow.alpha=0.25", "seed=1"], ()),   # is alpha 0.25 beyond the seed spread?
    "alpha_0.25_seed_2": (["flow.alpha=0.25", "seed=2"], ()),
    "alpha_1.0": (["flow.alpha=1.0"], ()),
    "alpha_1.0_residual_frame": (["flow.alpha=1.0", "flow.anchor_residual=true"], ()),
    "residual_frame": (["flow.anchor_residual=true"], ()),    # the DiT reads z_t - head(ECG), not z_t
    "full_3x": (["flow.epochs=60"], ()),                      # 3x the flow steps: how compute-bound?
    # the VAE that beat the bench's at equal training time (benchmarks/vae_study.py): its own latents
    "vae_lr_4e-3": (["vae.lr=4.0e-3"], ("vae",)),
    # the DiT's size and the optimiser at about the full model's compute: epochs divided by the ratio of
    # training FLOPs per step (torch.utils.flop_counter, batch 8: 12.9 GFLOP for the full model's DiT)
    "batch_16": (["flow.batch_size=16"], ()),                 # half the steps, the same samples
    "lr_1e-3": (["flow.lr=1.0e-3"], ()),
    "lr_4e-3": (["flow.lr=4.0e-3"], ()),
    "width_96": (["flow.hidden=96", "flow.heads=4", "flow.epochs=9"], ()),   # 2.24x FLOPs per step
    "depth_4": (["flow.depth=4", "flow.epochs=10"], ()),                      # 1.99x
    "patch_1": (["flow.patch_size=1", "flow.epochs=5"], ()),                  # 3.95x (4x tokens)
    # the ECG anchor head with less capacity and fewer fitting steps (it overfits after ~500 steps on
    # version 2: its EF r was -0.28): does a head that regresses less to the mean carry the ECG's EF?
    "anchor_small": (["flow.anchor_hidden=32", "flow.anchor_steps=200"], ()),
    # the ECG's morphology beside stage 1's tokens: k whitened principal components of the 12 median beats
    # at stage 1's R-peaks (ecg/morphology.py) in the pooled condition of the DiT and of the anchor head
    "morphology_64": (["flow.morphology_dims=64"], ()),
    "morphology_64_seed_1": (["flow.morphology_dims=64", "seed=1"], ()),
    "morphology_64_seed_2": (["flow.morphology_dims=64", "seed=2"], ()),
    "morphology_32": (["flow.morphology_dims=32"], ()),
    "morphology_64_2x": (["flow.morphology_dims=64", "flow.epochs=40"], ()),    # 2x the flow steps
    # ... with Gaussian noise of SD 0.5 / 1 on the (unit-variance) code the DiT reads in training steps:
    # conditioning augmentation against memorising each subject's 64 numbers (its conditional val loss
    # was above its null one)
    "morphology_64_noise_0.5": (["flow.morphology_dims=64", "flow.morphology_noise=0.5"], ()),
    "morphology_64_noise_1": (["flow.morphology_dims=64", "flow.morphology_noise=1.0"], ()),
    # ... with the anchor fitted in closed form (ridge regression of the whole latent video on the pooled
    # condition, its L2 strength chosen on the val split) instead of gradient steps that overfit within 50
    "morphology_64_ridge": (["flow.morphology_dims=64", "flow.anchor_fit=ridge"], ()),
    "ridge_anchor": (["flow.anchor_fit=ridge"], ()),
    # ... the code read by the ridge anchor alone: the DiT conditions on stage 1's tokens as in `full`
    "morphology_64_ridge_anchor_only": (["flow.morphology_dims=64", "flow.anchor_fit=ridge",
                                         "flow.morphology_in=anchor"], ()),
    # k numbers that the median beats predict of the training cines' latents (reduced-rank ridge; training rows
    # read out-of-fold codes, as noisy as a new subject's) instead of the beats' own principal components
    "latent_4": (["flow.morphology_dims=4", "flow.morphology_code=latent"], ()),
    "latent_8": (["flow.morphology_dims=8", "flow.morphology_code=latent"], ()),
    "latent_16": (["flow.morphology_dims=16", "flow.morphology_code=latent"], ()),
    "latent_motion_4": (["flow.morphology_dims=4", "flow.morphology_code=latent_motion"], ()),
    # morphology_64 with the training subjects drawn by phenotype class (the phantom's `class` column, as a
    # diagnosis would be): each class a third of the draws (31 of 410 training hearts have EF < 40 %), or
    # shares as the square roots of the class counts
    "balanced": (["flow.morphology_dims=64", "flow.balance_by=class"], ()),
    "balanced_0.5": (["flow.morphology_dims=64", "flow.balance_by=class", "flow.balance_power=0.5"], ()),
    # the paper's model, and each lever added to it alone
    "paper": (PAPER, ()),
    "paper_3x": ([*PAPER, "flow.epochs=60"], ()),
    "paper_ecg_anchor": ([*PAPER, "flow.anchor=ecg"], ()),
    "paper_motion_weight": ([*PAPER, f"flow.motion_weight={MOTION_WEIGHT}"], ()),
    "paper_alpha_0.5": ([*PAPER, "flow.alpha=0.5"], ()),
    "paper_alpha_0.25": ([*PAPER, "flow.alpha=0.25"], ()),
    "paper_ecg_finetune": ([*PAPER, "flow.ecg_finetune=true"], ()),  # the encoder trains with the flow
    "paper_ecg_anchor_residual_frame": ([*PAPER, "flow.anchor=ecg", "flow.anchor_residual=true"], ()),
}
# stage a variant may retrain -> (its script, the run folders it writes: shared from the base run otherwise)
STAGES = {"ecg": ("train_ecg.py", ("ecg",)), "vae": ("train_disentangle_vae3d.py", ("vae", "latents"))}
# name -> (sampler, steps, guidance), all from the full model; euler_2 = "full" (the configs sample with 2 steps).
SAMPLED = {
    "euler_1": ("euler", 1, 1.0),
    "euler_2": ("euler", 2, 1.0),
    "euler_4": ("euler", 4, 1.0),
    "euler_10": ("euler", 10, 1.0),
    "heun_5": ("heun", 5, 1.0),      # 10 network evaluations, as euler_10
    "heun_10": ("heun", 10, 1.0),
    "guidance_2": ("euler", 10, 2.0),
    "guidance_3": ("euler", 10, 3.0),
    "euler_2_guidance_2": ("euler", 2, 2.0),   # the two best sampler levers together
    "euler_2_guidance_4": ("euler", 2, 4.0),   # version 2: does strong guidance push EF away from the mean?
}
BASELINES = ("nearest_neighbour", "template_only", "population_mean", "ecg_regressor")
# real_cine: the real test cines through the same readout (segmenter, FID features): what a generator that
# drew each subject's own heart would score; its EF error is the segmenter's, its FID/precision/recall the
# real-vs-real floor of the same frames.
CEILINGS = ("vae_reconstruction", "real_cine")


def run_stage(script: str, cfg_path: str, overrides: list[str], log: Path | None = None,
              threads: int | None = None) -> None:
    """One stage script in a subprocess; output to ``log`` (else inherited), ``threads`` torch threads."""
    cmd = [sys.executable, str(ROOT / script), "--config", cfg_path, *overrides]
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    print("$", " ".join(cmd), f"> {log}" if log else "", flush=True)
    if log is None:
        subprocess.run(cmd, check=True, cwd=ROOT, env=env)
        return
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise RuntimeError(f"{script} failed (exit {done.returncode}); last lines of {log}:\n{tail}")


def variant_dir(base: Path, name: str) -> Path:
    """Run folder of a training variant: the base run for ``full``, else ``<base>/ablations/<name>``."""
    return base if name == "full" else base / "ablations" / name


def link(src: Path, dst: Path) -> None:
    if dst.is_symlink() or dst.exists():
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.symlink_to(src.resolve(), target_is_directory=True)


def train_variants(cfg_path: str, cfg, names: list[str], extra: list[str], jobs: int = 1) -> dict[str, Path]:
    """Train (or reuse) every training variant; returns name -> flow checkpoint.

    ``jobs`` > 1 trains that many runs side by side (stages 1 and 2 of the base run, then the flow
    variants), each with ``cores // jobs`` torch threads: on a few CPU cores, separate processes
    scale better than intra-op threads.
    """
    base = cfg.run_path
    logs = base / "bench" / "logs"
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None
    run_stage("prepare_data.py", cfg_path, extra)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        stages = [pool.submit(run_stage, script, cfg_path, extra, logs / f"base_{script[:-3]}.log", threads)
                  for script in ("train_ecg.py", "train_disentangle_vae3d.py")]
        for fut in stages:
            fut.result()

    def one(name: str) -> Path:
        overrides, retrain = TRAINED[name]
        run_dir = variant_dir(base, name)
        if name != "full":
            for stage, (_, folders) in STAGES.items():
                for folder in folders if stage not in retrain else ():
                    link(base / folder, run_dir / folder)
        run = [*extra, f"run_dir={run_dir}", f"data.root={cfg.data_root.resolve()}", *overrides]
        t0 = time.perf_counter()
        for stage, (script, _) in STAGES.items():   # stage 2 also caches the variant's latents and template
            if stage in retrain:
                run_stage(script, cfg_path, run, logs / f"{name}_{stage}.log", threads)
        run_stage("train_flow.py", cfg_path, run, logs / f"{name}_flow.log", threads)
        print(f"trained {name} in {time.perf_counter() - t0:.0f} s", flush=True)
        return run_dir / "flow" / "best.pt"

    # Variants that retrain a stage are the longest: start them first; the rest in the table's order.
    order = sorted(names, key=lambda n: not TRAINED[n][1])
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {name: pool.submit(one, name) for name in order}
        return {name: fut.result() for name, fut in futures.items()}


LOW_EF = 40.0      # volume EF (%) below which a test heart counts as a case (version-2 truth: ef_volume)
MYO_LABEL = 5


def ed_readouts(labels: np.ndarray, mm_per_px: float) -> dict[str, np.ndarray]:
    """From label stacks ``(N, T, H, W)``: the LV end-diastolic (frame 0) area in mm^2 and a wall thickness
    in mm, that of a ring with the LV's and the myocardium's areas: sqrt((A_lv + A_myo) / pi) - sqrt(A_lv / pi).
    The same rule is applied to the true masks and to the segmenter's labels of a generated cine."""
    lv = (labels[:, 0] == functional.LV_LABEL).sum((-1, -2)).astype(np.float64)
    myo = (labels[:, 0] == MYO_LABEL).sum((-1, -2)).astype(np.float64)
    wall = np.sqrt((lv + myo) / np.pi) - np.sqrt(lv / np.pi)
    return {"lv_ed_area_mm2": lv * mm_per_px ** 2, "wall_mm": wall * mm_per_px}


class Scorer:
    """Scores generated test-split cines against the phantom: fidelity + functional readouts.

    ``test_cfg`` (default ``cfg``): the config whose prepared test split is scored, e.g. the held-out,
    case-enriched configs/phantom_eval_v2.yaml; the segmenter and the population mean always come from
    ``cfg``'s training split (what the generator trained on)."""

    def __init__(self, cfg, out_dir: Path, device: torch.device, fid_frames: int | None = None, test_cfg=None,
                 segmenter_path: Path | None = None):
        self.cfg, self.out_dir, self.device, self.fid_frames = cfg, out_dir, device, fid_frames
        self.test_cfg = test_cfg or cfg
        self.train_prepared = Prepared(cfg.data_root)
        self.prepared = Prepared(self.test_cfg.data_root) if test_cfg is not None else self.train_prepared
        self.test = self.prepared.split_indices("test")
        self.ids = self.prepared.subject_ids(self.test)
        self.segmenter, self.seg_info = functional.segmenter_for(
            self.train_prepared, segmenter_path or out_dir / "segmenter.pt", device=device, log=print)
        gt = self.prepared.subjects.iloc[self.test]
        self.gt_es = gt["es_frame"].to_numpy(np.float64)
        self.gt_ef = gt["ef_area"].to_numpy(np.float64)
        self.gt_ef_volume = gt["ef_volume"].to_numpy(np.float64) if "ef_volume" in gt.columns else None
        self.gt_class = gt["class"].astype(str).to_numpy() if "class" in gt.columns else None
        true_masks = np.asarray(self.prepared.masks[self.test])
        self.true_curves = functional.lv_area_curves(true_masks)
        crop = float(self.test_cfg.data.crop_mm)
        # pixel size of the model input; the relative crop has no one physical scale (version 1: ~1.89 mm)
        self.mm_per_px = crop / self.test_cfg.data.image_size if crop > 0 else 1.0
        self.true_ed = ed_readouts(true_masks, self.mm_per_px)

    def low_ef(self) -> np.ndarray | None:
        return None if self.gt_ef_volume is None else (self.gt_ef_volume < LOW_EF)

    def population_mean(self) -> dict:
        """Readouts only: the training median ES frame and mean area-EF for every test subject."""
        train = self.train_prepared.subjects.iloc[self.train_prepared.split_indices("train")]
        es = np.full(len(self.test), float(np.median(train["es_frame"])))
        ef = np.full(len(self.test), float(np.mean(train["ef_area"])))
        es_err = functional.circular_frame_error(es, self.gt_es)
        row = {"es_frame_error_median": float(np.median(es_err)), "es_frame_error_mean": float(np.mean(es_err)),
               "ef_area_mae": float(np.mean(np.abs(ef - self.gt_ef))), "n_videos": int(len(self.test))}
        if self.low_ef() is not None:
            row["lowef_auc"] = 0.5     # a constant score separates nothing
        return row

    def per_class(self, ef: np.ndarray, ed: dict[str, np.ndarray]) -> dict | None:
        """Generated vs true means per phantom class: area EF, LV ED area (mm^2), wall thickness (mm)."""
        if self.gt_class is None:
            return None
        out = {}
        for c in sorted(set(self.gt_class)):
            m = self.gt_class == c
            out[c] = {"n": int(m.sum()),
                      "ef_area_true": float(np.mean(self.gt_ef[m])), "ef_area_gen": float(np.nanmean(ef[m])),
                      "lv_ed_area_true": float(np.mean(self.true_ed["lv_ed_area_mm2"][m])),
                      "lv_ed_area_gen": float(np.mean(ed["lv_ed_area_mm2"][m])),
                      "wall_mm_true": float(np.mean(self.true_ed["wall_mm"][m])),
                      "wall_mm_gen": float(np.mean(ed["wall_mm"][m]))}
            if self.gt_ef_volume is not None:
                out[c]["ef_volume_true"] = float(np.mean(self.gt_ef_volume[m]))
        return out

    def readouts(self, cines: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
        """Segmenter readouts of cines ``(N, 1, 50, 96, 96)``: (LV curves, area EF, ED readouts)."""
        u8 = np.clip(np.rint((cines[:, 0] + 1) * 127.5), 0, 255).astype(np.uint8)
        labels = functional.segment(self.segmenter, u8, device=self.device)
        curves = functional.lv_area_curves(labels)
        return curves, functional.ef_area(curves).astype(np.float64), ed_readouts(labels, self.mm_per_px)

    def score(self, cines: np.ndarray, seconds_per_video: float | None) -> dict:
        """``cines`` (N_test, 1, 50, 96, 96) in [-1, 1], rows in test-split order."""
        u8 = np.clip(np.rint((cines[:, 0] + 1) * 127.5), 0, 255).astype(np.uint8)
        fake = CineSet("generated", list(self.ids), [0] * len(self.ids), u8)
        res = evaluate("split:test", fake, cfg=self.cfg, paired=True,
                       data_root=self.test_cfg.data_root, out_dir=self.out_dir / "eval_cache",
                       metrics=("psnr", "ssim", "lpips", "fid", "fvd"), device=self.device,
                       fid_frames=self.fid_frames)
        row = {}
        for name in ("psnr", "ssim", "lpips", "fid", "fvd"):
            entry = res["metrics"].get(name, {})
            row[name] = entry.get("value") if entry.get("available") else None
        fid_entry = res["metrics"].get("fid", {})
        row["precision"], row["recall"] = fid_entry.get("precision"), fid_entry.get("recall")
        labels = functional.segment(self.segmenter, u8, device=self.device)
        curves = functional.lv_area_curves(labels)
        ed = ed_readouts(labels, self.mm_per_px)
        vs_gt = functional.compare_to_ground_truth(curves, self.gt_es, self.gt_ef)
        vs_masks = functional.compare_curves(curves, self.true_curves)
        row.update(
            es_frame_error_median=float(np.nanmedian(vs_gt["es_frame_error"])),
            es_frame_error_mean=float(np.nanmean(vs_gt["es_frame_error"])),
            curve_corr=float(np.nanmean(vs_masks["curve_corr"])),
            ef_area_mae=float(np.nanmean(vs_gt["ef_area_error"])),
            seconds_per_video=seconds_per_video,
            n_videos=int(len(cines)))
        es = functional.es_frame(curves).astype(np.float64)
        row["es_frame_corr"] = float(np.corrcoef(es, self.gt_es)[0, 1]) if np.std(es) > 0 else None
        ef = functional.ef_area(curves).astype(np.float64)
        ok = np.isfinite(ef)
        row["ef_area_corr"] = float(np.corrcoef(ef[ok], self.gt_ef[ok])[0, 1]) if np.std(ef[ok]) > 0 else None
        low = self.low_ef()
        if low is not None:   # generated area EF as a low-EF score (lower EF = more likely a case)
            row["lowef_auc"] = L.auc(-np.where(ok, ef, np.nanmean(ef)), low)
        row["per_class"] = self.per_class(ef, ed)
        row["_es_frames"] = es.tolist()
        row["_ef_area"] = ef.tolist()
        row["_lv_ed_area_mm2"] = ed["lv_ed_area_mm2"].tolist()
        row["_wall_mm"] = ed["wall_mm"].tolist()
        return row


def generate_split(gen: ECGToCine, ecg: np.ndarray, ids: list[str], sampler: str, steps: int,
                   guidance: float, seed: int, batch: int) -> tuple[np.ndarray, float]:
    """Generate one cine per ECG; returns (cines (N, 1, 50, 96, 96), seconds per video)."""
    out, t0 = [], time.perf_counter()
    for i in range(0, len(ids), batch):
        rows = torch.from_numpy(np.asarray(ecg[i:i + batch], dtype=np.float32))
        seeds = [sample_seed(seed, sid, 0) for sid in ids[i:i + batch]]
        out.append(gen.generate(rows, seeds, sampler=sampler, steps=steps, guidance=guidance).cine.numpy())
    return np.concatenate(out), (time.perf_counter() - t0) / max(1, len(ids))


def nearest_neighbour(gen: ECGToCine, train: Prepared, test: Prepared, test_idx: np.ndarray,
                      batch: int) -> tuple[np.ndarray, float]:
    """The training cine whose ECG is nearest in the stage-1 pooled feature space (cosine)."""
    train_idx = train.split_indices("train")
    train_feats = pooled_features(gen, train.ecg[train_idx], batch)
    t0 = time.perf_counter()
    nearest = nearest_rows(pooled_features(gen, test.ecg[test_idx], batch), train_feats)
    cines = cine_from_uint8(np.asarray(train.cine[train_idx[nearest]]))[:, None]
    return cines, (time.perf_counter() - t0) / max(1, len(test_idx))


def vae_reconstruction(gen: ECGToCine, prepared: Prepared, test_idx: np.ndarray, batch: int) -> np.ndarray:
    """The real test cines encoded (posterior mean) and decoded: ``(N, 1, 50, 96, 96)``."""
    out = []
    for i in range(0, len(test_idx), batch):
        real = torch.from_numpy(cine_from_uint8(np.asarray(prepared.cine[test_idx[i:i + batch]]))[:, None])
        with torch.no_grad():
            z = gen.vae.encode(real.float().to(gen.device)).mode()
            out.append(gen.vae.decode(z).float().clamp(-1, 1).cpu().numpy())
    return np.concatenate(out)


def template_only(gen: ECGToCine, n: int) -> np.ndarray:
    """The decoded template, the same static frame 50 times, for ``n`` subjects."""
    return np.repeat(gen.template_video().float().cpu().numpy(), n, axis=0)


def faithfulness(gen: ECGToCine, scorer: Scorer, ecg: np.ndarray, seed: int, batch: int, steps: int) -> dict:
    """Swap ECGs between test subjects: does the generated motion follow the ECG given?

    Slot i keeps subject i's noise seed but gets the ECG of subject perm[i]. If motion follows the
    ECG, the generated ES frame and area-EF correlate with the ECG owner's truth, not the slot
    subject's; anatomy stays plausible if FID stays that of the unswapped generation.
    """
    n = len(scorer.ids)
    perm = np.roll(np.arange(n), n // 2)  # a derangement for n >= 2
    cines, _ = generate_split(gen, ecg[perm], scorer.ids, "euler", steps, 1.0, seed, batch)
    row = scorer.score(cines, None)
    es, ef = np.asarray(row["_es_frames"]), np.asarray(row["_ef_area"])
    ok = np.isfinite(ef)

    def corr(a, b):
        return float(np.corrcoef(a, b)[0, 1]) if len(a) > 2 and np.std(a) > 0 else None

    return {
        "what": "slot i keeps subject i's noise but gets the ECG of subject (i + n/2) mod n (its owner); "
                "generated ES frame and area-EF vs the owner's truth and the slot subject's truth",
        "es_frame_corr_with_ecg_owner": corr(es, scorer.gt_es[perm]),
        "es_frame_corr_with_slot_subject": corr(es, scorer.gt_es),
        "ef_area_corr_with_ecg_owner": corr(ef[ok], scorer.gt_ef[perm][ok]),
        "ef_area_corr_with_slot_subject": corr(ef[ok], scorer.gt_ef[ok]),
        "ef_area_mae_vs_ecg_owner": float(np.mean(np.abs(ef[ok] - scorer.gt_ef[perm][ok]))),
        "ef_area_mae_vs_slot_subject": float(np.mean(np.abs(ef[ok] - scorer.gt_ef[ok]))),
        **({} if scorer.low_ef() is None else {
            "lowef_auc_vs_ecg_owner": L.auc(-np.nan_to_num(ef, nan=np.nanmean(ef)), scorer.low_ef()[perm]),
            "lowef_auc_vs_slot_subject": L.auc(-np.nan_to_num(ef, nan=np.nanmean(ef)), scorer.low_ef())}),
        "true_es_frame_std": float(np.std(scorer.gt_es)),
        "true_ef_area_std": float(np.std(scorer.gt_ef)),
        "fid_swapped": row["fid"],
        "n": n,
    }


def diversity(gen: ECGToCine, scorer: Scorer, ecg: np.ndarray, samples: int, n: int, inf, seed: int,
              batch: int) -> dict:
    """``samples`` cines per test ECG (noise seeds k = 0..samples-1) for the first ``n`` test subjects: the
    per-ECG spread (sample SD over k) of the generated area EF and LV end-diastolic area, averaged over
    ECGs, beside the spread of the truth over the same subjects; the scores of one sample (averaged over k),
    to set beside a calibrated sampler (benchmarks/ecg_ceiling.py, ``sampled1_*``), and of the mean over k."""
    n = min(n or len(scorer.ids), len(scorer.ids))
    ids = scorer.ids[:n]
    ef, area = np.empty((samples, n)), np.empty((samples, n))
    t0 = time.perf_counter()
    for k in range(samples):
        out = []
        for i in range(0, n, batch):
            rows = torch.from_numpy(np.asarray(ecg[i:min(i + batch, n)], dtype=np.float32))
            seeds = [sample_seed(seed, sid, k) for sid in ids[i:i + batch]]
            out.append(gen.generate(rows, seeds, sampler=inf.sampler, steps=inf.steps,
                                    guidance=inf.guidance).cine.numpy())
        _, ef[k], ed = scorer.readouts(np.concatenate(out))
        area[k] = ed["lv_ed_area_mm2"]
    mean_ef = np.nanmean(ef, 0)
    res = {"what": f"{samples} samples per ECG (noise seeds 0..{samples - 1}), first {n} test subjects",
           "samples": samples, "n": n, "seconds": time.perf_counter() - t0,
           "ef_area_sd_per_ecg_mean": float(np.nanmean(np.nanstd(ef, 0, ddof=1))),
           "lv_ed_area_mm2_sd_per_ecg_mean": float(np.mean(np.std(area, 0, ddof=1))),
           "ef_area_sd_true_over_subjects": float(np.std(scorer.gt_ef[:n], ddof=1)),
           "lv_ed_area_mm2_sd_true_over_subjects": float(np.std(scorer.true_ed["lv_ed_area_mm2"][:n], ddof=1)),
           "ef_area_sd_generated_over_subjects_k0": float(np.nanstd(ef[0], ddof=1)),
           "single_sample_ef_area_corr": float(np.mean([L.pearson(e, scorer.gt_ef[:n]) for e in ef])),
           "mean_of_k_ef_area_corr": L.pearson(mean_ef, scorer.gt_ef[:n]),
           "mean_of_k_ef_area_mae": float(np.nanmean(np.abs(mean_ef - scorer.gt_ef[:n])))}
    low = scorer.low_ef()
    if low is not None:
        res["mean_of_k_lowef_auc"] = L.auc(-mean_ef, low[:n])
        res["single_sample_lowef_auc"] = float(np.mean([L.auc(-e, low[:n]) for e in ef]))
    if scorer.gt_class is not None:
        res["per_class_sd_per_ecg"] = {
            c: {"n": int((scorer.gt_class[:n] == c).sum()),
                "ef_area_sd": float(np.nanmean(np.nanstd(ef[:, scorer.gt_class[:n] == c], 0, ddof=1))),
                "lv_ed_area_mm2_sd": float(np.mean(np.std(area[:, scorer.gt_class[:n] == c], 0, ddof=1)))}
            for c in sorted(set(scorer.gt_class[:n]))}
    res["_ef_area"] = ef.tolist()
    res["_lv_ed_area_mm2"] = area.tolist()
    return res


def show(name: str, row: dict) -> None:
    print(name, {k: fmt(v) for k, v in row.items() if not k.startswith("_") and k != "per_class"}, flush=True)


def fmt(v, digits=3):
    if v is None or (isinstance(v, float) and np.isnan(v)):  # nan: e.g. the correlation of a constant curve
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def write_table(rows: dict, extra: dict, out: Path, cfg_path: str) -> str:
    """Write ``phantom_bench.{md,json}`` in ``out``. Rows of an earlier table of the same config are
    kept unless re-scored, so ``--only`` adds or refreshes rows of a finished benchmark."""
    previous = out / "phantom_bench.json"
    if previous.exists():
        old = json.loads(previous.read_text())
        if old.get("config") == cfg_path:
            rows = {**old.pop("rows", {}), **rows}
            extra = {**old, **extra, "checkpoints": {**old.get("checkpoints", {}), **extra.get("checkpoints", {})}}
    order = [*TRAINED, *SAMPLED, *BASELINES, *CEILINGS]
    rank = {name: i for i, name in enumerate(order)}    # "<row>@<model>" sorts after "<row>"
    rows = dict(sorted(rows.items(), key=lambda kv: (rank.get(kv[0].partition("@")[0], len(order)), kv[0])))
    cols = ["psnr", "ssim", "lpips", "fid", "fvd", "es_frame_error_median", "es_frame_corr", "curve_corr",
            "ef_area_mae", "ef_area_corr", "seconds_per_video"]
    if any("lowef_auc" in r or "precision" in r for r in rows.values()):   # the version-2 instrument's columns
        cols += ["lowef_auc", "precision", "recall"]
    n_test = next(iter(rows.values()))["n_videos"] if rows else "?"
    test_of = extra.get("test_config", cfg_path)
    where = "test split" if test_of == cfg_path else f"test split of {test_of}"
    lines = [f"# Phantom benchmark ({cfg_path}, {where}, n = {n_test})", "",
             "| variant | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(fmt(row.get(c)) for c in cols) + " |")
    lines += ["", "PSNR/SSIM/LPIPS paired with the real test cine; FID/FVD n/a where the weights are absent "
              "(see evaluation.py); ES-frame error (frames, median) and area-EF MAE (points) against the "
              "phantom's ground truth, es_frame_corr / ef_area_corr = Pearson r of generated and true "
              "ES frame / area-EF over "
              "subjects (n/a: not scored by this version or a constant); "
              "curve correlation (per video, then mean) against the ground-truth mask curves.", ""]
    if any(r.get("per_class") for r in rows.values()):
        lines += ["## Per class (generated / true means; area EF %, LV ED area mm^2, wall thickness mm, the "
                  "ring rule of `ed_readouts` on the segmenter's labels / the true masks)", "",
                  "| variant | class | n | EF gen | EF true | LV ED area gen | true | wall gen | true |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, row in rows.items():
            for c, v in (row.get("per_class") or {}).items():
                lines.append(f"| {name} | {c} | {v['n']} | {v['ef_area_gen']:.1f} | {v['ef_area_true']:.1f} | "
                             f"{v['lv_ed_area_gen']:.0f} | {v['lv_ed_area_true']:.0f} | {v['wall_mm_gen']:.2f} | "
                             f"{v['wall_mm_true']:.2f} |")
        lines.append("")
    for key in sorted(k for k in extra if k.startswith("diversity")):
        lines += [f"## Diversity ({key.partition('diversity_')[2] or 'full'})", "", "```",
                  json.dumps({k: v for k, v in extra[key].items() if not k.startswith("_")}, indent=1), "```", ""]
    for key in sorted(k for k in extra if k.startswith("faithfulness")):
        model = key.partition("faithfulness_")[2] or "full"
        lines += [f"## ECG swap ({model})", "", "```", json.dumps(extra[key], indent=1), "```", ""]
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "phantom_bench.md").write_text(text)
    clean = {k: {kk: vv for kk, vv in r.items() if not kk.startswith("_")} for k, r in rows.items()}
    extra_clean = {k: ({kk: vv for kk, vv in v.items() if not kk.startswith("_")} if isinstance(v, dict) else v)
                   for k, v in extra.items()}
    (out / "phantom_bench.json").write_text(json.dumps({"rows": clean, **extra_clean}, indent=1))
    # per-subject readouts of the rows scored in this call (AUCs and CIs can be recomputed from them)
    per = {k: {kk: vv for kk, vv in r.items() if kk.startswith("_")} for k, r in rows.items()
           if any(kk.startswith("_") for kk in r)}
    per.update({k: {kk: vv for kk, vv in v.items() if kk.startswith("_")} for k, v in extra.items()
                if isinstance(v, dict) and any(kk.startswith("_") for kk in v)})
    if per:
        old_per = out / "per_subject.json"
        merged = json.loads(old_per.read_text()) if old_per.exists() else {}
        merged.update(per)
        old_per.write_text(json.dumps(merged))
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--config", default="configs/phantom_bench.yaml")
    parser.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    parser.add_argument("--no-train", action="store_true", help="only score runs that already exist")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained side by side (default 1)")
    parser.add_argument("--checkpoint", action="append", default=[], metavar="NAME=PATH",
                        help="also score this flow checkpoint as row NAME (repeatable), e.g. a flow trained on "
                             "another config's data (configs/phantom_bench_2048.yaml); NAME may then be the "
                             "--swap-model or --sample-model")
    parser.add_argument("--swap-model", default="full",
                        help="the trained variant (or --checkpoint NAME) the ECG-swap test uses (default full)")
    parser.add_argument("--sample-model", default="full",
                        help="the trained variant (or --checkpoint NAME) the sampler rows and ecg_regressor use "
                             "(default full); rows of another model are named <row>@<model>, e.g. euler_2@seed_1")
    parser.add_argument("--fid-frames", type=int, default=10,
                        help="frames per video entering FID (evenly spaced; 0 = all 50)")
    parser.add_argument("--test-config", default="",
                        help="score on this config's prepared test split (e.g. configs/phantom_eval_v2.yaml: "
                             "240 held-out, case-enriched subjects); tables go to <run_dir>/bench_<its name>")
    parser.add_argument("--samples", type=int, default=0,
                        help="K > 1: also K samples per test ECG from the sample model (per-ECG spread)")
    parser.add_argument("--diversity-n", type=int, default=0, help="test subjects the K samples cover (0 = all)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    # the test set keeps its own config: overrides (run_dir, data.root, ...) are the trained run's
    test_cfg = load_config(args.test_config) if args.test_config else None
    torch.manual_seed(cfg.seed)
    rows_of_bench = [*TRAINED, *SAMPLED, *BASELINES, *CEILINGS, "faithfulness"]
    given = {}
    for item in args.checkpoint:
        name, _, path = item.partition("=")
        if not name or not path or name in rows_of_bench:
            parser.error(f"--checkpoint {item!r}: give NAME=PATH with a NAME that is not a row of the bench")
        if not Path(path).is_file():
            parser.error(f"--checkpoint {item!r}: no file '{path}' (train_flow.py writes <run_dir>/flow/best.pt)")
        given[name] = Path(path)
    for flag, name in (("--swap-model", args.swap_model), ("--sample-model", args.sample_model)):
        if name not in {*TRAINED, *given}:
            parser.error(f"{flag} {name!r}: not a trained variant or a --checkpoint NAME")
    wanted = [w for w in args.only.split(",") if w] or rows_of_bench
    unknown = [w for w in wanted if w not in rows_of_bench]
    if unknown:
        parser.error(f"unknown variants {unknown}")
    device = torch.device("cuda" if cfg.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    trained = [w for w in TRAINED if w in wanted]
    if args.no_train:
        ckpts = {n: variant_dir(cfg.run_path, n) / "flow" / "best.pt" for n in trained}
    else:
        ckpts = train_variants(args.config, cfg, [n for n in TRAINED if n in {*trained, "full"}], args.overrides,
                               args.jobs)
    ckpts.update(given)
    for name in ("full", args.swap_model, args.sample_model):
        ckpts.setdefault(name, variant_dir(cfg.run_path, name) / "flow" / "best.pt")
    out = cfg.run_path / ("bench" if test_cfg is None else f"bench_{test_cfg.name}")
    scorer = Scorer(cfg, out, device, fid_frames=args.fid_frames or None, test_cfg=test_cfg,
                    segmenter_path=cfg.run_path / "bench" / "segmenter.pt")
    ecg = np.asarray(scorer.prepared.ecg[scorer.test], dtype=np.float32)
    inf, seed, batch = cfg.infer, cfg.infer.seed, cfg.infer.batch_size
    rows: dict[str, dict] = {}
    extra = {"config": args.config, "test_config": args.test_config or args.config, "segmenter": scorer.seg_info,
             "checkpoints": {k: str(v) for k, v in ckpts.items()},
             "infer": {"sampler": inf.sampler, "steps": inf.steps, "guidance": inf.guidance, "seed": seed},
             "device": str(device), "torch_threads": torch.get_num_threads()}

    def record(name: str, row: dict) -> None:
        """Keep a scored row and rewrite the table at once: an interrupted run loses only the row in hand."""
        rows[name] = row
        show(name, row)
        write_table(rows, extra, out, args.config)

    loaded: dict[str, ECGToCine] = {}

    def model(name: str) -> ECGToCine:
        """A trained variant's generator, loaded once (the swap and sampler rows may share one)."""
        if name not in loaded:
            loaded[name] = ECGToCine.from_checkpoint(ckpts[name], device)
        return loaded[name]

    for name in [*trained, *given]:
        gen = model(name)
        cines, spv = generate_split(gen, ecg, scorer.ids, inf.sampler, inf.steps, inf.guidance, seed, batch)
        record(name, scorer.score(cines, spv))
    if "faithfulness" in wanted:
        key = "faithfulness" + ("" if args.swap_model == "full" else f"_{args.swap_model}")
        extra[key] = faithfulness(model(args.swap_model), scorer, ecg, seed, batch, inf.steps)
        print(key, extra[key], flush=True)
    needs_sampled = args.samples > 1 or "ecg_regressor" in wanted or any(n in wanted for n in SAMPLED)
    sampled = model(args.sample_model) if needs_sampled else None
    suffix = "" if args.sample_model == "full" else f"@{args.sample_model}"
    if args.samples > 1:
        key = "diversity" + ("" if args.sample_model == "full" else f"_{args.sample_model}")
        extra[key] = diversity(sampled, scorer, ecg, args.samples, args.diversity_n, inf, seed, batch)
        print(key, {k: v for k, v in extra[key].items() if not k.startswith("_")}, flush=True)
        write_table(rows, extra, out, args.config)
    for name, (sampler, steps, guidance) in SAMPLED.items():
        if name in wanted:
            cines, spv = generate_split(sampled, ecg, scorer.ids, sampler, steps, guidance, seed, batch)
            record(name + suffix, scorer.score(cines, spv))
    if "ecg_regressor" in wanted:            # the model's ECG anchor head alone, decoded: the
        t0, out_cines = time.perf_counter(), []   # cross-modal autoencoder (needs flow.anchor=ecg)
        for i in range(0, len(ecg), batch):
            out_cines.append(sampled.regress(torch.from_numpy(ecg[i:i + batch])).cine.numpy())
        record("ecg_regressor" + suffix,
               scorer.score(np.concatenate(out_cines), (time.perf_counter() - t0) / max(1, len(ecg))))
    if "nearest_neighbour" in wanted:
        record("nearest_neighbour", scorer.score(*nearest_neighbour(model("full"), scorer.train_prepared,
                                                                     scorer.prepared, scorer.test, batch)))
    if "template_only" in wanted:
        record("template_only", scorer.score(template_only(model("full"), len(scorer.ids)), None))
    if "population_mean" in wanted:
        record("population_mean", scorer.population_mean())
    if "vae_reconstruction" in wanted:     # every variant without its own stage 2 shares the base run's VAE
        vae_of = "full" if TRAINED.get(args.sample_model, ((), ()))[1] else args.sample_model
        record("vae_reconstruction",
               scorer.score(vae_reconstruction(model(vae_of), scorer.prepared, scorer.test, batch), None))
    if "real_cine" in wanted:    # the real test cines themselves: the readout's own floor (no model needed)
        record("real_cine", scorer.score(cine_from_uint8(np.asarray(scorer.prepared.cine[scorer.test]))[:, None], None))
    print(write_table(rows, extra, out, args.config))


if __name__ == "__main__":
    main()
