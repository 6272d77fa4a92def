"""The ECG-only pool and the synthetic cine sources drawn from it.

Every source answers ``cine(ecg_row, k) -> uint8 (50, 96, 96)`` for the pool ECG ``ecg_row``:

    generator  sample k of this flow checkpoint (``ECGToCine.generate``, per-sample seeds from
               ``(infer.seed, subject, k)`` as ``infer_flow.py``), K = downstream.samples_per_ecg
    nearest    the real pretraining cine whose ECG is nearest in pooled stage-1 features (K = 1)
    template   the decoded template, identical for every ECG (K = 1): no information at all
    oracle     the phantom's true cine of that ECG-only subject (K = 1): a perfect generator

Only the (ECG, k) rows a draw needs are produced, cached as uint8 under
``<out>/pool/<source>.npy`` with a done mask beside it, so an interrupted run continues.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..contract import ECG_SAMPLES, NUM_LEADS
from ..data.datasets import cine_to_uint8
from .data import DownstreamDataError, check_label_columns

CINE_SHAPE = (50, 96, 96)


@dataclass
class Pool:
    """The ECG-only pool after reading: ``ecg (M, 12, 5000)`` float32 (memmap), subject ids, and
    the oracle cine files when the manifest has ``oracle_cmr_path`` (the phantom's)."""

    subject_ids: list[str]
    ecg: np.ndarray
    oracle_paths: list[Path] | None
    spec: str


def default_pool_spec(cfg) -> Path:
    from ..phantom import POOL_DIR

    return cfg.phantom_path / POOL_DIR / "manifest.csv"


def ensure_pool_files(cfg, log=print) -> str:
    """The pool to read: ``downstream.pool``, or the phantom's ECG-only manifest (written when
    ``downstream.pool_n`` > 0 and it is missing or of another size)."""
    ds = cfg.downstream
    if ds.pool:
        if not Path(ds.pool).exists():
            raise DownstreamDataError(f"downstream.pool '{ds.pool}' does not exist: give a folder of ECG files "
                                      "or a manifest CSV with an ecg_path column")
        return ds.pool
    manifest = default_pool_spec(cfg)
    have = _rows(manifest)
    if ds.pool_n > 0 and have != ds.pool_n:
        from ..phantom import generate_ecg_only

        log(f"downstream: writing {ds.pool_n} ECG-only phantom subjects under {manifest.parent}")
        generate_ecg_only(cfg.phantom_path, ds.pool_n, seed=cfg.data.phantom_seed, workers=cfg.data.workers,
                          version=cfg.data.phantom_version, prevalence=cfg.data.phantom_prevalence)
    elif have == 0:
        raise DownstreamDataError(
            f"no ECG-only pool: '{manifest}' is missing. Set downstream.pool to a folder or manifest of ECGs, "
            f"or downstream.pool_n > 0 to have the phantom write one there.")
    return str(manifest)


def _rows(manifest: Path) -> int:
    if not manifest.is_file():
        return 0
    with open(manifest) as fh:
        return max(0, sum(1 for _ in fh) - 1)


def load_pool(cfg, out_dir: Path, exclude_ids: set[str], log=print) -> Pool:
    """Read every pool ECG once into ``<out>/pool/ecg.npy`` (unreadable ones are listed in
    ``pool/skipped.csv`` and left out, as are ids of labelled subjects)."""
    from tqdm import tqdm

    from ..data.ecg_io import read_ecg
    from ..flow.infer import collect_inputs

    spec = ensure_pool_files(cfg, log)
    folder = out_dir / "pool"
    folder.mkdir(parents=True, exist_ok=True)
    info_path = folder / "pool.json"
    items = collect_inputs(spec, cfg)
    oracle = _oracle_column(spec, len(items))
    key = {"spec": str(spec), "n_items": len(items), "exclude": sorted(exclude_ids)}
    if info_path.is_file() and json.loads(info_path.read_text()).get("key") == key:
        info = json.loads(info_path.read_text())
        ecg = np.load(folder / "ecg.npy", mmap_mode="r")
    else:
        from ..data.prepare import shrink_npy

        # streamed into a memmap of the pool's size, then cut to the readable rows: a large pool
        # never sits in memory
        tmp = folder / "ecg.tmp.npy"
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32,
                                          shape=(max(1, len(items)), NUM_LEADS, ECG_SAMPLES))
        kept, skipped = [], []
        for i, item in enumerate(tqdm(items, desc="reading the ECG-only pool", unit="ECG")):
            if item.subject in exclude_ids:
                skipped.append((item.subject, item.source, "a labelled (scored) subject"))
                continue
            try:
                array[len(kept)] = read_ecg(item.path, tolerance_s=cfg.data.ecg_length_tolerance_s)
                kept.append(i)
            except (ValueError, OSError) as err:
                skipped.append((item.subject, item.source, str(err).replace("\n", " ")))
        _write_skipped(folder / "skipped.csv", skipped)
        if not kept:
            raise DownstreamDataError(f"no readable ECG in the pool '{spec}' ({len(skipped)} skipped: see "
                                      f"{folder / 'skipped.csv'})")
        array.flush()
        del array
        shrink_npy(tmp, len(kept))
        os.replace(tmp, folder / "ecg.npy")
        info = {"key": key, "kept": kept, "subjects": [items[i].subject for i in kept], "skipped": len(skipped)}
        info_path.write_text(json.dumps(info))
        ecg = np.load(folder / "ecg.npy", mmap_mode="r")
    oracle_paths = [oracle[i] for i in info["kept"]] if oracle is not None else None
    return Pool(info["subjects"], ecg, oracle_paths, str(spec))


