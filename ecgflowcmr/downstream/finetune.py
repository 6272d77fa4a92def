"""k-fold fine-tuning (or a linear probe) on the labelled real subjects and the scores of each fold.

One model per fold fits every task together: cross-entropy over all classes plus
``regression_weight`` x MSE on the phenotypes standardised with the fold's training statistics
(one fit per fold, not per task, keeps the table's cost linear in its rows). It is scored on:

    all classes        ACC, macro one-vs-rest AUC over the fold's held-out subjects
    <disease>_vs_<normal>  the held-out members of that balanced cohort: ACC of the larger of the two
                       class probabilities, AUC of p(disease) / (p(disease) + p(normal))
    each phenotype     MAE (in the column's units), R^2

Every row uses the same folds, seeds, head initialisation and batch order: only the encoder's
starting weights differ (pretrained, or the same random ones for "scratch").
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import metrics as M
from .vit import Finetuner, VideoViT


@dataclass
class Labelled:
    """The labelled subjects, in memory at the fine-tuning resolution.

    cines ``(n, 1, frames, size, size)`` float32; classes ``(n,)`` str or None; phenotypes
    ``(n, r)``; fold ``(n,)``; cohorts: task -> positions.
    """

    cines: torch.Tensor
    classes: np.ndarray | None
    class_names: list[str]
    phenotypes: np.ndarray
    phenotype_names: list[str]
    fold: np.ndarray
    cohorts: dict


def finetune_row(row: str, encoder_path: Path | None, lab: Labelled, ds, out_path: Path,
                 device: torch.device, key: dict, log=print) -> dict:
    """Fine-tune (or linearly probe, ``ds.probe``) and score every fold of one row (folds already in
    ``out_path`` are kept)."""
    state = None
    if encoder_path is not None:
        state = torch.load(encoder_path, map_location="cpu", weights_only=True)["encoder"]
    record = json.loads(out_path.read_text()) if out_path.is_file() else {}
    if record.get("key") != key:
        record = {"key": key, "folds": {}}
    features = None
    for fold in range(ds.folds):
        if str(fold) in record["folds"]:
            continue
        if ds.probe == "linear":
            features = encode_features(state, lab, ds, device) if features is None else features
            record["folds"][str(fold)] = probe_fold(features, lab, ds, fold)
        else:
            record["folds"][str(fold)] = fit_fold(state, lab, ds, fold, device, desc=f"finetune {row} fold {fold}")
        tmp = out_path.with_name(out_path.name + ".tmp")
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, out_path)
    return record


def fit_fold(state: dict | None, lab: Labelled, ds, fold: int, device: torch.device, desc: str = "") -> dict:
    from tqdm import tqdm

    train = np.flatnonzero(lab.fold != fold)
    test = np.flatnonzero(lab.fold == fold)
    n_classes = len(lab.class_names)
    y_class = None
    if lab.classes is not None:
        y_class = torch.as_tensor([lab.class_names.index(c) for c in lab.classes])
    mean, std = phenotype_scale(lab, train)
    y_reg = torch.as_tensor((lab.phenotypes - mean) / std, dtype=torch.float32)

    torch.manual_seed(int(ds.seed) * 100 + fold)
    encoder = VideoViT.from_config(ds)
    if state is not None:
        encoder.load_state_dict(state)
    model = Finetuner(encoder, n_classes + lab.phenotypes.shape[1]).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=ds.finetune_lr, weight_decay=ds.weight_decay)
    batch = min(ds.finetune_batch, len(train))
    per_epoch = math.ceil(len(train) / batch)
    total = ds.finetune_epochs * per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / per_epoch) * 0.5 * (1 + math.cos(math.pi * s / total)))
    rng = np.random.default_rng([int(ds.seed), 31, fold])
    model.train()
    for _ in tqdm(range(ds.finetune_epochs), desc=desc, unit="epoch", leave=False):
        order = rng.permutation(train)
        for i in range(0, len(order), batch):
            rows = order[i:i + batch]
            out = model(lab.cines[rows].to(device))
            loss = torch.zeros((), device=device)
            if y_class is not None:
                loss = loss + F.cross_entropy(out[:, :n_classes], y_class[rows].to(device))
            if y_reg.shape[1]:
                loss = loss + ds.regression_weight * F.mse_loss(out[:, n_classes:], y_reg[rows].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        out = torch.cat([model(lab.cines[test[i:i + batch]].to(device)).float().cpu()
                         for i in range(0, len(test), batch)]).numpy()
    return score_fold(out, test, lab, mean, std)


def phenotype_scale(lab: Labelled, train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std ``(r,)`` of the phenotypes over a fold's training rows (targets are standardised)."""
    if not lab.phenotypes.shape[1]:
        return np.zeros(0), np.ones(0)
    return lab.phenotypes[train].mean(0), lab.phenotypes[train].std(0) + 1e-8


