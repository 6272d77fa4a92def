"""Speed and memory of preparing from UK Biobank bulk files (data.ukb_bulk), on phantom zips.

    python benchmarks/ukb_bulk_speed.py --phantom runs/crop_centre/phantom --sizes 50,100,200 --workers 2
        [--crop-mm 160] [--json runs/ukb_bulk_speed.json]

Generates (or reuses) version-2 phantom subjects and their full bulk zips (three long-axis views, 150
DICOMs each, as the real 20208 zips) plus XMLs, then for each size N prepares the first N participants
from scratch in a child process (``data.ukb_bulk``: header scan, then ``prepare()``), and reports

- wall time, CPU time (the child and its worker processes), participants per second, CPU ms per
  participant, and the machine's load average before and after (the CPU may be shared: the CPU time
  per participant is the figure that does not depend on the load);
- peak resident memory of the whole process tree (main + workers, sampled every 0.2 s), to show
  whether it grows with N;
- where the CPU goes, per participant, measured in this process on up to 20 participants: the header
  scan, reading the DICOM pixels, the rest of ``read_cine`` (box, crop, resize), the XML ECG and the
  R-peak detection (stage 1's labels), and the NIfTI route's ``read_cine`` for comparison;
- 40,000 participants extrapolated: at the measured rate, and CPU-bound on two free cores.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _child(args) -> int:
    """One preparation from scratch (in a child process): phase times as JSON on stdout."""
    import logging

    from ecgflowcmr.config import config_from_dict
    from ecgflowcmr.data.prepare import prepare
    from ecgflowcmr.data.ukb_bulk import build_manifest, write_qc_report

    logging.basicConfig(level=logging.WARNING)
    cfg = config_from_dict({"name": "speed", "run_dir": args.run,
                            "data": {"ukb_bulk": args.bulk, "workers": args.workers, "crop_mm": args.crop_mm}})
    t0 = time.perf_counter()
    manifest, facts = build_manifest(cfg, progress=False)
    t1 = time.perf_counter()
    root = prepare(cfg, manifest, progress=False, source_meta=facts)
    t2 = time.perf_counter()
    write_qc_report(cfg, root)
    meta = json.loads((root / "meta.json").read_text())
    print(json.dumps({"scan_s": t1 - t0, "prepare_s": t2 - t1, "kept": meta["n"], "rejected": meta["rejected"]}))
    return 0


def _tree_rss_kib(pid: int) -> int:
    """Resident memory (KiB) of ``pid`` and all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        stack.extend(children.get(p, []))
        try:
            with open(f"/proc/{p}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def _run_size(args, phantom: Path, size: int) -> dict:
    from ecgflowcmr.phantom.ukb_bulk import bulk_paths

    work = Path(args.work)
    bulk, run = work / f"bulk_{size}", work / f"run_{size}"
    shutil.rmtree(bulk, ignore_errors=True)
    shutil.rmtree(run, ignore_errors=True)
    bulk.mkdir(parents=True)
    for index in range(size):
        for path in bulk_paths(phantom, index):
            (bulk / path.name).symlink_to(path.resolve())
    command = [sys.executable, __file__, "--child", "--bulk", str(bulk), "--run", str(run),
               "--workers", str(args.workers), "--crop-mm", str(args.crop_mm)]
    load_before = os.getloadavg()
    usage_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    peak = [0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], _tree_rss_kib(proc.pid))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    sampler.join()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"size {size}: the preparation failed:\n{err[-3000:]}")
    phases = json.loads(out.strip().splitlines()[-1])
    cpu = (usage.ru_utime - usage_before.ru_utime) + (usage.ru_stime - usage_before.ru_stime)
    return {"participants": size, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
            "participants_per_s": round(size / wall, 2), "cpu_ms_per_participant": round(1000 * cpu / size, 1),
            "scan_s": round(phases["scan_s"], 1), "prepare_s": round(phases["prepare_s"], 1),
            "kept": phases["kept"], "rejected": phases["rejected"], "peak_rss_mib": round(peak[0] / 1024, 1),
            "load_before": round(load_before[0], 2), "load_after": round(os.getloadavg()[0], 2)}


