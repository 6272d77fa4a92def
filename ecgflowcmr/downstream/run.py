"""``downstream.py``: the whole experiment, resumable row by row.

Rows: ``scratch`` (no pretraining), ``real`` (MAE on the real pretraining cines; ratio 0), and
``<source>_<ratio>`` for every source and ratio > 0 (MAE on the real cines plus
``round(n_real * ratio / 100)`` synthetic ones drawn by ``data.draw_pool``). Writes under
``downstream.out_dir`` (default ``runs/<exp>/downstream/``)::

    pool/                 the pool's ECGs, the synthetic caches, nearest-neighbour choices
    pretrain/<row>/       last.pt while training, encoder.pt when done (then skipped)
    finetune/<row>.json   per-fold scores, written fold by fold (done folds are skipped);
                          probe/<row>.json with ``downstream.probe=linear``
    downstream.{md,json}  the table; downstream.png the plots; subjects.json who was used where
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from ..config import Config, save_config
from ..data.datasets import Prepared
from ..utils.device import select_device
from ..utils.run import require_file
from . import data as D
from .finetune import Labelled, finetune_row, paired_difference, summarise
from .pretrain import ARCH_KEYS, PretrainSet, batch_tensor, pretrain
from .report import plot, write_table
from .sources import build_source, load_pool, pool_label_table

FLOW_SOURCES = ("generator", "nearest", "template")


def out_dir_of(cfg: Config) -> Path:
    return Path(cfg.downstream.out_dir) if cfg.downstream.out_dir else cfg.stage_dir("downstream")


def plan_rows(ds) -> list[tuple[str, str | None, int | None]]:
    """``[(row, source, ratio)]`` in table order."""
    rows = [("scratch", None, None)] if ds.scratch else []
    if 0 in ds.ratios:
        rows.append(("real", "real", 0))
    rows += [(f"{s}_{r}", s, r) for s in ds.sources for r in sorted(ds.ratios) if r > 0]
    return rows


def run(cfg: Config, only: list[str] | None = None, log=print, prepare_only: bool = False) -> dict:
    """Run (or resume) every row, then write the table and plots; returns the table's dict.
    ``prepare_only``: stop once the pool, its synthetic cines and ``subjects.json`` are written."""
    ds = cfg.downstream
    out = out_dir_of(cfg)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    device = select_device(cfg.device)
    require_file(Path(cfg.data_root) / "meta.json", "prepare_data.py")
    prepared = Prepared(cfg.data_root)
    subjects = D.select_subjects(prepared.subjects, ds)
    rows = plan_rows(ds)
    if only:
        unknown = sorted(set(only) - {r for r, _, _ in rows})
        if unknown:
            raise ValueError(f"--only: unknown rows {unknown} (rows of this config: {[r for r, _, _ in rows]})")
        rows = [r for r in rows if r[0] in only]
    n_real = len(subjects.pretrain)
    synthetic_rows = [r for r in rows if r[2]]
    pool = None
    if synthetic_rows or ds.label_pool:
        pool = load_pool(cfg, out, set(subjects.labelled_ids), log)
    extra = _pool_labelled(cfg, pool, n_real, out) if ds.label_pool else None
    lab, labelled_ids = labelled_set(prepared, subjects, ds, extra)
    (out / "subjects.json").write_text(json.dumps({
        "labelled": labelled_ids,
        "pretrain_real": prepared.subject_ids(subjects.pretrain)}, indent=0))
    log(f"downstream: {len(labelled_ids)} labelled subjects"
        + (f" ({len(extra[0])} of them from the pool)" if extra else "")
        + f" ({ds.folds} folds), {n_real} real pretraining cines, {ds.probe} evaluation,"
          f" rows {[r for r, _, _ in rows]}")
    sources, draws = _synthetic_sources(cfg, synthetic_rows, pool, prepared, subjects, extra, out, device, log)
    if prepare_only:
        return {}
    table_rows = _score_rows(ds, rows, prepared, subjects, sources, draws, lab, labelled_ids, out, device, log)
    merged = _merge_existing(out, table_rows, only)
    order = [r for r, _, _ in plan_rows(ds)]                  # the table's order, whatever ran first
    merged = {**{r: merged[r] for r in order if r in merged}, **{r: v for r, v in merged.items() if r not in order}}
    _add_paired_differences(merged, out, ds.probe)
    result = {"rows": merged,
              "setup": {"labelled subjects": (f"{len(labelled_ids)} ({len(extra[0])} from the pool)" if extra
                                              else len(labelled_ids)), "folds": ds.folds,
                        "real pretraining cines": n_real, "pool ECGs": len(pool.subject_ids) if pool else 0,
                        "samples per ECG (generator)": ds.samples_per_ecg,
                        "pretraining steps x batch": f"{ds.pretrain_steps} x {ds.pretrain_batch}",
                        "mask ratio": ds.mask_ratio,
                        "evaluation": (f"fine-tuned, {ds.finetune_epochs} epochs" if ds.probe == "finetune"
                                       else f"linear probe of the frozen encoder, L2 {ds.probe_l2}"),
                        "std": "sample std over folds (ddof 1)"}}
    md, js = write_table(result, out)
    figure = plot(result, out)
    log(f"downstream: wrote {md}, {js}" + (f", {figure}" if figure else " (matplotlib missing: no plot)"))
    return result


def _synthetic_sources(cfg: Config, synthetic_rows, pool, prepared, subjects, extra, out: Path, device,
                       log) -> tuple[dict, dict[str, np.ndarray]]:
    """Every source the synthetic rows use, filled with the draws of the largest ratio:
    ``({name: source}, {name: (n, 2) draws of (pool ECG, sample k)})``."""
    ds, sources, draws = cfg.downstream, {}, {}
    if not synthetic_rows:
        return sources, draws
    n_real, flow = len(subjects.pretrain), None
    needed = {s for _, s, _ in synthetic_rows}
    if needed & set(FLOW_SOURCES):
        from ..flow.generator import ECGToCine

        ckpt = Path(ds.flow_checkpoint or cfg.stage_dir("flow") / "best.pt")
        require_file(ckpt, "train_flow.py (stage 3)")
        flow = ECGToCine.from_checkpoint(ckpt, device, amp=cfg.flow.amp)
    most = D.synthetic_count(n_real, max(r for _, _, r in synthetic_rows))
    for name in sorted(needed):
        source = (extra[2] if extra and name == "oracle"
                  else build_source(name, cfg, pool, prepared, subjects.pretrain, out, flow))
        draws[name] = D.draw_pool(most, len(pool.subject_ids), source.per_ecg, ds.seed)
        assert extra is None or not set(draws[name][:, 0]) & set(extra[0]), "a labelled pool ECG was drawn"
        source.fill(draws[name])
        sources[name] = source
    log(f"downstream: pool of {len(pool.subject_ids)} ECGs ({pool.spec}); up to {most} synthetic cines per row")
    return sources, draws


def _score_rows(ds, rows, prepared, subjects, sources, draws, lab, labelled_ids, out: Path, device, log) -> dict:
    """Pretrain (or reuse) each row's encoder and score it on the labelled set: ``{row: entry}``."""
    key_common = {"arch": {k: getattr(ds, k) for k in ARCH_KEYS}, "labelled": labelled_ids,
                  "folds": ds.folds, "epochs": ds.finetune_epochs, "batch": ds.finetune_batch,
                  "lr": ds.finetune_lr, "wd": ds.weight_decay, "rw": ds.regression_weight, "seed": ds.seed,
                  "class": ds.class_column, "regression": list(ds.regression_columns)}
    if ds.probe == "linear":
        key_common.update(probe="linear", probe_l2=ds.probe_l2)
    n_real, table_rows = len(subjects.pretrain), {}
    for row, source, ratio in rows:
        counts = {"real": 0, "synthetic": 0}
        encoder = None
        if source is not None:
            mix = []
            if ratio:
                mix = [(sources[source], draws[source][:D.synthetic_count(n_real, ratio)])]
            data = PretrainSet(prepared, subjects.pretrain, mix)
            counts = data.counts()
            counts["synthetic"] = len(data) - n_real
            encoder = pretrain(data, ds, out / "pretrain" / row, device, log)
        key = dict(key_common, encoder=_encoder_id(encoder))
        scores = _finetune_path(out, row, ds.probe)
        scores.parent.mkdir(parents=True, exist_ok=True)
        record = finetune_row(row, encoder, lab, ds, scores, device, key, log)
        table_rows[row] = {"source": source, "ratio": ratio, "counts": counts, "scores": summarise(record)}
    return table_rows


