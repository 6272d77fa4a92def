#!/usr/bin/env python
"""Timing on real ECGs: does the generated end-systole follow the ECG's own QT / RR?

    python benchmarks/real_timing.py --config configs/phantom_bench.yaml \
        [--checkpoint runs/phantom_bench_v2/flow/best.pt] [--wfdb examples/ecg] \
        [--mitdb tests/data/mitdb-100/100] [--samples 4] [--phantom-n 40]

Every real ECG record the repository ships:
  * PTB-XL (``examples/ecg``, 5 twelve-lead records, 500 Hz, read as the demo reads them);
  * MIT-BIH record 100 (``tests/data/mitdb-100``: its first 3 minutes, ODC-By, see its README), a
    two-lead ambulatory record (MLII, V5 at 360 Hz) cut into 10 s windows resampled to 500 Hz, MLII in the
    lead-II slot, V5 in V5 and the ten other leads zero (``data.annotated.annotated_windows``, as stage 1's
    benchmarks feed it). One subject: its windows vary in rate only a little, and ten zero leads are far from
    anything the model trained on; it is reported apart from PTB-XL.
Per ECG, from the ECG itself (lead II, neurokit2 ``ecg_clean`` + ``ecg_delineate`` (dwt) at the R-peaks of
``ecg.phase.detect_rpeaks``): the median over beats of RT / RR (R-peak to T end, as a share of the R-R
interval: where end-systole should fall in a cine whose frame 0 is the R-peak) and QT / RR (QRS onset to T
end). Generated: ``--samples`` cines per ECG, the ES frame (the smallest LV area the bench's segmenter reads)
over 50, averaged over samples. Reported: Pearson r of generated ES fraction vs RT / RR and QT / RR per set.
``--phantom-n`` phantom test ECGs calibrate the measure: the same neurokit2 RT / RR against the phantom's
true ES fraction (what the measure can reach when ES does follow the T end), and the generated one.
Writes ``<run_dir>/bench/real_timing.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ecgflowcmr.config import load_config  # noqa: E402
from ecgflowcmr.data.datasets import Prepared  # noqa: E402
from ecgflowcmr.data.phase import detect_rpeaks  # noqa: E402
from ecgflowcmr.metrics import functional  # noqa: E402
from ecgflowcmr.metrics.linear import pearson  # noqa: E402

FS = 500


def ecg_timing(ecg: np.ndarray, fs: int = FS) -> dict:
    """Median RT / RR and QT / RR over the beats of one ECG (12, T); nan where delineation fails."""
    import neurokit2 as nk

    out = {"rr_ms": np.nan, "rt_rr": np.nan, "qt_rr": np.nan, "n_beats": 0}
    try:
        r = np.asarray(detect_rpeaks(ecg, fs), dtype=np.int64)
        if len(r) < 3:
            return out
        clean = nk.ecg_clean(np.asarray(ecg[1], dtype=np.float64), sampling_rate=fs)
        _, waves = nk.ecg_delineate(clean, r, sampling_rate=fs, method="dwt")
    except Exception as err:  # noqa: BLE001 (delineation of a real record can fail in many ways)
        out["error"] = str(err)[:200]
        return out
    t_off = np.asarray(waves.get("ECG_T_Offsets", []), dtype=np.float64)
    q_on = np.asarray(waves.get("ECG_R_Onsets", []), dtype=np.float64)
    rt_rr, qt_rr, rr_all = [], [], []
    for i in range(min(len(r) - 1, len(t_off))):
        rr = r[i + 1] - r[i]
        rt = t_off[i] - r[i]
        if not np.isfinite(rt) or not (0 < rt < rr):
            continue
        rt_rr.append(rt / rr)
        rr_all.append(rr)
        if i < len(q_on) and np.isfinite(q_on[i]) and q_on[i] < r[i]:
            qt_rr.append((t_off[i] - q_on[i]) / rr)
    if rt_rr:
        out.update(rr_ms=float(np.median(rr_all)) * 1000 / fs, rt_rr=float(np.median(rt_rr)),
                   qt_rr=float(np.median(qt_rr)) if qt_rr else np.nan, n_beats=len(rt_rr))
    return out


def generated_es_fraction(gen, segmenter, ecgs: np.ndarray, ids: list[str], samples: int, seed: int,
                          inf, batch: int = 8) -> np.ndarray:
    """``(N, samples)`` ES frame / 50 of generated cines."""
    from ecgflowcmr.flow.generator import sample_seed

    out = np.empty((len(ecgs), samples))
    for k in range(samples):
        for i in range(0, len(ecgs), batch):
            rows = torch.from_numpy(np.asarray(ecgs[i:i + batch], dtype=np.float32))
            seeds = [sample_seed(seed, sid, k) for sid in ids[i:i + batch]]
            cine = gen.generate(rows, seeds, sampler=inf.sampler, steps=inf.steps, guidance=inf.guidance).cine.numpy()
            u8 = np.clip(np.rint((cine[:, 0] + 1) * 127.5), 0, 255).astype(np.uint8)
            curves = functional.lv_area_curves(functional.segment(segmenter, u8))
            out[i:i + batch, k] = functional.es_frame(curves) / curves.shape[1]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--config", default="configs/phantom_bench.yaml")
    parser.add_argument("--checkpoint", default="", help="flow checkpoint (default <run_dir>/flow/best.pt; "
                                                           "'none': the ECG measures and their phantom calibration only)")
    parser.add_argument("--wfdb", type=Path, default=Path("examples/ecg"))
    parser.add_argument("--mitdb", type=Path, default=Path("tests/data/mitdb-100/100"))
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--phantom-n", type=int, default=40, help="phantom test ECGs for the calibration rows")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    from benchmarks.ecg_metrics import read_wfdb_folder
    from ecgflowcmr.data.annotated import annotated_windows
    from ecgflowcmr.flow.generator import ECGToCine

    t0 = time.perf_counter()
    prepared = Prepared(cfg.data_root)
    gen = segmenter = None
    if args.checkpoint != "none":
        segmenter, _ = functional.segmenter_for(prepared, cfg.run_path / "bench" / "segmenter.pt", log=print)
        gen = ECGToCine.from_checkpoint(args.checkpoint or cfg.run_path / "flow" / "best.pt", "cpu")
    sets = {}
    names, ecgs = read_wfdb_folder(args.wfdb)
    sets["PTB-XL"] = (names, ecgs)
    windows, _ = annotated_windows(args.mitdb)
    sets["MIT-BIH 100"] = ([f"100_w{i:02d}" for i in range(len(windows))], windows)
    test = prepared.split_indices("test")[: args.phantom_n]
    sets["phantom test"] = (prepared.subject_ids(test), np.asarray(prepared.ecg[test], dtype=np.float32))
    true_es = prepared.subjects.iloc[test]["es_frame"].to_numpy(np.float64) / cfg.data.num_frames
    result = {"config": args.config, "samples": args.samples, "sets": {}}
    lines = ["# Real-ECG timing: generated ES fraction vs the ECG's RT / RR and QT / RR (neurokit2, lead II)", "",
             "| set | n | n timed | r(gen ES, RT/RR) | r(gen ES, QT/RR) | r(true ES, RT/RR) | mean gen ES | "
             "mean RT/RR | SD gen ES over ECGs | SD RT/RR |", "|---" * 10 + "|"]
    for name, (ids, x) in sets.items():
        timing = [ecg_timing(e) for e in x]
        es = (generated_es_fraction(gen, segmenter, x, ids, args.samples, cfg.infer.seed, cfg.infer) if gen is not None
              else np.full((len(ids), 1), np.nan))
        es_mean = es.mean(1)
        rt = np.array([t["rt_rr"] for t in timing])
        qt = np.array([t["qt_rr"] for t in timing])
        entry = {"n": len(ids), "n_timed": int(np.isfinite(rt).sum()),
                 "r_gen_es_vs_rt_rr": pearson(es_mean, rt), "r_gen_es_vs_qt_rr": pearson(es_mean, qt),
                 "per_ecg": [{"id": i, **t, "gen_es_fraction": float(m), "gen_es_samples": s.tolist()}
                             for i, t, m, s in zip(ids, timing, es_mean, es)]}
        if name == "phantom test":
            entry["r_true_es_vs_rt_rr"] = pearson(true_es, rt)
            entry["r_true_es_vs_qt_rr"] = pearson(true_es, qt)
            for p, t_es in zip(entry["per_ecg"], true_es):
                p["true_es_fraction"] = float(t_es)
            entry["r_gen_es_vs_true_es"] = pearson(es_mean, true_es)
        result["sets"][name] = entry
        ok = np.isfinite(rt)
        lines.append(f"| {name} | {len(ids)} | {entry['n_timed']} | {entry['r_gen_es_vs_rt_rr']:.2f} | "
                     f"{entry['r_gen_es_vs_qt_rr']:.2f} | {entry.get('r_true_es_vs_rt_rr', float('nan')):.2f} | "
                     f"{np.mean(es_mean):.3f} | {np.nanmean(rt):.3f} | {np.std(es_mean, ddof=1):.3f} | "
                     f"{np.std(rt[ok], ddof=1) if ok.sum() > 1 else float('nan'):.3f} |")
        print(lines[-1], flush=True)
    real = [e for n, e in result["sets"].items() if n != "phantom test"]
    es_all = np.concatenate([[p["gen_es_fraction"] for p in e["per_ecg"]] for e in real])
    rt_all = np.concatenate([[p["rt_rr"] for p in e["per_ecg"]] for e in real])
    result["r_all_real_gen_es_vs_rt_rr"] = pearson(es_all, rt_all)
    lines += ["", f"All real ECGs together (n = {len(es_all)}): r(gen ES, RT/RR) = "
                  f"{result['r_all_real_gen_es_vs_rt_rr']:.2f}", "",
              f"{args.samples} samples per ECG; {time.perf_counter() - t0:.0f} s in all."]
    result["seconds"] = time.perf_counter() - t0
    out = cfg.run_path / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / "real_timing.json").write_text(json.dumps(result, indent=1, default=float))
    text = "\n".join(lines) + "\n"
    (out / "real_timing.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
