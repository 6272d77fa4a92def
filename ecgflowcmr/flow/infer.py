"""Stage 4: ECG-only generation at scale (``infer_flow.py`` is a thin wrapper around ``run``).

Inputs (``--ecg``), none of which involves a CMR:

* ``split:test`` (or train / val / all): the ECGs of a prepared dataset split (``cfg.data_root``);
* a file: UK Biobank XML, WFDB record (``.hea``/``.mat``/``.dat``), ``.npy`` or ``.csv`` array;
* a folder: every ``.xml``, ``.hea``, ``.npy`` and ``.csv`` file in it (not recursive);
* a manifest CSV with an ``ecg_path`` column (and ``subject_id``; relative paths are taken
  relative to the manifest's folder, then to the working directory).

Outputs under ``--out`` (default ``runs/<exp>/samples``), sample ``k`` of subject ``s`` named
``s`` for ``k = 0`` and ``s_k`` for ``k >= 1``::

    <name>.nii.gz      (96, 96, 1, 50) float32 in [-1, 1], UK Biobank layout, 1.8 mm pixels,
                       6 mm slice, frame interval = RR / 50 ms (see generator.write_nifti)
    <name>.npy         float32 (1, 50, 96, 96)
    previews/<s>.gif   cine beside lead II with a moving cursor over the chosen cycle (k = 0)
    index.csv          one row per (subject, sample): status ok / skipped / failed, reason,
                       source, files, seeds, sampler, steps, guidance, alpha, checkpoint + hash,
                       chosen cycle and fallback flag

Re-running skips every (subject, sample) that ``index.csv`` lists as ok with the same checkpoint,
seed, sampler, steps and guidance and whose ``.npy`` exists; anything else is (re)generated.
``--shard i/n`` (0 <= i < n) takes every n-th subject of the sorted list, so n processes (or GPUs)
together produce exactly the subjects of one unsharded run; they may share the output folder
(``index.csv`` is appended under a file lock). Unreadable or invalid ECGs are recorded as skipped
with the reader's reason; the run goes on.
"""
from __future__ import annotations

import csv
import fcntl
import functools
import json
import math
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..config import Config, save_config
from ..utils.checkpoint import file_hash
from ..utils.device import select_device
from ..utils.run import require_file
from .generator import ECGToCine, sample_seed, save_npy, write_nifti

ECG_SUFFIXES = (".xml", ".hea", ".npy", ".csv")
INDEX_FIELDS = ["subject", "sample", "status", "reason", "source", "nifti", "npy", "preview", "seed",
                "sample_seed", "sampler", "steps", "guidance", "alpha", "use_template", "checkpoint",
                "checkpoint_hash", "weights", "cycle_start", "cycle_end", "rr_ms", "fallback", "seconds"]
SETTINGS = ("checkpoint_hash", "seed", "sampler", "steps", "guidance")


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------


@dataclass
class ECGItem:
    """One ECG to generate from. ``path`` (a file) or ``prepared_index`` (a prepared array row)."""

    subject: str
    source: str
    path: Path | None = None
    prepared_index: int | None = None


def _safe_name(name: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name).strip()) or "ecg"
    return name.lstrip(".") or "ecg"


def _ecg_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in ECG_SUFFIXES
                  and not _is_manifest(p))


def _is_manifest(path: Path) -> bool:
    if path.suffix.lower() != ".csv":
        return False
    try:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError):
        return False
    return "ecg_path" in [h.strip() for h in header]


def _resolve(path_str: str, base: Path) -> Path:
    p = Path(path_str)
    if p.is_absolute():
        return p
    return base / p if (base / p).exists() or not p.exists() else p


def collect_inputs(spec: str, cfg: Config) -> list[ECGItem]:
    """ECGs named by ``spec`` (see module docstring); subject names unique and filesystem-safe."""
    items: list[ECGItem] = []
    if spec.startswith("split:"):
        from ..data.datasets import Prepared

        split = spec.split(":", 1)[1]
        prepared = Prepared(cfg.data_root)
        indices = prepared.split_indices(split)
        ids = prepared.subject_ids(indices)
        items = [ECGItem(_safe_name(s), f"{cfg.data_root}#{i}", prepared_index=int(i)) for s, i in zip(ids, indices)]
    else:
        path = Path(spec)
        if not path.exists():
            raise FileNotFoundError(f"--ecg '{spec}' does not exist (give a file, a folder, a manifest CSV "
                                    "or split:test)")
        if path.is_dir():
            items = [ECGItem(_safe_name(p.stem), str(p), path=p) for p in _ecg_files(path)]
        elif _is_manifest(path):
            import pandas as pd

            table = pd.read_csv(path, dtype=str)
            for _, row in table.iterrows():
                ecg_path = _resolve(str(row["ecg_path"]), path.parent)
                subject = row.get("subject_id") if isinstance(row.get("subject_id"), str) else ecg_path.stem
                items.append(ECGItem(_safe_name(subject), str(ecg_path), path=ecg_path))
        else:
            items = [ECGItem(_safe_name(path.stem), str(path), path=path)]
    seen: dict[str, int] = {}
    for item in items:                                   # unique names (a.xml + a.npy -> a, a__2)
        count = seen.get(item.subject, 0) + 1
        seen[item.subject] = count
        if count > 1:
            item.subject = f"{item.subject}__{count}"
    return items


