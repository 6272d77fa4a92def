"""Writing a phantom dataset to disk: subjects, manifest, ECG-only pool, and the command line.

``python -m ecgflowcmr.phantom --out DIR --n N --seed S [--workers W] [--version 2] [--format ukb-bulk]``
writes the files ``v1.py`` describes (version 1) or the UK Biobank-like version 2 (``v2.py``, 208 x 180
cines and a ``phantom_version`` manifest column); ``--format ukb-bulk`` also writes them as UK
Biobank bulk files (``ukb_bulk.py``: DICOM zips of field 20208, XMLs of field 20205). A subject
depends on (seed, index) only, whatever the number of workers, and generation resumes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from . import v2
from .v1 import (
    GENERATOR_VERSION,
    VERSIONS,
    atomic_write_bytes,
    frontal_axes,
    ground_truth,
    simulate,
    subject_id,
    write_ecg_xml,
    write_nifti,
)


def _paths(out: Path, sid: str) -> dict:
    return {"ecg": out / "ecg" / f"{sid}.xml", "cmr": out / "cmr" / f"{sid}.nii.gz",
            "mask": out / "masks" / f"{sid}.nii.gz", "truth": out / "truth" / f"{sid}.json"}


def _prevalence(version: int, prevalence) -> list[float] | None:
    """The class shares a version draws from (None: version 1's fixed 2:1:1 blocks)."""
    if version == 1:
        return None
    return [float(x) for x in (v2.DEFAULT_PREVALENCE if prevalence is None else prevalence)]


def _is_done(out: Path, seed: int, index: int, version: int = GENERATOR_VERSION, prevalence=None) -> bool:
    paths = _paths(out, subject_id(index))
    if not all(path.is_file() for path in paths.values()):
        return False
    try:
        params = json.loads(paths["truth"].read_text())["params"]
    except (OSError, ValueError, KeyError):
        return False
    return (params.get("seed") == seed and params.get("generator_version") == version
            and params.get("prevalence") == _prevalence(version, prevalence))


def generate_subject(out_dir: str | Path, seed: int, index: int, version: int = GENERATOR_VERSION,
                     prevalence=None) -> dict:
    """Simulate one subject with phantom ``version`` (1 or 2; ``prevalence``: version 2's class
    shares) and write its four files (the truth json last). Returns the truth."""
    out = Path(out_dir)
    if version == 1:
        sim = simulate(seed, index)
        truth = ground_truth(sim)
    else:
        sim = v2.simulate(seed, index, _prevalence(version, prevalence))
        truth = v2.ground_truth(sim)
    truth["axes_deg"] = frontal_axes(sim["clean"], sim["delineation"])
    paths = _paths(out, truth["manifest"]["subject_id"])
    write_ecg_xml(paths["ecg"], sim["ecg"], truth["manifest"], sim["delineation"], truth["axes_deg"])
    frame_ms = truth["manifest"]["frame_ms"]
    write_nifti(paths["cmr"], sim["cine"], sim["params"], frame_ms)
    write_nifti(paths["mask"], sim["masks"], sim["params"], frame_ms)
    atomic_write_bytes(paths["truth"], json.dumps(truth, indent=1).encode())
    return truth


def _worker_init() -> None:
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except ImportError:  # pragma: no cover
        pass


def _work(args) -> int:
    out, seed, index, version, prevalence = args
    generate_subject(out, seed, index, version, prevalence)
    return index


MANIFEST_PATH_COLUMNS = ("subject_id", "ecg_path", "cmr_path", "mask_path")
# ECG-only subjects take indices from here on: a subject depends on (seed, index) only, so the paired
# subjects 0..n-1 are the same with or without a pool, and no pool size ever collides with them.
POOL_START = 100_000
POOL_DIR = "ecg_only"


def write_manifest(out_dir: str | Path, n: int, indices=None, ecg_only: bool = False) -> Path:
    """manifest.csv from truth/<id>.json of subjects 0..n-1 (or ``indices``), paths relative to
    ``out_dir``. ``ecg_only``: the cine and mask columns are named ``oracle_cmr_path`` /
    ``oracle_mask_path``, so that no reader of paired manifests takes these subjects as pairs."""
    import csv

    out = Path(out_dir)
    cine_key, mask_key = ("oracle_cmr_path", "oracle_mask_path") if ecg_only else ("cmr_path", "mask_path")
    rows = []
    for index in (range(n) if indices is None else indices):
        sid = subject_id(index)
        truth = json.loads((out / "truth" / f"{sid}.json").read_text())["manifest"]
        row = {"subject_id": sid, "ecg_path": f"ecg/{sid}.xml", cine_key: f"cmr/{sid}.nii.gz",
               mask_key: f"masks/{sid}.nii.gz"}
        for key, value in truth.items():
            if key == "subject_id":
                continue
            row[key] = round(value, 4) if isinstance(value, float) else value
        rows.append(row)
    path = out / "manifest.csv"
    tmp = out / "manifest.csv.tmp"
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0].keys()))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
    return path