def run_parallel(cfg: Config, config_path: str, overrides: list[str], jobs: int, only: list[str] | None = None,
                 log=print) -> None:
    """Pretrain the rows in ``jobs`` worker processes (``python -m ecgflowcmr.downstream --only <their rows>``, cores /
    jobs torch threads each, logs in ``<out>/logs/``). The pool and every synthetic cine are made
    first, here, so the workers only read them; ``run`` afterwards scores every row and writes the table."""
    run(cfg, only, log, prepare_only=True)
    rows = [r for r, source, _ in plan_rows(cfg.downstream) if source is not None and (not only or r in only)]
    groups = [rows[i::jobs] for i in range(jobs) if rows[i::jobs]]
    out = out_dir_of(cfg)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // jobs)))
    workers = []
    for k, group in enumerate(groups):
        path = out / "logs" / f"worker_{k}.log"
        log(f"downstream: worker {k} pretrains {group} (log: {path})")
        with open(path, "w") as fh:
            workers.append((path, subprocess.Popen(
                [sys.executable, "-m", "ecgflowcmr.downstream", "--config", config_path,
                 "--only", ",".join(group), *overrides],
                stdout=fh, stderr=subprocess.STDOUT, env=env)))
    failed = [path for path, proc in workers if proc.wait() != 0]
    if failed:
        tail = "".join(failed[0].read_text().splitlines(keepends=True)[-20:])
        raise RuntimeError(f"{len(failed)} downstream worker(s) failed; the end of {failed[0]}:\n{tail}")


