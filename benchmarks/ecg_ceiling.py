#!/usr/bin/env python
"""The ceiling rows: how much of the heart a linear reader gets from the ECG alone, on the bench's test set.

    python benchmarks/ecg_ceiling.py --config configs/phantom_bench.yaml \
        --test-config configs/phantom_eval_v2.yaml            # 240 held-out, case-enriched subjects

Readers, each fitted on the training split of ``--config`` (the subjects the generator trains on) and
scored on the test split of ``--test-config`` (default: ``--config``'s own test split):
  (a) ``raw_ecg``: a linear reader of the raw ECG: the R-aligned median beat of each of the 12 leads,
      -250..+550 ms at 40 points a lead, plus heart rate, standardised (ecgflowcmr.metrics.linear);
  (b) ``stage1_pooled``: a linear probe of the stage-1 encoder's pooled tokens (the mean over its 50 cycle
      tokens, what conditions the DiT's adaLN), and ``stage1_tokens5``: the tokens averaged in 5 groups of 10
      (phase-resolved). (b) below (a) says that stage 1 loses what the ECG carries; (b) near (a) and the
      generator below both, that the flow does.
  (c) ``raw_ecg_stage1_rpeaks``: reader (a) with the beats cut at stage 1's R-peaks (its phase wraps)
      instead of the prepared consensus R-peaks; ``morphology_<k>``: a linear probe of the k-number
      morphology code (``flow.morphology_dims``, ecg/morphology.py: whitened PCA of those beats fitted on
      the training ECGs), what the flow is given beside the tokens with that switch;
      ``latent_code_<k>`` / ``latent_motion_code_<k>``: a probe of the k-number latent code
      (``flow.morphology_code=latent`` / ``latent_motion``: the directions of the training cines' latents, or
      of their motion, those beats predict best), fitted on the training rows' out-of-fold codes as the flow
      reads them, and ``..._in_sample`` on their in-sample codes (needs stage 2's cached latents).
Per reader: ridge regression of volume EF and of area EF, L2 logistic regression of volume EF < 40 %,
the L2 strength chosen by 5-fold cross-validation on the training rows only. Reported on the test set:
  * ``lowef_auc``: AUC of the logistic probability for volume EF < 40 %;
  * ``lowef_auc_area``: AUC of minus the predicted *area* EF for the same label: the score the generator is
    judged by (its EF is an area EF read by the segmenter), like with like;
  * ``ef_volume_r`` / ``ef_volume_mae`` against the true volume EF, ``ef_area_r`` / ``ef_area_mae`` against
    the true area EF (the phantom's, the same definition as the segmenter readout of metrics/functional.py);
  * the population mean of the training split on the same subjects (``*_mae_mean``);
  * 95 % bootstrap intervals over test subjects; 5-fold CV scores within the training split.
  * ``sampled1_*`` / ``sampled4_*``: the area-EF r and low-EF AUC of a generator calibrated to the reader: a
    draw (the mean of 4 draws) per subject from N(m, s^2), m the predicted area EF rescaled to the truth by
    least squares, s the SD of the truth around m (metrics.linear.calibrated_draws), averaged over 200
    draws: what one generated cine a subject can score is the first (r^2), not the reader's r.
Writes ``<run_dir>/bench/ecg_ceiling[_<test name>].{json,md}``.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ecgflowcmr.config import load_config  # noqa: E402
from ecgflowcmr.data.datasets import Prepared  # noqa: E402
from ecgflowcmr.ecg.morphology import MorphologyCode, beat_features, fit_latent_code, latent_targets  # noqa: E402
from ecgflowcmr.metrics import linear as L  # noqa: E402

LOW_EF = 40.0     # volume EF (%) below which a heart counts as a case


def raw_features(prepared: Prepared, idx: np.ndarray, fs: int) -> np.ndarray:
    return np.stack([L.median_beat_features(np.asarray(prepared.ecg[i]), prepared.rpeaks_of(int(i)), fs)
                     for i in idx])


@torch.no_grad()
def stage1_features(encoder, prepared: Prepared, idx: np.ndarray, batch: int = 32) -> dict[str, np.ndarray]:
    pooled, grouped, beats = [], [], []
    for s in range(0, len(idx), batch):
        rows = torch.from_numpy(np.asarray(prepared.ecg[idx[s:s + batch]], dtype=np.float32))
        out = encoder(rows)
        beats.append(beat_features(encoder, rows, out).numpy())
        pooled.append(out.pooled.float().numpy())
        tok = out.tokens.float()                                        # (B, 50, D)
        grouped.append(tok.reshape(tok.shape[0], 5, -1, tok.shape[-1]).mean(2).flatten(1).numpy())
    return {"stage1_pooled": np.concatenate(pooled), "stage1_tokens5": np.concatenate(grouped),
            "raw_ecg_stage1_rpeaks": np.concatenate(beats)}


def training_latents(cfg, train_idx: np.ndarray) -> torch.Tensor | None:
    """Stage 2's normalised latents of the training rows ``train_idx`` (in that order), ``(N, C, T, h, w)``,
    as the flow reads them; None without the cache."""
    from ecgflowcmr.flow.trainer import LatentSplit
    from ecgflowcmr.flow.transport import LatentNorm
    from ecgflowcmr.utils.checkpoint import load_checkpoint

    latents = cfg.run_path / "latents"
    if not (latents / "train.npy").is_file() or not (latents / "template.pt").is_file():
        return None
    split = LatentSplit(latents, "train")
    where = {int(p): i for i, p in enumerate(split.prepared_index)}
    if any(int(i) not in where for i in train_idx):
        raise SystemExit(f"'{latents}/train_index.csv' lacks training rows of the prepared data: re-run the "
                         "latent extraction (train_disentangle_vae3d.py --extract-only)")
    norm = LatentNorm.from_template(load_checkpoint(latents / "template.pt"))
    return norm.normalize(torch.from_numpy(np.stack([np.asarray(split.z[where[int(i)]], dtype=np.float32)
                                                     for i in train_idx])))


def truth(prepared: Prepared, idx: np.ndarray) -> dict[str, np.ndarray]:
    sub = prepared.subjects.iloc[idx]
    missing = [c for c in ("ef_volume", "ef_area") if c not in sub.columns]
    if missing:
        raise SystemExit(f"'{prepared.root}/subjects.csv' has no {missing}: the ceiling needs a version-2 phantom "
                         f"(its manifest holds the true volume EF)")
    return {"ef_volume": sub["ef_volume"].to_numpy(np.float64), "ef_area": sub["ef_area"].to_numpy(np.float64),
            "cls": sub["class"].astype(str).to_numpy() if "class" in sub.columns else None}


def read(name: str, x_train, t_train, x_test, t_test) -> dict:
    """Fit the three linear heads of one feature set and score them on the test rows."""
    t0 = time.perf_counter()
    y_low = (t_train["ef_volume"] < LOW_EF).astype(float)
    test_low = (t_test["ef_volume"] < LOW_EF).astype(float)
    st = L.Standardiser(x_train)
    xs, xt = st(x_train), st(x_test)
    row: dict = {"reader": name, "n_features": int(x_train.shape[1])}
    lam_log, cv_log = L.cv_select(x_train, y_low, L.fit_logistic, L.auc)
    p = L.fit_logistic(xs, y_low, lam_log)(xt)
    row.update(lowef_auc=L.auc(p, test_low), lowef_auc_ci=L.bootstrap_ci(L.auc, p, test_low),
               lam_logistic=lam_log, cv_lowef_auc=cv_log[lam_log])
    for target in ("ef_volume", "ef_area"):
        lam, cv = L.cv_select(x_train, t_train[target], L.fit_ridge, L.pearson)
        pred = L.fit_ridge(xs, t_train[target], lam)(xt)
        y = t_test[target]
        row.update({f"{target}_r": L.pearson(pred, y), f"{target}_r_ci": L.bootstrap_ci(L.pearson, pred, y),
                    f"{target}_mae": float(np.mean(np.abs(pred - y))),
                    f"{target}_mae_mean": float(np.mean(np.abs(t_train[target].mean() - y))),
                    f"lam_{target}": lam, f"cv_{target}_r": cv[lam]})
        if target == "ef_area":
            row["lowef_auc_area"] = L.auc(-pred, test_low)
            row["lowef_auc_area_ci"] = L.bootstrap_ci(L.auc, -pred, test_low)
            for k in (1, 4):
                got = L.calibrated_draws(pred, y, test_low, k)
                row.update({f"sampled{k}_ef_area_r": got["r"], f"sampled{k}_lowef_auc_area": got["auc"]})
            row["ef_area_residual_sd"] = got["residual_sd"]
            row["_pred_ef_area"] = pred.tolist()
    row["seconds"] = time.perf_counter() - t0
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--config", default="configs/phantom_bench.yaml")
    parser.add_argument("--test-config", default="", help="config whose prepared test split is scored "
                                                         "(default: --config's own test split)")
    parser.add_argument("--encoder", default="", help="stage-1 checkpoint (default <run_dir>/ecg/best.pt; "
                                                      "'none' skips the stage-1 probes)")
    parser.add_argument("--morphology-dims", default="16,32,64",
                        help="comma-separated k: a probe of each k-number morphology code ('' for none)")
    parser.add_argument("--latent-dims", default="4,8,16",
                        help="comma-separated k: a probe of each k-number latent code ('' for none)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    test_cfg = load_config(args.test_config) if args.test_config else cfg   # overrides: the trained run's
    train_p, test_p = Prepared(cfg.data_root), Prepared(test_cfg.data_root)
    train_idx, test_idx = train_p.split_indices("train"), test_p.split_indices("test")
    fs = cfg.data.ecg_fs
    t0 = time.perf_counter()
    t_train, t_test = truth(train_p, train_idx), truth(test_p, test_idx)
    feats = {"raw_ecg": (raw_features(train_p, train_idx, fs), raw_features(test_p, test_idx, fs))}
    timing = {"raw_features_s": time.perf_counter() - t0}
    enc_path = Path(args.encoder) if args.encoder not in ("", "none") else cfg.run_path / "ecg" / "best.pt"
    if args.encoder != "none" and enc_path.is_file():
        from ecgflowcmr.ecg.encoder import load_ecg_encoder

        t0 = time.perf_counter()
        encoder = load_ecg_encoder(enc_path, "cpu", cfg.ecg.cycle_mode)
        a, b = stage1_features(encoder, train_p, train_idx), stage1_features(encoder, test_p, test_idx)
        for key in a:
            feats[key] = (a[key], b[key])
        for k in [int(v) for v in args.morphology_dims.split(",") if v]:
            code = MorphologyCode.fit(a["raw_ecg_stage1_rpeaks"], k)
            feats[f"morphology_{k}"] = tuple(code(torch.from_numpy(x)).numpy()
                                             for x in (a["raw_ecg_stage1_rpeaks"], b["raw_ecg_stage1_rpeaks"]))
        latent_dims = [int(v) for v in args.latent_dims.split(",") if v]
        z = training_latents(cfg, train_idx) if latent_dims else None
        for kind, k in itertools.product(("latent", "latent_motion") if z is not None else (), latent_dims):
            code, oof, _ = fit_latent_code(a["raw_ecg_stage1_rpeaks"], latent_targets(z, kind), k, seed=cfg.seed)
            test_code = code(torch.from_numpy(b["raw_ecg_stage1_rpeaks"])).numpy()
            feats[f"{kind}_code_{k}"] = (oof, test_code)
            feats[f"{kind}_code_{k}_in_sample"] = (code(torch.from_numpy(a["raw_ecg_stage1_rpeaks"])).numpy(),
                                                   test_code)
        if latent_dims and z is None:
            print(f"no cached latents under '{cfg.run_path / 'latents'}': latent-code probes skipped", flush=True)
        timing["stage1_features_s"] = time.perf_counter() - t0
    elif args.encoder != "none":
        print(f"no stage-1 checkpoint at '{enc_path}' (train_ecg.py writes it): stage-1 probes skipped", flush=True)
    rows = {name: read(name, xa, t_train, xb, t_test) for name, (xa, xb) in feats.items()}
    low = t_test["ef_volume"] < LOW_EF
    classes = {}
    if t_test["cls"] is not None:
        for c in sorted(set(t_test["cls"])):
            m = t_test["cls"] == c
            classes[c] = {"n": int(m.sum()), "ef_volume_mean": float(t_test["ef_volume"][m].mean()),
                          "ef_area_mean": float(t_test["ef_area"][m].mean()), "n_low_ef": int(low[m].sum())}
    result = {
        "config": args.config, "test_config": args.test_config or args.config,
        "train": {"root": str(train_p.root), "n": int(len(train_idx)),
                  "n_low_ef": int((t_train["ef_volume"] < LOW_EF).sum())},
        "test": {"root": str(test_p.root), "n": int(len(test_idx)), "n_low_ef": int(low.sum()),
                 "ef_volume_sd": float(t_test["ef_volume"].std()), "ef_area_sd": float(t_test["ef_area"].std()),
                 "classes": classes, "subject_ids": test_p.subject_ids(test_idx)},
        "low_ef_threshold_volume_pct": LOW_EF, "timing": timing,
        "rows": rows,
    }
    suffix = "" if not args.test_config else f"_{test_cfg.name}"
    out = cfg.run_path / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"ecg_ceiling{suffix}.json").write_text(json.dumps(result, indent=1))
    cols = ["lowef_auc", "lowef_auc_area", "ef_volume_r", "ef_volume_mae", "ef_volume_mae_mean",
            "ef_area_r", "ef_area_mae", "ef_area_mae_mean", "cv_lowef_auc", "cv_ef_volume_r",
            "sampled1_ef_area_r", "sampled1_lowef_auc_area", "sampled4_ef_area_r", "sampled4_lowef_auc_area",
            "ef_area_residual_sd"]

    def f(v):
        if isinstance(v, list):
            return f"[{v[0]:.2f}, {v[1]:.2f}]"
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = [f"# ECG ceiling: linear readers, trained on {result['train']['n']} ({result['train']['n_low_ef']} "
             f"low-EF), tested on {result['test']['n']} ({result['test']['n_low_ef']} with volume EF < {LOW_EF:.0f} %)",
             "", "| reader | " + " | ".join(cols) + " | AUC 95 % CI | EF-area r CI |",
             "|---" * (len(cols) + 3) + "|"]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(f(row[c]) for c in cols)
                     + f" | {f(row['lowef_auc_ci'])} | {f(row['ef_area_r_ci'])} |")
    lines += ["", "Test classes: " + ", ".join(f"{c} {v['n']} (low EF {v['n_low_ef']}, volume EF "
                                                f"{v['ef_volume_mean']:.1f}, area EF {v['ef_area_mean']:.1f})"
                                                for c, v in classes.items())]
    text = "\n".join(lines) + "\n"
    (out / f"ecg_ceiling{suffix}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