def _generate_indices(out: Path, seed: int, indices: list[int], workers: int, progress: bool,
                      version: int = GENERATOR_VERSION, prevalence=None) -> None:
    """Write the subjects ``indices`` not yet done under ``out`` (resumable, any number of workers)."""
    if version not in VERSIONS:
        raise ValueError(f"phantom: version must be one of {VERSIONS}, got {version}")
    for sub in ("ecg", "cmr", "masks", "truth"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    todo = [i for i in indices if not _is_done(out, seed, i, version, prevalence)]
    if not todo:
        return
    from tqdm import tqdm

    bar = tqdm(total=len(todo), desc=f"phantom -> {out}", unit="subject", disable=not progress)
    jobs = [(str(out), seed, i, version, prevalence) for i in todo]
    workers = max(1, min(int(workers), len(todo)))
    if workers == 1:
        for job in jobs:
            _work(job)
            bar.update(1)
    else:
        import multiprocessing as mp

        import nibabel  # noqa: F401  (imported once here, shared by forked workers)
        import scipy.ndimage  # noqa: F401
        import scipy.signal  # noqa: F401
        import scipy.special  # noqa: F401

        ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        with ctx.Pool(workers, initializer=_worker_init) as pool:
            for _ in pool.imap_unordered(_work, jobs, chunksize=2):
                bar.update(1)
    bar.close()


def generate(out_dir: str | Path, n: int, seed: int = 0, workers: int = 1, progress: bool = True,
             version: int = GENERATOR_VERSION, prevalence=None) -> Path:
    """Write ``n`` phantom subjects under ``out_dir`` and return the manifest path.

    Deterministic per (seed, subject index) whatever ``workers`` is. Resumable: subjects whose
    files (and truth json for this seed, version and prevalence) exist are kept; the manifest is
    rebuilt at the end. ``version`` 2 (``v2.py``) draws classes with ``prevalence``
    (normal, dilated, hypertrophic; default 0.8, 0.1, 0.1) and writes a ``phantom_version`` column.
    """
    if n < 1:
        raise ValueError(f"phantom: n must be >= 1, got {n}")
    out = Path(out_dir)
    _generate_indices(out, seed, list(range(n)), workers, progress, version, prevalence)
    return write_manifest(out, n)


def generate_ecg_only(out_dir: str | Path, n: int, seed: int = 0, workers: int = 1, progress: bool = True,
                      version: int = GENERATOR_VERSION, prevalence=None) -> Path:
    """Write ``n`` ECG-only subjects (indices ``POOL_START``..) under ``out_dir/ecg_only`` and return
    their manifest: ``subject_id, ecg_path, oracle_cmr_path, oracle_mask_path`` + ground truth.

    Their cines are the oracle of synthetic pretraining (what a perfect generator would give), kept
    apart from the paired subjects: ``prepare_data.py`` never sees them.
    """
    if n < 1:
        raise ValueError(f"phantom: the ECG-only pool needs n >= 1, got {n}")
    out = Path(out_dir) / POOL_DIR
    indices = list(range(POOL_START, POOL_START + n))
    _generate_indices(out, seed, indices, workers, progress, version, prevalence)
    return write_manifest(out, n, indices=indices, ecg_only=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ecgflowcmr.phantom",
                                     description="Write the paired ECG-cine phantom (UK Biobank-style XML + NIfTI "
                                                 "+ masks + manifest with ground truth).")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--n", type=int, required=True, help="number of subjects")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1, help="worker processes")
    parser.add_argument("--ecg-only", type=int, default=0, metavar="M",
                        help=f"also write M ECG-only subjects under OUT/{POOL_DIR}/ (their cines for the oracle "
                             "only); the paired subjects do not change")
    parser.add_argument("--version", type=int, default=GENERATOR_VERSION, choices=VERSIONS,
                        help="phantom version: 1 (default) or 2 (UK Biobank-like, see docs/phantom_realism.md)")
    parser.add_argument("--prevalence", default=None, metavar="N,D,H",
                        help="version 2: shares of normal, dilated, hypertrophic subjects (default 0.8,0.1,0.1)")
    parser.add_argument("--format", default="nifti", choices=("nifti", "ukb-bulk"),
                        help="nifti (default): XML + NIfTI + masks + manifest; ukb-bulk: also OUT/ukb_bulk/ with "
                             "UK Biobank bulk files ({eid}_20208_2_0.zip DICOM cines, {eid}_20205_2_0.xml ECGs) for "
                             "data.ukb_bulk, and OUT/ukb_bulk_eids.csv (eid -> subject)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    prevalence = None
    if args.prevalence:
        prevalence = [float(x) for x in args.prevalence.split(",")]
        if len(prevalence) != 3 or min(prevalence) < 0 or abs(sum(prevalence) - 1) > 1e-6:
            parser.error("--prevalence needs three non-negative shares summing to 1, e.g. 0.8,0.1,0.1")
    start = time.perf_counter()
    manifest = generate(args.out, args.n, seed=args.seed, workers=args.workers, progress=not args.quiet,
                        version=args.version, prevalence=prevalence)
    print(f"wrote {manifest} ({args.n} subjects) in {time.perf_counter() - start:.1f} s")
    if args.format == "ukb-bulk":
        from .ukb_bulk import write_bulk

        start = time.perf_counter()
        folder = write_bulk(args.out, args.n, seed=args.seed, workers=args.workers, progress=not args.quiet)
        print(f"wrote {folder} ({args.n} participants' 20208 zips and 20205 XMLs) in "
              f"{time.perf_counter() - start:.1f} s")
    if args.ecg_only > 0:
        pool = generate_ecg_only(args.out, args.ecg_only, seed=args.seed, workers=args.workers,
                                 progress=not args.quiet, version=args.version, prevalence=prevalence)
        print(f"wrote {pool} ({args.ecg_only} ECG-only subjects)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
