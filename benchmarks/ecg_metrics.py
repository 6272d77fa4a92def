#!/usr/bin/env python
"""Stage-1 metrics on the phantom and on real ECGs, for one or more PA-MAE checkpoints, as markdown.

    python benchmarks/ecg_metrics.py --checkpoint [NAME=]runs/demo/ecg/best.pt [--checkpoint ...] \\
        --data runs/demo/data --split test [--wfdb examples/ecg] [--mitdb PATH/100] \\
        [--cycle-mode median] [--json out.json]

Data sets (columns):
- the prepared split (reference R-peaks: the dataset's ``rpeaks.npy``);
- ``--wfdb``: the real 12-lead records of a folder of WFDB headers (PTB-XL in ``examples/ecg``);
  reference: the R-peak labels (``detect_rpeaks``, the multi-lead consensus) of each record;
- ``--mitdb``: a long annotated two-lead record (MIT-BIH record 100: ``../shared/data/mitdb-100/100``,
  30 min; ``tests/data/mitdb-100/100``, its first 3 min), cut into 10 s windows at 500 Hz
  (``data.annotated.annotated_windows``): MLII in the lead-II slot, V5 in V5, the ten other leads
  zero (missing); reference: the cardiologists' beat annotations.

Tables: (1) with ``--mitdb``, the R-peak labels against the annotations (every beat, none left out
at the window edges), for the consensus and for neurokit2 on lead II alone; (2) per checkpoint, the
rows of ``ecgflowcmr/ecg/metrics.py`` (learned phase wraps: sensitivity / PPV / F1 within 50 ms;
chosen cycle start: median and 90th percentile of its distance to the nearest reference R-peak);
(3) the checkpoints side by side. Last, the first checkpoint's encoder forward (ECG -> 50 tokens)
is timed on CPU for a batch of ``--time-batch`` ECGs (median of 3 runs after a warm-up).
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

from ecgflowcmr.data.annotated import annotated_windows  # noqa: E402
from ecgflowcmr.data.phase import detect_rpeaks  # noqa: E402
from ecgflowcmr.ecg.dataset import ECGPhaseDataset  # noqa: E402
from ecgflowcmr.ecg.encoder import load_ecg_encoder, load_pamae  # noqa: E402
from ecgflowcmr.ecg.metrics import FS, evaluate, markdown_table, match_peaks  # noqa: E402


def read_wfdb_folder(folder: Path) -> tuple[list[str], np.ndarray]:
    """All WFDB records (``*.hea``) of a folder -> names, (N, 12, 5000) mV."""
    headers = sorted(folder.glob("*.hea"))
    if not headers:
        raise FileNotFoundError(f"no WFDB header (*.hea) in '{folder}'")
    try:
        from ecgflowcmr.data.ecg_io import read_ecg
    except ImportError:                                   # reader not there: wfdb directly
        read_ecg = None
    ecgs = []
    for header in headers:
        if read_ecg is not None:
            ecgs.append(read_ecg(header))
        else:
            import wfdb

            ecgs.append(wfdb.rdrecord(str(header.with_suffix(""))).p_signal.T[:, :5000].astype(np.float32))
    return [h.stem for h in headers], np.stack(ecgs)


def plot_records(model, names, ecgs, peaks, mode, out_dir: Path, device) -> None:
    """Phase plot (lead II, reference R-peaks, predicted vs reference phase, chosen cycle) per record."""
    from ecgflowcmr.data.phase import phase_from_rpeaks
    from ecgflowcmr.ecg.cycles import select_cycles
    from ecgflowcmr.ecg.figures import plot_phase
    from ecgflowcmr.ecg.pamae import sincos_to_phase

    with torch.no_grad():
        feats = model.encoder.features(torch.from_numpy(ecgs).float().to(device))
        phase = sincos_to_phase(model.encoder.phase_sincos(feats), ecgs.shape[-1])
    sel = select_cycles(phase, mode)
    wraps = sel.wraps.as_lists() if sel.wraps is not None else [[] for _ in names]
    for b, name in enumerate(names):
        plot_phase(out_dir / f"phase_{name}.png", ecgs[b, 1], phase_from_rpeaks(peaks[b], ecgs.shape[-1]),
                   phase[b].cpu().numpy(), int(sel.start[b]), int(sel.end[b]), peaks[b], wraps[b],
                   bool(sel.fallback[b]), title=f"{name}: predicted vs reference (detect_rpeaks) phase")


def time_encoder(checkpoint: Path, ecgs: np.ndarray, batch: int, cycle_mode: str | None) -> float:
    """Median seconds of one CPU forward pass of the encoder on ``batch`` ECGs."""
    enc = load_ecg_encoder(checkpoint, "cpu", cycle_mode)
    reps = int(np.ceil(batch / len(ecgs)))
    x = torch.from_numpy(np.concatenate([ecgs] * reps)[:batch]).float()
    times = []
    with torch.no_grad():
        enc(x)
        for _ in range(3):
            t0 = time.perf_counter()
            enc(x)
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def neurokit_lead_ii(ecg: np.ndarray) -> np.ndarray:
    """The single-detector labels for comparison: neurokit2's default detector on lead II alone."""
    import warnings

    import neurokit2 as nk

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cleaned = nk.ecg_clean(ecg[1], sampling_rate=FS, method="neurokit")
        _, info = nk.ecg_peaks(cleaned, sampling_rate=FS, method="neurokit")
    return np.asarray(info["ECG_R_Peaks"], dtype=np.int64)