def _write_skipped(path: Path, rows: list) -> None:
    import csv

    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["subject", "source", "reason"])
        writer.writerows(rows)


def _oracle_column(spec: str, n: int) -> list[Path] | None:
    path = Path(spec)
    if not (path.is_file() and path.suffix.lower() == ".csv"):
        return None
    import pandas as pd

    table = pd.read_csv(path, dtype=str)
    if "oracle_cmr_path" not in table.columns or "ecg_path" not in table.columns:
        return None
    assert len(table) == n, "collect_inputs reads a manifest row by row"
    return [Path(p) if Path(p).is_absolute() else path.parent / p for p in table["oracle_cmr_path"]]


def pool_label_table(pool: Pool, ds):
    """The pool manifest's rows of ``pool.subject_ids``, in that order, for ``downstream.label_pool``
    (a clear error when the pool has no true cines or lacks a label column)."""
    import pandas as pd

    if pool.oracle_paths is None:
        raise DownstreamDataError(
            f"downstream.label_pool needs the pool's true cines (an 'oracle_cmr_path' column, as the phantom's "
            f"ECG-only pool has); '{pool.spec}' has none. Set downstream.label_pool=false.")
    table = pd.read_csv(pool.spec)
    check_label_columns(table, ds, where=f"pool manifest {pool.spec}")
    return table.set_index(table["subject_id"].astype(str)).loc[pool.subject_ids].reset_index(drop=True)


# ----------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------


class CachedSource:
    """``(M, K, 50, 96, 96)`` uint8 cache + done mask ``(M, K)``; ``fill(rows)`` makes the missing
    (ECG, k) rows with ``make(batch_rows) -> uint8 (B, 50, 96, 96)``."""

    def __init__(self, path: Path, n_ecgs: int, per_ecg: int, make, batch: int = 8, name: str = "",
                 key: dict | None = None):
        self.path, self.n_ecgs, self.per_ecg, self.make, self.batch = path, n_ecgs, per_ecg, make, batch
        self.name = name or path.stem
        self.done_path = path.with_name(path.stem + ".done.npy")
        key_path = path.with_name(path.stem + ".key.json")
        shape = (n_ecgs, per_ecg) + CINE_SHAPE
        fresh = not (path.is_file() and self.done_path.is_file())
        if not fresh:
            cache = np.load(path, mmap_mode="r")
            fresh = tuple(cache.shape) != shape
        saved = json.loads(key_path.read_text()) if key is not None and key_path.is_file() else None
        if not fresh and saved is not None and saved != key:
            # a cine made by another model must not pass for this one's (nor its pretraining runs)
            raise DownstreamDataError(
                f"'{path}' holds cines made with {saved}, not {key}. Delete "
                f"'{path.parent}' (and the rows pretrained on it) or set downstream.out_dir to another folder.")
        if fresh:
            path.parent.mkdir(parents=True, exist_ok=True)
            np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape).flush()
            np.save(self.done_path, np.zeros((n_ecgs, per_ecg), dtype=bool))
        if key is not None and (fresh or saved is None):
            key_path.write_text(json.dumps(key))
        self.cache = np.load(path, mmap_mode="r+")
        self.done = np.load(self.done_path)

    def fill(self, rows: np.ndarray) -> None:
        from tqdm import tqdm

        todo = sorted({(int(e), int(k)) for e, k in rows if not self.done[e, k]})
        if not todo:
            return
        bar = tqdm(total=len(todo), desc=f"synthetic pool: {self.name}", unit="cine")
        for i in range(0, len(todo), self.batch):
            chunk = todo[i:i + self.batch]
            cines = self.make(chunk)
            for (e, k), cine in zip(chunk, cines):
                self.cache[e, k] = cine
                self.done[e, k] = True
            self.cache.flush()
            tmp = self.done_path.with_name(self.done_path.stem + ".tmp.npy")
            np.save(tmp, self.done)
            os.replace(tmp, self.done_path)     # the mask only ever names rows already flushed
            bar.update(len(chunk))
        bar.close()

    def cine(self, ecg_row: int, k: int) -> np.ndarray:
        return np.asarray(self.cache[ecg_row, k % self.per_ecg])