def _breakdown(phantom: Path, work: Path, crop_mm: float, n: int = 20) -> dict:
    """CPU ms per participant of each step, in this process (one thread)."""
    import pandas as pd

    from ecgflowcmr.config import config_from_dict
    from ecgflowcmr.data import ukb_bulk as ub
    from ecgflowcmr.data.cmr_io import read_cine
    from ecgflowcmr.data.ecg_io import read_ecg
    from ecgflowcmr.data.phase import detect_rpeaks
    from ecgflowcmr.phantom.ukb_bulk import EID_START

    cfg = config_from_dict({"name": "speed", "run_dir": str(work / "breakdown"),
                            "data": {"ukb_bulk": str(work / f"bulk_{n}"), "workers": 0, "crop_mm": crop_mm}})
    shutil.rmtree(work / "breakdown", ignore_errors=True)
    manifest, _ = ub.build_manifest(cfg, progress=False)
    rows = pd.read_csv(manifest, dtype={"subject_id": str})
    zips = [json.loads(Path(p).read_text())["zip"] for p in rows["cmr_path"]]
    niftis = [str(phantom / "cmr" / f"PH{int(e) - EID_START:05d}.nii.gz") for e in rows["subject_id"]]
    ecgs = [read_ecg(p) for p in rows["ecg_path"]]

    def cpu_ms(fn, items):
        fn(items[0])
        start = time.process_time()
        for item in items:
            fn(item)
        return round(1000 * (time.process_time() - start) / len(items), 1)

    scan = cpu_ms(ub.scan_zip, zips)
    pixels = cpu_ms(ub.load_cine, list(rows["cmr_path"]))
    cine = cpu_ms(lambda p: read_cine(p, crop_mm=crop_mm), list(rows["cmr_path"]))
    return {"participants": len(rows), "header_scan": scan, "dicom_pixels": pixels,
            "read_cine_rest (box, crop, resize)": round(cine - pixels, 1),
            "xml_ecg": cpu_ms(read_ecg, list(rows["ecg_path"])),
            "rpeaks": cpu_ms(lambda e: detect_rpeaks(e, fs=500), ecgs),
            "nifti_route_read_cine (for comparison)": cpu_ms(lambda p: read_cine(p, crop_mm=crop_mm), niftis)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phantom", default="runs/crop_centre/phantom")
    parser.add_argument("--sizes", default="50,100,200")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--crop-mm", type=float, default=160.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=None, help="scratch folder (default: <phantom>/../ukb_bulk_speed)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bulk", help=argparse.SUPPRESS)
    parser.add_argument("--run", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return _child(args)

    from ecgflowcmr.phantom import build
    from ecgflowcmr.phantom.ukb_bulk import write_bulk

    phantom = Path(args.phantom)
    args.work = args.work or str(phantom.parent / "ukb_bulk_speed")
    sizes = [int(s) for s in args.sizes.split(",")]
    build.generate(phantom, max(sizes), seed=args.seed, workers=args.workers, version=2)
    write_bulk(phantom, max(sizes), seed=args.seed, workers=args.workers)
    runs = [_run_size(args, phantom, size) for size in sizes]
    for r in runs:
        print(json.dumps(r))
    breakdown = _breakdown(phantom, Path(args.work), args.crop_mm, n=min(sizes))
    largest = runs[-1]
    summary = {"runs": runs, "cpu_ms_per_participant_breakdown": breakdown, "workers": args.workers,
               "cpus": os.cpu_count(),
               "40k_hours_at_measured_rate": round(40000 / largest["participants_per_s"] / 3600, 2),
               "40k_hours_cpu_bound_on_2_free_cores": round(
                   40000 * largest["cpu_ms_per_participant"] / 1000 / 2 / 3600, 2),
               "command": "python benchmarks/ukb_bulk_speed.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    out = Path(args.json) if args.json else Path(args.work) / "ukb_bulk_speed.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