def label_scores(ecgs: np.ndarray, reference: list[np.ndarray], detector) -> dict:
    """R-peaks of ``detector`` against reference peaks: every beat counted (no edge left out)."""
    tp = n_ref = n_pred = 0
    offsets = []
    for ecg, ref in zip(ecgs, reference):
        found = detector(ecg)
        a, b, c = match_peaks(found, ref, ecg.shape[-1], edge_s=0.0)
        tp, n_ref, n_pred = tp + a, n_ref + b, n_pred + c
        if len(found):
            near = np.abs(found[None, :] - np.asarray(ref)[:, None]).min(axis=1)
            offsets.extend(near[near <= 0.05 * FS] * 1000 / FS)
    sens, ppv = tp / n_ref, tp / max(n_pred, 1)
    return {"records": len(ecgs), "beats": n_ref, "sensitivity": sens, "ppv": ppv,
            "f1": 2 * sens * ppv / (sens + ppv) if sens + ppv else float("nan"),
            "offset_median_ms": float(np.median(offsets)), "offset_p90_ms": float(np.percentile(offsets, 90))}


def comparison_table(results: dict[str, dict[str, dict]]) -> str:
    """{checkpoint: {data set: metrics}} -> one row per checkpoint: wrap F1, cycle-start median / p90."""
    columns = list(next(iter(results.values())))
    head = "| checkpoint | " + " | ".join(f"{c}: wrap F1 / start p50 / p90 (ms)" for c in columns) + " |"
    lines = [head, "|---|" + "---|" * len(columns)]
    for name, sets in results.items():
        cells = [f"{m['f1']:.3f} / {m['start_offset_ms']:.0f} / {m['start_offset_p90_ms']:.0f}"
                 for m in sets.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--checkpoint", required=True, action="append",
                        help="[NAME=]runs/<exp>/ecg/best.pt; repeat to compare checkpoints")
    parser.add_argument("--data", type=Path, help="prepared dataset folder (runs/<exp>/data)")
    parser.add_argument("--split", default="test", help="train | val | test | all")
    parser.add_argument("--wfdb", type=Path, help="folder of real 12-lead WFDB records (e.g. examples/ecg)")
    parser.add_argument("--mitdb", type=Path, help="annotated WFDB record (e.g. ../shared/data/mitdb-100/100)")
    parser.add_argument("--cycle-mode", choices=["median", "ensemble", "window"],
                        help="default: each checkpoint's ecg.cycle_mode")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--time-batch", type=int, default=64, help="batch size of the CPU timing")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, help="also write the metrics here")
    parser.add_argument("--figures", type=Path,
                        help="write predicted-vs-reference phase plots of the WFDB records here (first checkpoint)")
    args = parser.parse_args(argv)
    if args.data is None and args.wfdb is None and args.mitdb is None:
        parser.error("give --data (a prepared dataset), --wfdb (a folder of WFDB records) and/or --mitdb")

    device = torch.device(args.device)
    checkpoints = {}
    for item in args.checkpoint:
        name, _, path = item.rpartition("=")
        checkpoints[name or Path(path).parent.parent.name] = Path(path)
    sets, timing_ecgs = {}, []      # data set name -> (ecgs (N, 12, L), reference peaks, names)
    if args.data is not None:
        dataset = ECGPhaseDataset(args.data, args.split)
        ecgs = np.stack([dataset[i]["ecg"].numpy() for i in range(len(dataset))])
        sets[f"phantom {args.split} (n={len(dataset)})"] = (
            ecgs, [dataset.rpeaks(i) for i in range(len(dataset))], None)
        timing_ecgs.append(ecgs[:64])
    if args.wfdb is not None:
        names, ecgs = read_wfdb_folder(args.wfdb)
        sets[f"PTB-XL {args.wfdb.name} (n={len(names)})"] = (ecgs, [detect_rpeaks(e, FS) for e in ecgs], names)
        timing_ecgs.append(ecgs)
    labels = {}
    if args.mitdb is not None:
        ecgs, reference = annotated_windows(args.mitdb)
        sets[f"MIT-BIH {args.mitdb.name} 10 s (n={len(ecgs)})"] = (ecgs, reference, None)
        labels = {"consensus (detect_rpeaks)": label_scores(ecgs, reference, lambda e: detect_rpeaks(e, FS)),
                  "neurokit2, lead II alone": label_scores(ecgs, reference, neurokit_lead_ii)}

    results, modes = {}, {}
    for name, path in checkpoints.items():
        model, ecg_cfg = load_pamae(path, device)
        modes[name] = args.cycle_mode or ecg_cfg.cycle_mode
        results[name] = {}
        for set_name, (ecgs, reference, _) in sets.items():
            batches = [(torch.from_numpy(ecgs[i:i + args.batch_size]), reference[i:i + args.batch_size], None)
                       for i in range(0, len(ecgs), args.batch_size)]
            results[name][set_name] = evaluate(model, batches, device, modes[name])
        if args.figures is not None and args.wfdb is not None and len(results) == 1:
            ecgs, reference, names = next(v for k, v in sets.items() if k.startswith("PTB-XL"))
            plot_records(model, names, ecgs, reference, modes[name], args.figures, device)

    first = next(iter(checkpoints))
    seconds = time_encoder(checkpoints[first], np.concatenate(timing_ecgs or [sets[next(iter(sets))][0][:64]]),
                           args.time_batch, modes[first])
    if labels:
        print("## R-peak labels against the MIT-BIH annotations (within 50 ms, every beat)\n")
        print(markdown_table(labels, ["records", "beats", "sensitivity", "ppv", "f1", "offset_median_ms",
                                      "offset_p90_ms"]))
        print()
    for name, columns in results.items():
        print(f"## Stage-1 metrics: {name} ({checkpoints[name]}, cycle mode: {modes[name]})\n")
        print(markdown_table(columns))
        print()
    if len(results) > 1:
        print("## Side by side\n")
        print(comparison_table(results))
        print()
    print(f"encoder forward ({first}), batch of {args.time_batch} ECGs on CPU ({torch.get_num_threads()} "
          f"threads): {seconds * 1000:.0f} ms ({seconds * 1000 / args.time_batch:.1f} ms per ECG)")
    result = {"checkpoints": {k: str(v) for k, v in checkpoints.items()}, "cycle_modes": modes,
              "labels": labels, "metrics": results, "cpu_forward_seconds": seconds,
              "time_batch": args.time_batch, "threads": torch.get_num_threads()}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