def labelled_set(prepared: Prepared, subjects: D.Subjects, ds, extra=None) -> tuple[Labelled, list[str]]:
    """The labelled cines at the ViT's input size, their labels, folds and cohorts, and their ids.
    ``extra``: ``(pool rows, their label table, oracle source)`` of labelled pool subjects."""
    classes, phenotypes = D.labels_of(prepared.subjects, subjects.labelled, ds)
    ids = list(subjects.labelled_ids)
    cines = [np.asarray(prepared.cine[i]) for i in subjects.labelled]
    if extra is not None:
        rows, table, oracle = extra
        more_classes, more_phenotypes = D.labels_of(table, rows, ds)
        classes = np.concatenate([classes, more_classes]) if classes is not None else None
        phenotypes = np.concatenate([phenotypes, more_phenotypes])
        ids += list(table["subject_id"].astype(str).to_numpy()[rows])
        cines += [oracle.cine(int(e), 0) for e in rows]
    x = torch.cat([batch_tensor(cines[j:j + 16], ds) for j in range(0, len(cines), 16)])
    class_names = sorted(set(classes)) if classes is not None else []
    cohorts = D.balanced_cohorts(classes, ds.normal_class, ds.seed) if classes is not None else {}
    fold = D.stratified_folds(classes, len(ids), ds.folds, ds.seed)
    return Labelled(x, classes, class_names, phenotypes, list(ds.regression_columns), fold, cohorts), ids


def _pool_labelled(cfg: Config, pool, n_real: int, out: Path):
    """``(pool rows, label table, oracle source)``: the pool ECGs that no row of the whole plan draws
    (whatever ``--only`` picks, so every row is scored on the same subjects), with their true cines."""
    ds = cfg.downstream
    most = D.synthetic_count(n_real, max(ds.ratios, default=0))
    rows = D.undrawn_pool_rows(most, len(pool.subject_ids), ds.seed)
    if len(rows) == 0:
        raise D.DownstreamDataError(
            f"downstream.label_pool: the largest draw ({most} cines) uses every one of the {len(pool.subject_ids)} "
            "pool ECGs, so none is left to label. Enlarge the pool (downstream.pool_n) or lower the ratios.")
    table = pool_label_table(pool, ds)
    oracle = build_source("oracle", cfg, pool, None, np.zeros(0, np.int64), out)
    oracle.fill(np.stack([rows, np.zeros_like(rows)], axis=1))
    return rows, table, oracle


def _encoder_id(path: Path | None) -> str | None:
    if path is None:
        return None
    return torch.load(path, map_location="cpu", weights_only=True)["fingerprint"]


def _finetune_path(out: Path, row: str, probe: str = "finetune") -> Path:
    """``finetune/<row>.json`` (``probe/<row>.json`` for the linear probe); the folder is not made."""
    return out / ("finetune" if probe == "finetune" else "probe") / f"{row}.json"


def _add_paired_differences(rows: dict, out: Path, probe: str) -> None:
    """``rows[r]["vs_real"]``: each row minus MAE-on-real over the same folds (when both were scored
    on the same labelled subjects and folds)."""
    path = _finetune_path(out, "real", probe)
    if "real" not in rows or not path.is_file():
        return
    reference = json.loads(path.read_text())
    same = {k: v for k, v in reference["key"].items() if k != "encoder"}
    for name, row in rows.items():
        row.pop("vs_real", None)
        mine = _finetune_path(out, name, probe)
        if name == "real" or not mine.is_file():
            continue
        record = json.loads(mine.read_text())
        if {k: v for k, v in record["key"].items() if k != "encoder"} == same:
            row["vs_real"] = paired_difference(record, reference)


def _merge_existing(out: Path, rows: dict, only: list[str] | None) -> dict:
    """With ``--only``, keep the other rows of an existing table."""
    path = out / "downstream.json"
    if not only or not path.is_file():
        return rows
    merged = json.loads(path.read_text()).get("rows", {})
    merged.update(rows)
    return merged