def encode_features(state: dict | None, lab: Labelled, ds, device: torch.device) -> torch.Tensor:
    """Mean-pooled tokens ``(n, width)`` (float64) of the frozen encoder over the labelled cines:
    the pretrained weights, or for ``scratch`` one random initialisation from ``ds.seed``."""
    torch.manual_seed(int(ds.seed) * 100)
    encoder = VideoViT.from_config(ds)
    if state is not None:
        encoder.load_state_dict(state)
    encoder.to(device).eval()
    with torch.no_grad():
        parts = [encoder(lab.cines[i:i + 16].to(device)).mean(dim=1).float().cpu()
                 for i in range(0, len(lab.cines), 16)]
    return torch.cat(parts).double()


def probe_fold(features: torch.Tensor, lab: Labelled, ds, fold: int) -> dict:
    """Linear probe of one fold on ``features`` ``(n, d)``: standardised with the fold's training
    statistics, then L2 logistic regression over the classes (full-batch L-BFGS) and closed-form
    ridge on the standardised phenotypes, both penalised by ``ds.probe_l2`` (biases unpenalised).
    Deterministic; scored like a fine-tuned fold."""
    train = np.flatnonzero(lab.fold != fold)
    test = np.flatnonzero(lab.fold == fold)
    x = features[train]
    z = (features - x.mean(0)) / (x.std(0, unbiased=False) + 1e-6)
    z_train, n, d = z[train], len(train), z.shape[1]
    outputs = []
    n_classes = len(lab.class_names)
    if lab.classes is not None:
        y = torch.as_tensor([lab.class_names.index(c) for c in lab.classes[train]])
        weight = torch.zeros(d, n_classes, dtype=torch.float64, requires_grad=True)
        bias = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=500, tolerance_grad=1e-9,
                                tolerance_change=1e-12, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(z_train @ weight + bias, y) + ds.probe_l2 * weight.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        outputs.append((z[test] @ weight + bias).detach())
    mean, std = phenotype_scale(lab, train)
    if lab.phenotypes.shape[1]:
        # min_W (1/n)|Y - Z W|^2 + l2 |W|^2 on training-centred Z and Y: no bias to fit
        y_reg = torch.as_tensor((lab.phenotypes[train] - mean) / std, dtype=torch.float64)
        gram = z_train.T @ z_train + n * ds.probe_l2 * torch.eye(d, dtype=torch.float64)
        outputs.append(z[test] @ torch.linalg.solve(gram, z_train.T @ y_reg))
    return score_fold(torch.cat(outputs, dim=1).numpy(), test, lab, mean, std)


def score_fold(out: np.ndarray, test: np.ndarray, lab: Labelled, mean: np.ndarray, std: np.ndarray) -> dict:
    """Scores of one fold from the model outputs ``(n_test, n_classes + r)`` on rows ``test``."""
    n_classes = len(lab.class_names)
    scores: dict = {"n_test": int(len(test))}
    if lab.classes is not None:
        logits = out[:, :n_classes]
        probs = np.exp(logits - logits.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
        true = lab.classes[test]
        pred = np.asarray(lab.class_names)[probs.argmax(1)]
        scores["all_classes"] = {"acc": M.accuracy(true, pred), "auc": M.macro_auc(true, probs, lab.class_names)}
        for task, members in lab.cohorts.items():
            disease, normal = task.split("_vs_")
            inside = np.isin(test, members)
            if not inside.any():
                continue
            d, n = lab.class_names.index(disease), lab.class_names.index(normal)
            p_d, p_n = probs[inside, d], probs[inside, n]
            truth = true[inside]
            guess = np.where(p_d > p_n, disease, normal)
            scores[task] = {"acc": M.accuracy(truth, guess), "auc": M.binary_auc(truth == disease, p_d / (p_d + p_n))}
    for j, name in enumerate(lab.phenotype_names):
        pred = out[:, n_classes + j] * std[j] + mean[j]
        true = lab.phenotypes[test, j]
        scores[name] = {"mae": M.mae(true, pred), "r2": M.r2(true, pred)}
    return scores


def summarise(record: dict) -> dict:
    """``{task: {metric: {"mean", "std", "n"}}}`` over the folds of a row."""
    folds = list(record["folds"].values())
    tasks: dict = {}
    for fold in folds:
        for task, values in fold.items():
            if isinstance(values, dict):
                for metric, value in values.items():
                    tasks.setdefault(task, {}).setdefault(metric, []).append(value)
    return {task: {metric: M.fold_summary(v) for metric, v in ms.items()} for task, ms in tasks.items()}


def paired_difference(record: dict, reference: dict) -> dict:
    """``{task: {metric: {"mean", "std", "n"}}}`` of ``record - reference`` fold by fold, over the
    folds both scored (the rows share folds, so this removes the fold-to-fold spread they share)."""
    tasks: dict = {}
    for fold, scores in record["folds"].items():
        other = reference["folds"].get(fold)
        if other is None:
            continue
        for task, values in scores.items():
            if isinstance(values, dict) and isinstance(other.get(task), dict):
                for metric, value in values.items():
                    if metric in other[task] and value is not None and other[task][metric] is not None:
                        tasks.setdefault(task, {}).setdefault(metric, []).append(value - other[task][metric])
    return {task: {metric: M.fold_summary(v) for metric, v in ms.items()} for task, ms in tasks.items()}
