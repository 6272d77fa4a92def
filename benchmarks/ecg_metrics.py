#!/usr/bin/env python
"""Stage-1 metrics for any PA-MAE checkpoint, printed as a markdown table.

    python benchmarks/ecg_metrics.py --checkpoint runs/demo/ecg/best.pt --data runs/demo/data \\
        --split test [--wfdb examples/ecg] [--cycle-mode median] [--json out.json]

Columns: the prepared split (reference R-peaks: the dataset's ``rpeaks.npy``) and, with ``--wfdb``,
the real records of a folder of WFDB headers (reference: ``detect_rpeaks`` on the record). Rows
are defined in ``ecgflowcmr/ecg/metrics.py``. Last, the encoder forward (ECG -> 50 tokens) is timed
on CPU for a batch of ``--time-batch`` ECGs (median of 3 runs after a warm-up).
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

from ecgflowcmr.ecg.dataset import ECGPhaseDataset  # noqa: E402
from ecgflowcmr.ecg.encoder import load_ecg_encoder, load_pamae  # noqa: E402
from ecgflowcmr.ecg.metrics import evaluate, markdown_table  # noqa: E402
from ecgflowcmr.ecg.phase import detect_rpeaks  # noqa: E402


def prepared_batches(dataset: ECGPhaseDataset, batch_size: int):
    for lo in range(0, len(dataset), batch_size):
        idx = range(lo, min(lo + batch_size, len(dataset)))
        yield (torch.stack([dataset[i]["ecg"] for i in idx]), [dataset.rpeaks(i) for i in idx], None)


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
    from ecgflowcmr.ecg.cycles import select_cycles
    from ecgflowcmr.ecg.figures import plot_phase
    from ecgflowcmr.ecg.pamae import sincos_to_phase
    from ecgflowcmr.ecg.phase import phase_from_rpeaks

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


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, type=Path, help="runs/<exp>/ecg/best.pt")
    parser.add_argument("--data", type=Path, help="prepared dataset folder (runs/<exp>/data)")
    parser.add_argument("--split", default="test", help="train | val | test | all")
    parser.add_argument("--wfdb", type=Path, help="folder of real WFDB records (e.g. examples/ecg)")
    parser.add_argument("--cycle-mode", choices=["median", "ensemble", "window"],
                        help="default: the checkpoint's ecg.cycle_mode")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--time-batch", type=int, default=64, help="batch size of the CPU timing")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, help="also write the metrics here")
    parser.add_argument("--figures", type=Path,
                        help="write predicted-vs-reference phase plots of the real records here")
    args = parser.parse_args(argv)
    if args.data is None and args.wfdb is None:
        parser.error("give --data (a prepared dataset) and/or --wfdb (a folder of WFDB records)")

    device = torch.device(args.device)
    model, ecg_cfg = load_pamae(args.checkpoint, device)
    mode = args.cycle_mode or ecg_cfg.cycle_mode
    columns, timing_ecgs = {}, []
    if args.data is not None:
        dataset = ECGPhaseDataset(args.data, args.split)
        columns[f"phantom {args.split} (n={len(dataset)})"] = evaluate(
            model, prepared_batches(dataset, args.batch_size), device, mode)
        timing_ecgs.append(np.stack([dataset[i]["ecg"].numpy() for i in range(min(len(dataset), 64))]))
    if args.wfdb is not None:
        names, ecgs = read_wfdb_folder(args.wfdb)
        peaks = [detect_rpeaks(e, 500) for e in ecgs]
        batches = [(torch.from_numpy(ecgs[i:i + args.batch_size]), peaks[i:i + args.batch_size], None)
                   for i in range(0, len(ecgs), args.batch_size)]
        columns[f"PTB-XL {args.wfdb.name} (n={len(names)})"] = evaluate(model, batches, device, mode)
        timing_ecgs.append(ecgs)
        if args.figures is not None:
            plot_records(model, names, ecgs, peaks, mode, args.figures, device)
    seconds = time_encoder(args.checkpoint, np.concatenate(timing_ecgs), args.time_batch, mode)

    print(f"## Stage-1 metrics: {args.checkpoint} (cycle mode: {mode})\n")
    print(markdown_table(columns))
    print(f"\nencoder forward, batch of {args.time_batch} ECGs on CPU ({torch.get_num_threads()} threads): "
          f"{seconds * 1000:.0f} ms ({seconds * 1000 / args.time_batch:.1f} ms per ECG)")
    result = {"checkpoint": str(args.checkpoint), "cycle_mode": mode, "metrics": columns,
              "cpu_forward_seconds": seconds, "time_batch": args.time_batch,
              "threads": torch.get_num_threads()}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