def parse_shard(text: str | None) -> tuple[int, int]:
    if not text:
        return 0, 1
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or int(m.group(2)) < 1 or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise ValueError(f"--shard '{text}' must be i/n with 0 <= i < n (e.g. 0/4)")
    return int(m.group(1)), int(m.group(2))


def shard_items(items: list[ECGItem], index: int, count: int) -> list[ECGItem]:
    """Every ``count``-th subject of the name-sorted list, starting at ``index``."""
    return sorted(items, key=lambda it: it.subject)[index::count]


def sample_name(subject: str, k: int) -> str:
    return subject if k == 0 else f"{subject}_{k}"


# ----------------------------------------------------------------------------------------------
# index.csv (append under a lock; readers keep the last row per (subject, sample))
# ----------------------------------------------------------------------------------------------


@contextmanager
def _locked(out_dir: Path):
    with open(out_dir / ".index.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def read_index(path: str | Path) -> dict[tuple[str, int], dict]:
    """``{(subject, sample): row}``, the last row of each pair."""
    path = Path(path)
    rows: dict[tuple[str, int], dict] = {}
    if not path.is_file():
        return rows
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            try:
                rows[(row["subject"], int(row["sample"]))] = row
            except (KeyError, ValueError, TypeError):
                continue
    return rows


def append_index(out_dir: Path, rows: list[dict]) -> None:
    if not rows:
        return
    path = out_dir / "index.csv"
    with _locked(out_dir):
        new = not path.is_file() or path.stat().st_size == 0
        with open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=INDEX_FIELDS, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerows(rows)
            f.flush()
            os.fsync(f.fileno())


def compact_index(out_dir: Path) -> int:
    """Rewrite index.csv with one row per (subject, sample), sorted; returns the row count."""
    path = out_dir / "index.csv"
    with _locked(out_dir):
        rows = read_index(path)
        tmp = path.with_name("index.csv.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=INDEX_FIELDS, extrasaction="ignore")
            writer.writeheader()
            for key in sorted(rows):
                writer.writerow(rows[key])
        os.replace(tmp, path)
    return len(rows)


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


@dataclass
class InferSettings:
    checkpoint: Path
    out_dir: Path
    sampler: str
    steps: int
    guidance: float
    num_samples: int
    seed: int
    batch_size: int
    previews: bool
    shard: tuple[int, int] = (0, 1)
    tolerance_s: float = 0.5


@dataclass
class Job:
    item: ECGItem
    k: int
    seed: int = 0
    ecg: np.ndarray | None = None


@dataclass
class RunReport:
    generated: int = 0
    skipped_done: int = 0
    bad: int = 0
    failed: int = 0
    seconds: float = 0.0
    rows: list = field(default_factory=list)

    @property
    def videos_per_s(self) -> float:
        return self.generated / self.seconds if self.seconds > 0 else float("nan")


def settings_from(cfg: Config, checkpoint: str | None = None, out: str | None = None,
                  num_samples: int | None = None, shard: str | None = None) -> InferSettings:
    inf = cfg.infer
    return InferSettings(
        checkpoint=Path(checkpoint or inf.checkpoint or cfg.stage_dir("flow") / "best.pt"),
        out_dir=Path(out or inf.out_dir or cfg.stage_dir("samples")),
        sampler=inf.sampler, steps=inf.steps, guidance=inf.guidance,
        num_samples=num_samples or inf.num_samples, seed=inf.seed, batch_size=inf.batch_size,
        previews=inf.previews, shard=parse_shard(shard), tolerance_s=cfg.data.ecg_length_tolerance_s)


def _read(item: ECGItem, prepared, tolerance_s: float) -> np.ndarray:
    if item.prepared_index is not None:
        return np.asarray(prepared.ecg[item.prepared_index], dtype=np.float32)
    from ..data.ecg_io import read_ecg

    return read_ecg(item.path, tolerance_s=tolerance_s)


def _encode_isolating(pipe: ECGToCine, ecg: torch.Tensor) -> tuple[object | None, list[str | None]]:
    """Encoder output for a batch; if the batch fails, find which rows fail (their error text)."""
    try:
        return pipe.encode(ecg), [None] * ecg.shape[0]
    except (ValueError, RuntimeError) as err:
        if ecg.shape[0] == 1:
            return None, [f"encoder refused the ECG: {err}"]
    errors: list[str | None] = []
    for i in range(ecg.shape[0]):
        errors.append(_encode_isolating(pipe, ecg[i:i + 1])[1][0])
    return None, errors


class BackgroundWriter:
    """Runs ``submit``ted calls in order on one thread, so that a batch's NIfTI, .npy and GIF
    files (about 0.17 s of CPU per video) are written while the next batch is generated. At most
    ``depth`` calls wait (the videos they hold bound the memory); an error raised in the thread
    stops the later calls and is raised again by the next ``submit`` or by ``close``."""

    def __init__(self, depth: int = 2):
        import queue
        import threading

        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="sample-writer", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while (call := self._queue.get()) is not None:
            if self._error is None:
                try:
                    call()
                except BaseException as err:           # noqa: BLE001 - raised again in the caller
                    self._error = err

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, call) -> None:
        self._raise()
        self._queue.put(call)

    def close(self) -> None:
        """Wait for every submitted call; raise the first error."""
        self._queue.put(None)
        self._thread.join()
        self._raise()


def run(cfg: Config, ecg_spec: str = "split:test", settings: InferSettings | None = None,
        log=print, pipeline: ECGToCine | None = None) -> RunReport:
    """Generate cines for the ECGs of ``ecg_spec``; returns counts and throughput."""
    from tqdm import tqdm

    s = settings or settings_from(cfg)
    require_file(s.checkpoint, "train_flow.py (stage 3)")
    out = s.out_dir
    (out / "previews").mkdir(parents=True, exist_ok=True)
    if s.shard[0] == 0:
        tmp_cfg = out / "config.yaml.tmp"
        save_config(cfg, tmp_cfg)
        os.replace(tmp_cfg, out / "config.yaml")
    items = shard_items(collect_inputs(ecg_spec, cfg), *s.shard)
    ckpt_hash = file_hash(s.checkpoint)
    base = {"seed": s.seed, "sampler": s.sampler, "steps": s.steps, "guidance": s.guidance,
            "checkpoint": str(s.checkpoint), "checkpoint_hash": ckpt_hash}

    # -- what is left to do -------------------------------------------------------------------
    done = read_index(out / "index.csv")
    report = RunReport()
    jobs: list[Job] = []
    for item in items:
        for k in range(s.num_samples):
            row = done.get((item.subject, k))
            if (row and row.get("status") == "ok" and (out / f"{sample_name(item.subject, k)}.npy").is_file()
                    and all(str(row.get(key)) == str(base[key]) for key in SETTINGS)):
                report.skipped_done += 1
                continue
            jobs.append(Job(item, k, sample_seed(s.seed, item.subject, k)))
    log(f"infer: {len(items)} ECGs (shard {s.shard[0]}/{s.shard[1]}) x {s.num_samples} samples; "
        f"{report.skipped_done} already done, {len(jobs)} to generate -> {out}")
    if not jobs:
        compact_index(out)
        return report

    device = select_device(cfg.device)
    pipe = pipeline or ECGToCine.from_checkpoint(s.checkpoint, device, amp=cfg.flow.amp)
    base.update({"alpha": pipe.alpha, "use_template": pipe.use_template, "weights": pipe.info.get("weights", "")})
    prepared = None
    if any(j.item.prepared_index is not None for j in jobs):
        from ..data.datasets import Prepared

        prepared = Prepared(cfg.data_root)

    t_start = time.time()
    bar = tqdm(total=len(jobs), desc="generating", unit="video", dynamic_ncols=True)
    writer = BackgroundWriter()
    try:
        _generate_all(pipe, jobs, s, base, out, report, prepared, bar, writer)
    finally:
        writer.close()                  # index rows are appended only after their files exist
    bar.close()
    report.seconds = time.time() - t_start
    compact_index(out)
    log(f"infer: generated {report.generated} videos in {report.seconds:.1f} s = "
        f"{report.videos_per_s:.3f} videos/s ({s.sampler}, {s.steps} steps, guidance {s.guidance}, "
        f"batch {s.batch_size}, {device}); {report.bad} unreadable ECGs skipped, {report.failed} failed")
    return report


def _generate_all(pipe: ECGToCine, jobs: list[Job], s: InferSettings, base: dict, out: Path, report: RunReport,
                  prepared, bar, writer: BackgroundWriter) -> None:
    """Batches of readable ECGs -> videos; their files and index rows go to ``writer``."""
    from ..utils.previews import save_preview

    bad_reason: dict[str, str] = {}
    pos = 0
    while pos < len(jobs):
        # next batch of readable ECGs (unreadable ones are recorded and skipped right away)
        batch: list[Job] = []
        rows: list[dict] = []
        ecg_cache: dict[str, np.ndarray] = {}
        while pos < len(jobs) and len(batch) < s.batch_size:
            job = jobs[pos]
            pos += 1
            subject = job.item.subject
            if subject not in bad_reason and subject not in ecg_cache:
                try:
                    ecg_cache[subject] = _read(job.item, prepared, s.tolerance_s)
                except (ValueError, OSError) as err:          # ECGReadError is a ValueError
                    bad_reason[subject] = str(err).replace("\n", " ")
            if subject in bad_reason:
                rows.append(_row(job, base, "skipped", bad_reason[subject]))
                report.bad += 1
                bar.update(1)
                continue
            job.ecg = ecg_cache[subject]
            batch.append(job)
        files = []
        if batch:
            batch_rows, files = _generate_batch(pipe, batch, s, base, out, report)
            rows += batch_rows
            bar.update(len(batch))
        writer.submit(functools.partial(_write_batch, out, files, rows, save_preview))
        report.rows += rows


def _write_batch(out: Path, files: list[tuple], rows: list[dict], save_preview) -> None:
    """A batch's sample files, then its index rows (a row marks its files complete)."""
    for name, video, ecg, st, en, rr_ms, preview, title, fallback in files:
        save_npy(video, out / f"{name}.npy")
        write_nifti(video, out / f"{name}.nii.gz", frame_ms=rr_ms / 50 if not math.isnan(rr_ms) else None)
        if preview:
            save_preview(preview, video, ecg, st, en, title=title, fallback=fallback)
    append_index(out, rows)


def _row(job: Job, base: dict, status: str, reason: str = "", **more) -> dict:
    return {**base, "subject": job.item.subject, "sample": job.k, "status": status, "reason": reason,
            "source": job.item.source, "sample_seed": job.seed, **more}


def _generate_batch(pipe: ECGToCine, batch: list[Job], s: InferSettings, base: dict, out: Path,
                    report: RunReport) -> tuple[list[dict], list[tuple]]:
    """Encode the batch's unique ECGs once, sample every job; returns index rows and what
    ``_write_batch`` writes."""
    t0 = time.time()
    subjects = list(dict.fromkeys(j.item.subject for j in batch))
    ecg = torch.from_numpy(np.stack([next(j.ecg for j in batch if j.item.subject == sid) for sid in subjects]))
    cycle, errors = _encode_isolating(pipe, ecg)
    rows = []
    if cycle is None:                                   # some rows fail: drop them, re-encode the rest
        failed = {sid: err for sid, err in zip(subjects, errors) if err is not None}
        for j in [j for j in batch if j.item.subject in failed]:
            rows.append(_row(j, base, "failed", failed[j.item.subject]))
            report.failed += 1
        batch = [j for j in batch if j.item.subject not in failed]
        subjects = [sid for sid in subjects if sid not in failed]
        if not batch:
            return rows, []
        ecg = torch.from_numpy(np.stack([next(j.ecg for j in batch if j.item.subject == sid) for sid in subjects]))
        cycle = pipe.encode(ecg)
    pick = torch.tensor([subjects.index(j.item.subject) for j in batch])
    take = lambda x: x[pick.to(x.device)]                                  # noqa: E731
    noise_seeds = [j.seed for j in batch]
    from .generator import seeded_noise_batch

    noise = seeded_noise_batch(noise_seeds, pipe.latent_shape)
    z = pipe.sample_latents(take(cycle.tokens), take(cycle.pooled), noise, s.sampler, s.steps, s.guidance)
    cine, _ = pipe.decode(z)
    start, end = take(cycle.start).cpu().long(), take(cycle.end).cpu().long()
    fallback = take(cycle.fallback).cpu().bool()
    per_video = (time.time() - t0) / len(batch)
    files = []
    for i, job in enumerate(batch):
        name = sample_name(job.item.subject, job.k)
        video = cine[i].numpy()                                             # (1, 50, 96, 96)
        st, en = int(start[i]), int(end[i])
        rr_ms = (en - st) / 500 * 1000 if en > st else float("nan")
        preview = str(out / "previews" / f"{job.item.subject}.gif") if s.previews and job.k == 0 else ""
        files.append((name, video, job.ecg, st, en, rr_ms, preview, job.item.subject, bool(fallback[i])))
        rows.append(_row(job, base, "ok", nifti=str(out / f"{name}.nii.gz"), npy=str(out / f"{name}.npy"),
                         preview=preview, cycle_start=st, cycle_end=en, rr_ms=f"{rr_ms:.1f}",
                         fallback=bool(fallback[i]), seconds=f"{per_video:.3f}"))
        report.generated += 1
    return rows, files


def summary_json(report: RunReport) -> str:
    return json.dumps({"generated": report.generated, "already_done": report.skipped_done,
                       "unreadable": report.bad, "failed": report.failed, "seconds": report.seconds,
                       "videos_per_s": report.videos_per_s})