class NearestSource:
    """The nearest real pretraining cine per pool ECG (indices into the prepared arrays)."""

    name = "nearest"
    per_ecg = 1

    def __init__(self, prepared, bank_rows: np.ndarray, choice: np.ndarray):
        self.prepared, self.bank_rows, self.choice = prepared, bank_rows, choice

    def fill(self, rows: np.ndarray) -> None:
        pass

    def cine(self, ecg_row: int, k: int) -> np.ndarray:
        return np.asarray(self.prepared.cine[self.bank_rows[self.choice[ecg_row]]])


class TemplateSource:
    """The decoded template: one cine for every ECG."""

    name = "template"
    per_ecg = 1

    def __init__(self, cine: np.ndarray):
        self.video = cine

    def fill(self, rows: np.ndarray) -> None:
        pass

    def cine(self, ecg_row: int, k: int) -> np.ndarray:
        return self.video


def build_source(name: str, cfg, pool: Pool, prepared, bank_rows: np.ndarray, out_dir: Path, flow=None):
    """The source ``name`` over ``pool``; ``flow``: a loaded ``ECGToCine`` (generator, nearest,
    template); ``bank_rows``: prepared indices of the real pretraining cines (nearest)."""
    ds = cfg.downstream
    folder = out_dir / "pool"
    if name == "oracle":
        if pool.oracle_paths is None:
            raise DownstreamDataError(
                f"source 'oracle' needs the true cines of the pool ECGs (an 'oracle_cmr_path' column in the pool "
                f"manifest, as the phantom's ECG-only pool has); '{pool.spec}' has none. Drop 'oracle' from "
                "downstream.sources.")
        from ..data.cmr_io import read_cine

        def make(chunk):       # cropped as prepare_data.py crops the real cines
            return [cine_to_uint8(read_cine(pool.oracle_paths[e], crop_mm=cfg.data.crop_mm)[0]) for e, _ in chunk]

        return CachedSource(folder / "oracle.npy", len(pool.subject_ids), 1, make, name="oracle")
    if flow is None:
        raise ValueError(f"source '{name}' needs the flow checkpoint")
    if name == "generator":
        from ..flow.generator import sample_seed

        inf = cfg.infer

        def make(chunk):
            ecg = torch.from_numpy(np.stack([np.asarray(pool.ecg[e], dtype=np.float32) for e, _ in chunk]))
            seeds = [sample_seed(inf.seed, pool.subject_ids[e], k) for e, k in chunk]
            out = flow.generate(ecg, seeds, sampler=inf.sampler, steps=inf.steps, guidance=inf.guidance)
            return cine_to_uint8(out.cine[:, 0].numpy())

        from ..utils.checkpoint import file_hash

        key = {"flow": file_hash(flow.info["checkpoint"]), "vae": flow.info.get("vae_hash"),
               "ecg": flow.info.get("ecg_hash"), "sampler": inf.sampler, "steps": inf.steps,
               "guidance": inf.guidance, "seed": inf.seed}
        return CachedSource(folder / "generator.npy", len(pool.subject_ids), ds.samples_per_ecg, make,
                            batch=inf.batch_size, name="generator", key=key)
    if name == "nearest":
        return NearestSource(prepared, bank_rows, _nearest_choice(flow, pool, prepared, bank_rows, folder))
    if name == "template":
        return TemplateSource(cine_to_uint8(flow.template_video()[0, 0].numpy()))
    raise ValueError(f"unknown source '{name}'")


def _nearest_choice(flow, pool: Pool, prepared, bank_rows: np.ndarray, folder: Path) -> np.ndarray:
    """Per pool ECG, the position in ``bank_rows`` of the nearest real ECG (cached)."""
    from ..flow.retrieval import nearest_rows, pooled_features

    path = folder / "nearest.json"
    key = {"bank": [int(i) for i in bank_rows], "pool": pool.subject_ids, "encoder": flow.info.get("ecg_hash")}
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return np.asarray(saved["choice"], dtype=np.int64)
    bank = pooled_features(flow, _Rows(prepared.ecg, bank_rows))
    choice = nearest_rows(pooled_features(flow, pool.ecg), bank)
    path.write_text(json.dumps({"key": key, "choice": [int(c) for c in choice]}))
    return choice


class _Rows:
    """A row subset of an array, sliceable like one (reads only the rows asked for)."""

    def __init__(self, array, rows: np.ndarray):
        self.array, self.rows = array, np.asarray(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, item):
        return np.asarray(self.array[self.rows[item]])
