"""Who is labelled, who pretrains, how synthetic counts are drawn, and the fine-tuning folds.

The rule everything here serves: no subject whose label is scored is ever seen in pretraining,
neither as a real cine nor through the ECG-only pool (a pool entry with a labelled subject's id
is dropped).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class DownstreamDataError(ValueError):
    """A label column, the pool or a subject set is missing or unusable."""


@dataclass
class Subjects:
    """Array indices into the prepared dataset: ``labelled`` (scored by CV), ``pretrain`` (real
    pretraining cines); disjoint by construction and checked."""

    labelled: np.ndarray
    pretrain: np.ndarray
    labelled_ids: list[str]


def select_subjects(table, ds) -> Subjects:
    """Labelled = subjects of ``ds.label_splits`` (a seeded subset of ``ds.labelled_n`` when > 0);
    pretraining = subjects of ``ds.pretrain_splits`` that are not labelled (a seeded subset of
    ``ds.real_n`` when > 0). ``table``: subjects.csv."""
    check_label_columns(table, ds)
    split = table["split"].astype(str).to_numpy()
    candidates = np.flatnonzero(np.isin(split, ds.label_splits))
    if ds.labelled_n > 0:
        if ds.labelled_n > len(candidates):
            raise DownstreamDataError(
                f"downstream.labelled_n={ds.labelled_n} but the splits {ds.label_splits} hold only "
                f"{len(candidates)} subjects")
        rng = np.random.default_rng([int(ds.seed), 11])
        candidates = np.sort(rng.choice(candidates, size=ds.labelled_n, replace=False))
    if len(candidates) < ds.folds:
        raise DownstreamDataError(f"{len(candidates)} labelled subjects in splits {ds.label_splits}: "
                                  f"too few for downstream.folds={ds.folds}")
    ids = table["subject_id"].astype(str).to_numpy()
    labelled_ids = set(ids[candidates])
    pretrain = np.flatnonzero(np.isin(split, ds.pretrain_splits) & ~np.isin(ids, list(labelled_ids)))
    if len(pretrain) == 0:
        raise DownstreamDataError(f"no real pretraining subject left in splits {ds.pretrain_splits} "
                                  "once the labelled subjects are removed")
    if ds.real_n > 0:
        if ds.real_n > len(pretrain):
            raise DownstreamDataError(
                f"downstream.real_n={ds.real_n} but the splits {ds.pretrain_splits} hold only {len(pretrain)} "
                "real pretraining subjects once the labelled ones are removed")
        rng = np.random.default_rng([int(ds.seed), 13])
        pretrain = np.sort(rng.choice(pretrain, size=ds.real_n, replace=False))
    assert not set(ids[pretrain]) & labelled_ids
    return Subjects(candidates, pretrain, sorted(labelled_ids))


def check_label_columns(table, ds, where: str = "the prepared dataset's subjects.csv (prepare_data.py copies "
                                                 "every non-path column of its manifest there)") -> None:
    """Every configured label column exists (and regression columns are numeric and complete)."""
    wanted = ([ds.class_column] if ds.class_column else []) + list(ds.regression_columns)
    missing = [c for c in wanted if c not in table.columns]
    if missing:
        known = [c for c in table.columns if c not in ("index", "subject_id", "split")]
        raise DownstreamDataError(
            f"label column(s) {missing} not in {where} (label columns there: "
            f"{known or 'none'}). Fix downstream.class_column / downstream.regression_columns or add "
            f"the columns to the manifest.")


def labels_of(table, rows: np.ndarray, ds) -> tuple[np.ndarray | None, np.ndarray]:
    """``(classes (n,) str or None, phenotypes (n, n_regression) float64)`` of ``rows``."""
    part = table.iloc[rows]
    classes = part[ds.class_column].astype(str).to_numpy() if ds.class_column else None
    values = np.zeros((len(rows), len(ds.regression_columns)))
    for j, column in enumerate(ds.regression_columns):
        col = np.asarray(part[column], dtype=np.float64) if _numeric(part[column]) else None
        if col is None or not np.isfinite(col).all():
            raise DownstreamDataError(f"regression column '{column}' has missing or non-numeric values for "
                                      "labelled subjects")
        values[:, j] = col
    return classes, values


def _numeric(series) -> bool:
    import pandas as pd

    return pd.api.types.is_numeric_dtype(series)


def stratified_folds(classes: np.ndarray | None, n: int, k: int, seed: int) -> np.ndarray:
    """Fold id ``(n,)`` in ``0..k-1``: each class shuffled and dealt round-robin (classes in sorted
    order, the dealing continuing across classes), so fold sizes differ by at most one and every
    fold holds each class within one of its share."""
    rng = np.random.default_rng([int(seed), 12])
    groups = [np.arange(n)] if classes is None else [np.flatnonzero(classes == c) for c in np.unique(classes)]
    fold = np.empty(n, dtype=np.int64)
    pos = 0
    for members in groups:
        for member in rng.permutation(members):
            fold[member] = pos % k
            pos += 1
    return fold


def balanced_cohorts(classes: np.ndarray, normal: str, seed: int) -> dict[str, np.ndarray]:
    """``{"<disease>_vs_<normal>": positions}`` into ``classes``: every subject of the disease and
    as many normals, drawn without replacement (all normals when there are fewer)."""
    if normal not in set(classes):
        raise DownstreamDataError(f"downstream.normal_class '{normal}' is not among the classes "
                                  f"{sorted(set(classes))}")
    normals = np.flatnonzero(classes == normal)
    cohorts = {}
    for i, disease in enumerate(sorted(set(classes) - {normal})):
        cases = np.flatnonzero(classes == disease)
        rng = np.random.default_rng([int(seed), 13, i])
        chosen = rng.choice(normals, size=min(len(cases), len(normals)), replace=False)
        cohorts[f"{disease}_vs_{normal}"] = np.sort(np.concatenate([cases, chosen]))
    return cohorts


def synthetic_count(n_real: int, ratio_percent: int) -> int:
    """Synthetic cines for a ratio: ``round(n_real * ratio / 100)``."""
    return int(round(n_real * ratio_percent / 100.0))


def draw_pool(count: int, n_ecgs: int, per_ecg: int, seed: int) -> np.ndarray:
    """``(count, 2)`` rows of ``(pool ECG, sample k)``, drawn without replacement first.

    Round r (r = 0, 1, ...) takes sample ``k = r % per_ecg`` of every pool ECG in a fresh seeded
    order; rounds follow each other until ``count`` rows are taken. So each ECG is used once before
    any is used twice, every generated sample is used once before any is repeated, and only when
    ``count > n_ecgs * per_ecg`` do identical (ECG, k) rows repeat. A draw of count c is the first
    c rows of any larger draw with the same seed (the ratios nest).
    """
    if count > 0 and n_ecgs < 1:
        raise DownstreamDataError("the ECG-only pool is empty: no synthetic cine can be drawn")
    rows = []
    taken = 0
    rnd = 0
    while taken < count:
        order = np.random.default_rng([int(seed), 14, rnd]).permutation(n_ecgs)[:count - taken]
        rows.append(np.stack([order, np.full(len(order), rnd % per_ecg)], axis=1))
        taken += len(order)
        rnd += 1
    return np.concatenate(rows).astype(np.int64) if rows else np.zeros((0, 2), np.int64)


def undrawn_pool_rows(most: int, n_ecgs: int, seed: int) -> np.ndarray:
    """Sorted pool ECGs that no draw of at most ``most`` cines uses (for any samples per ECG:
    ``draw_pool`` picks its ECGs independently of ``per_ecg``, and smaller draws nest in larger)."""
    used = np.unique(draw_pool(most, n_ecgs, 1, seed)[:, 0])
    return np.setdiff1d(np.arange(n_ecgs), used)
