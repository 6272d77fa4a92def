"""Stage 3 training loop (``train_flow.py`` is a thin wrapper around ``train``).

Reads what stages 1 and 2 wrote (and refuses, naming the file and the stage, without it)::

    runs/<exp>/ecg/best.pt                      train_ecg.py
    runs/<exp>/vae/best.pt                      train_disentangle_vae3d.py
    runs/<exp>/latents/{train,val}.npy + {split}_index.csv, latents/template.pt
                                                train_disentangle_vae3d.py
    prepared dataset (ECGs)                     prepare_data.py

It never runs the VAE encoder: the flow trains on the cached latents. With a frozen encoder
(``flow.ecg_finetune=false``, the default) the ECG tokens of every train/val subject are computed
once and cached under ``runs/<exp>/flow/ecg_cache/<encoder hash>_<cycle mode>[_bf16]/`` (every rank
encodes its share under torchrun; bf16 autocast on CUDA, as stage 1 trained); with fine-tuning the
encoder runs on every batch and is trained at ``flow.ecg_lr``.

Writes ``flow/last.pt`` every epoch and when ``flow.max_steps`` stops the run (exact resume, also
inside an epoch: see ``train``), ``flow/best.pt`` on the
lowest deterministic validation loss of the EMA weights (fixed t grid, fixed noise seeds),
``flow/log.jsonl``, ``flow/previews/*.gif`` every ``flow.sample_every`` epochs, and
``flow/train_summary.json``. DDP-ready: ``torchrun --nproc_per_node N train_flow.py ...``.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..config import Config, ConfigError
from ..data.datasets import MemmapPickling
from ..ecg.morphology import MorphologyCode, MorphologyEncoder, fit_latent_code, latent_targets, training_features
from ..utils import dist as udist
from ..utils.checkpoint import load_checkpoint, state_hash
from ..utils.device import autocast
from ..utils.seed import seed_everything
from ..utils.stage import StageRun, run_stage
from ..utils.train import EMA, cosine_schedule, optimizer_step
from ..utils.trainer import LoopSettings, Stage, Trainer
from . import generator as gen
from .anchor import AnchorHead, ECGAnchor, RidgeAnchor
from .dit import build_dit
from .generator import ECGToCine, FlowModel, encoder_state_from, module_hash, sample_seed
from .transport import (
    LatentNorm,
    TemplateAnchor,
    cfg_drop_mask,
    flow_matching_loss,
    motion_weighted_mse,
    sample_t,
    seeded_noise,
    template_hash,
    validation_t_grid,
)

VAL_T_POINTS = 8
RESUME_ALSO = ("ecg.cycle_mode", "seed")      # other keys that make last.pt another run (the ECG tokens)
PREVIEW_SUBJECTS = 2
LATENT_SPLITS = ("train", "val")


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------


class StagePaths:
    """Where stage 3 reads from, with the "refuse without it" checks."""

    def __init__(self, cfg: Config):
        run = cfg.run_path
        self.ecg_ckpt = run / "ecg" / "best.pt"
        self.vae_ckpt = run / "vae" / "best.pt"
        self.latents = run / "latents"
        self.template = self.latents / "template.pt"
        self.data_root = cfg.data_root

    def requirements(self) -> tuple[tuple[Path, str], ...]:
        """(file, what writes it) for every input of stage 3."""
        extraction = "train_disentangle_vae3d.py (stage 2, latent extraction)"
        return ((self.ecg_ckpt, "train_ecg.py (stage 1)"), (self.vae_ckpt, "train_disentangle_vae3d.py (stage 2)"),
                (self.template, extraction),
                *((self.latents / f"{split}{suffix}", extraction) for split in LATENT_SPLITS
                  for suffix in (".npy", "_index.csv")),
                (self.data_root / "meta.json", "prepare_data.py"))


class LatentSplit(MemmapPickling):
    """Cached latents of one split: ``z (N, C, T, h, w)`` memmap + prepared-dataset rows/ids."""

    _memmaps = ("z",)

    def __init__(self, latents_dir: Path, split: str):
        import pandas as pd

        self.split = split
        self.z = np.load(latents_dir / f"{split}.npy", mmap_mode="r")
        index = pd.read_csv(latents_dir / f"{split}_index.csv", dtype={"subject_id": str})
        for col in ("row", "index", "subject_id"):
            if col not in index.columns:
                raise ValueError(f"'{latents_dir / f'{split}_index.csv'}' has no '{col}' column")
        index = index.sort_values("row")
        if len(index) != self.z.shape[0] or not np.array_equal(index["row"].to_numpy(), np.arange(len(index))):
            raise ValueError(f"'{latents_dir / f'{split}_index.csv'}' does not list rows 0..{self.z.shape[0] - 1} "
                             f"of {split}.npy; re-run the latent extraction "
                             "(train_disentangle_vae3d.py --extract-only)")
        self.prepared_index = index["index"].to_numpy().astype(np.int64)
        self.subject_ids = index["subject_id"].astype(str).tolist()

    def __len__(self) -> int:
        return int(self.z.shape[0])

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        return tuple(int(s) for s in self.z.shape[1:])


class ConditionCache(MemmapPickling):
    """Frozen-encoder outputs for the rows of one split, computed once (memmap on disk)."""

    _memmaps = ("tokens",)

    def __init__(self, folder: Path):
        self.tokens = np.load(folder / "tokens.npy", mmap_mode="r")
        small = np.load(folder / "meta.npz")
        self.pooled, self.start, self.end, self.fallback = (small["pooled"], small["start"],
                                                            small["end"], small["fallback"])

    @staticmethod
    @torch.no_grad()
    def build(folder: Path, encoder, ecg_array, prepared_index: np.ndarray, device: torch.device,
              batch_size: int = 32, desc: str = "", amp: bool = False) -> None:
        """Run ``encoder`` over ``ecg_array[prepared_index]`` and write ``folder``. Under torchrun every
        rank calls it and encodes its share of the rows into shared memmaps; rank 0 closes the cache.
        ``amp``: bf16 autocast on CUDA, as stage 1 trained the encoder."""
        from numpy.lib.format import open_memmap
        from tqdm import tqdm

        n = len(prepared_index)
        dim, count = int(encoder.dim), int(getattr(encoder, "num_tokens", 50))
        pooled_dim = int(getattr(encoder, "pooled_dim", dim))
        parts = {"tokens": ((n, count, dim), np.float32), "pooled": ((n, pooled_dim), np.float32),
                 "start": ((n,), np.int64), "end": ((n,), np.int64), "fallback": ((n,), np.bool_)}
        if udist.is_main():
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "complete").unlink(missing_ok=True)
            for name, (shape, dtype) in parts.items():
                open_memmap(folder / f"{name}.tmp.npy", mode="w+", dtype=dtype, shape=shape).flush()
        udist.barrier()
        arrays = {name: open_memmap(folder / f"{name}.tmp.npy", mode="r+") for name in parts}
        mine = np.array_split(np.arange(n), udist.world_size())[udist.rank()]
        for lo in tqdm(range(0, len(mine), batch_size), desc=f"ECG tokens {desc}", leave=False,
                       disable=not udist.is_main()):
            rows = mine[lo:lo + batch_size]
            ecg = torch.from_numpy(np.stack([np.asarray(ecg_array[i], dtype=np.float32)
                                             for i in prepared_index[rows]]))
            with autocast(device, amp):
                out = encoder(ecg.to(device))
            for name in parts:
                value = getattr(out, name).detach()
                value = value.float() if value.is_floating_point() else value     # numpy has no bf16
                arrays[name][rows[0]:rows[-1] + 1] = value.cpu().numpy()
        for array in arrays.values():
            array.flush()
        del arrays
        udist.barrier()
        if udist.is_main():
            small = {name: np.load(folder / f"{name}.tmp.npy") for name in parts if name != "tokens"}
            np.savez(folder / "meta.npz", **small)
            for name in small:
                (folder / f"{name}.tmp.npy").unlink()
            (folder / "tokens.tmp.npy").replace(folder / "tokens.npy")
            (folder / "complete").write_text(json.dumps({"n": n}))
        udist.barrier()

    @staticmethod
    def valid(folder: Path, n: int) -> bool:
        marker = folder / "complete"
        return marker.is_file() and json.loads(marker.read_text()).get("n") == n


class FlowDataset(MemmapPickling, Dataset):
    """Items: ``{"row", "z1" (C, T, h, w) normalised, and "tokens" + "pooled" (cached, frozen
    encoder) or "ecg" (12, 5000) (fine-tuned encoder)}``."""

    _memmaps = ("ecg_array",)

    def __init__(self, split: LatentSplit, norm: LatentNorm, cache: ConditionCache | None = None,
                 ecg_array=None):
        self.split, self.cache, self.ecg_array = split, cache, ecg_array
        self.mean = norm.mean.view(-1, 1, 1, 1).numpy()
        self.std = norm.std.view(-1, 1, 1, 1).numpy()

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> dict:
        z = (np.asarray(self.split.z[i], dtype=np.float32) - self.mean) / self.std
        item = {"row": i, "z1": torch.from_numpy(z.astype(np.float32))}
        if self.cache is not None:
            item["tokens"] = torch.from_numpy(np.array(self.cache.tokens[i], dtype=np.float32))
            item["pooled"] = torch.from_numpy(np.array(self.cache.pooled[i], dtype=np.float32))
        else:
            idx = int(self.split.prepared_index[i])
            item["ecg"] = torch.from_numpy(np.array(self.ecg_array[idx], dtype=np.float32))
        return item


def _condition(batch: dict, device: torch.device) -> dict:
    if "tokens" in batch:
        return {"ecg_tokens": batch["tokens"].to(device, non_blocking=True),
                "ecg_pooled": batch["pooled"].to(device, non_blocking=True)}
    return {"ecg": batch["ecg"].to(device, non_blocking=True)}


def _stack(items: list[dict]) -> dict:
    """Dataset items -> a batch (what the DataLoader's default collate gives, without a loader)."""
    return {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in items[0]}


def noisy_code(pooled: torch.Tensor, k: int, sd: float, generator: torch.Generator) -> torch.Tensor:
    """``pooled (B, E + k)`` with N(0, sd^2) added to its last ``k`` columns (the whitened morphology code)."""
    noise = torch.randn((pooled.shape[0], k), generator=generator, device=pooled.device, dtype=pooled.dtype)
    return torch.cat([pooled[:, :-k], pooled[:, -k:] + sd * noise], dim=1)


@torch.no_grad()
def _anchor_mean(head: ECGAnchor | None, cond: dict) -> torch.Tensor | None:
    """The ECG anchor of a batch ``(B, C, T, h, w)`` (None: the template anchor)."""
    return None if head is None else head(cond["ecg_tokens"], cond["ecg_pooled"])


def fit_anchor_head(head: AnchorHead, train: FlowDataset, val: FlowDataset, steps: int, lr: float,
                    batch_size: int, motion_weight: float, seed: int, device: torch.device, log=None) -> dict:
    """Fit the ECG anchor head by (motion-weighted) MSE to the data latents, then freeze it.

    At most ``steps`` steps, keeping the weights of the lowest validation MSE (checked 20 times):
    a few hundred subjects overfit it within a thousand steps. Every rank fits on the same full
    (unsharded) order from ``seed``; rank 0's weights are then broadcast, so all ranks start the
    flow from the same anchor. Returns val MSE of the template anchor (the untrained head) and of
    the kept head (what the ECG explains of the latents), and the step it was kept at."""
    from torch.utils.data import DataLoader, RandomSampler

    def val_mse() -> float:
        if len(val) == 0:
            return float("nan")
        total = 0.0
        with torch.no_grad():
            for lo in range(0, len(val), 32):
                batch = _stack([val[i] for i in range(lo, min(len(val), lo + 32))])
                pred = head(batch["tokens"].to(device), batch["pooled"].to(device))
                total += float(motion_weighted_mse(pred, batch["z1"].to(device)).sum())
        return total / len(val)

    before = val_mse()
    best, best_step, best_state = before, 0, copy.deepcopy(head.state_dict())
    check_every = max(1, steps // 20)
    head.train()
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    scheduler = cosine_schedule(optimizer, min(20, steps // 10), max(1, steps))
    loader = DataLoader(train, batch_size=batch_size, drop_last=len(train) >= batch_size,
                        sampler=RandomSampler(train, generator=torch.Generator().manual_seed(seed)))
    step = 0
    while step < steps:
        for batch in loader:
            pred = head(batch["tokens"].to(device), batch["pooled"].to(device))
            loss = motion_weighted_mse(pred, batch["z1"].to(device), motion_weight).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            if step % check_every == 0 or step == steps:
                head.eval()
                current = val_mse()
                head.train()
                if not current >= best:                     # nan (no val split): keep the last weights
                    best, best_step, best_state = current, step, copy.deepcopy(head.state_dict())
            if step >= steps:
                break
    head.load_state_dict(best_state)
    head.eval()
    head.requires_grad_(False)
    udist.broadcast_module(head)
    result = {"anchor_steps": steps, "anchor_best_step": best_step, "anchor_val_mse_template": before,
              "anchor_val_mse": val_mse()}
    if log is not None:
        log.info("ECG anchor head: kept step %d of %d; val MSE %.5f (template anchor %.5f)", best_step, steps,
                 result["anchor_val_mse"], before)
    return result


RIDGE_LAMBDAS = (1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4)   # per-row L2 strengths the ridge anchor picks from


def fit_ridge_anchor(head: RidgeAnchor, train: FlowDataset, val: FlowDataset, motion_weight: float,
                     log=None) -> dict:
    """Fit the ridge anchor on every training row at once (the L2 strength of each latent value by
    leave-one-out); the validation split only scores it. ``anchor_val_mse`` is the plain MSE, as
    ``fit_anchor_head`` reports it; ``anchor_val`` and ``anchor_val_mean_video`` the motion-weighted one
    (the flow's own weighting) of the fit and of the training split's mean latent video."""
    def rows(ds: FlowDataset) -> tuple[torch.Tensor, torch.Tensor]:
        if len(ds) == 0:
            return torch.zeros(0, 0), torch.zeros(0)
        batch = _stack([ds[i] for i in range(len(ds))])
        return batch["pooled"], batch["z1"]

    (x, y), (xv, yv) = rows(train), rows(val)
    if len(xv) == 0:        # no val split: score on the training rows (said in the log)
        xv, yv = x, y
    fit = head.fit(x, y, xv, yv, RIDGE_LAMBDAS, lambda p, t: motion_weighted_mse(p, t, motion_weight))
    udist.broadcast_module(head)
    head.eval().requires_grad_(False)
    plain = float(motion_weighted_mse(head(None, xv.to(head.weight.device)).cpu(), yv).mean())
    result = {"anchor_fit": "ridge", **fit, "anchor_val_mse": plain}
    if log is not None:
        log.info("ridge anchor: L2 strengths (latent values per strength) %s; %s MSE %.5f, motion-weighted %.5f "
                 "(mean video %.5f)", fit["anchor_lambda_counts"], "val" if len(val) else "train", plain,
                 fit["anchor_val"], fit["anchor_val_mean_video"])
    return result


def balance_weights(values, power: float, column: str = "values") -> tuple[np.ndarray, dict]:
    """Sampling weights ``(N,)`` that draw rare categories more often: count(value) ** -power, mean 1
    (missing values are a category of their own). Returns them and, per value, its subject count and
    its expected share of the draws. Refuses a column that is not categorical (fewer than 5 subjects
    a value on average): weights from a continuous column would be one subject each."""
    import pandas as pd

    series = pd.Series(values, dtype=object)
    labels = series.where(series.notna(), "(missing)").astype(str).to_numpy()
    uniq, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    if len(labels) == 0 or len(uniq) > max(2, len(labels) // 5):
        raise ConfigError(f"flow.balance_by: '{column}' has {len(uniq)} distinct values among {len(labels)} "
                          "training subjects; balancing needs a categorical column (a diagnosis, a phenotype "
                          "class): bin a continuous one first")
    weights = counts[inverse].astype(np.float64) ** -float(power)
    weights /= weights.mean()
    shares = {str(u): {"subjects": int(c), "share": float(weights[inverse == i].sum() / weights.sum())}
              for i, (u, c) in enumerate(zip(uniq, counts))}
    return weights, shares


def training_weights(cfg: Config, inputs: FlowInputs, log=None) -> tuple[np.ndarray | None, dict]:
    """``flow.balance_by``'s sampling weights of the train split's rows (None: each row once an epoch)."""
    fl = cfg.flow
    if not fl.balance_by:
        return None, {}
    subjects = inputs.prepared.subjects
    if fl.balance_by not in subjects.columns:
        raise ConfigError(f"flow.balance_by: the prepared dataset's subjects.csv has no column '{fl.balance_by}' "
                          f"(it has: {', '.join(map(str, subjects.columns))})")
    rows = inputs.splits["train"].prepared_index
    weights, shares = balance_weights(subjects[fl.balance_by].to_numpy()[rows], fl.balance_power, fl.balance_by)
    if log is not None:
        log.info("balanced by '%s' (power %g): %s", fl.balance_by, fl.balance_power,
                 ", ".join(f"{k} {v['subjects']} subjects -> {100 * v['share']:.1f} % of draws"
                           for k, v in shares.items()))
    return weights, shares


def param_groups(model: FlowModel, lr: float, ecg_lr: float, weight_decay: float) -> list[dict]:
    """AdamW groups: decay only on matrices; the encoder (when trained) at its own lr."""
    groups = []
    for name_prefix, group_lr in (("dit.", lr), ("encoder.", ecg_lr)):
        params = [(n, p) for n, p in model.named_parameters() if n.startswith(name_prefix) and p.requires_grad]
        decay = [p for n, p in params if p.ndim >= 2 and "null_" not in n]
        no_decay = [p for n, p in params if not (p.ndim >= 2 and "null_" not in n)]
        for ps, wd in ((decay, weight_decay), (no_decay, 0.0)):
            if ps:
                groups.append({"params": ps, "lr": group_lr, "weight_decay": wd})
    return groups


# ----------------------------------------------------------------------------------------------
# Validation and previews
# ----------------------------------------------------------------------------------------------


def validation_rows(n: int, subjects: int = 0) -> list[int]:
    """``subjects`` rows of ``n`` spread evenly over the split (all rows when 0 or >= n)."""
    if subjects <= 0 or subjects >= n:
        return list(range(n))
    return sorted({int(r) for r in np.linspace(0, n - 1, subjects).round()})


@torch.no_grad()
def validation_loss(model, dataset: FlowDataset, anchor: TemplateAnchor, device: torch.device,
                    batch_size: int, seed: int, amp: bool = True, unconditional: bool = False,
                    anchor_head: ECGAnchor | None = None, subjects: int = 0) -> float:
    """Deterministic flow-matching loss: rows sharded over ranks, ``VAL_T_POINTS`` fixed times,
    and noise from per-row seeds. Same weights -> same number, whatever the batch or world size.
    ``subjects > 0``: only ``validation_rows`` of that many (the same rows at every validation).
    ``unconditional``: with the null condition for every row (the CFG branch). Its excess over the
    conditional loss is how much the model uses the ECG (0 = it ignores it)."""
    if len(dataset) == 0:
        return float("nan")
    grid = validation_t_grid(VAL_T_POINTS)
    rows = validation_rows(len(dataset), subjects)[udist.rank()::udist.world_size()]
    total, count = 0.0, 0
    for lo in range(0, len(rows), batch_size):
        items = [dataset[r] for r in rows[lo:lo + batch_size]]
        batch = _stack(items)
        z1 = batch["z1"].to(device)
        cond = _condition(batch, device)
        anchor_mean = _anchor_mean(anchor_head, cond)
        if unconditional:
            cond["drop"] = torch.ones(z1.shape[0], dtype=torch.bool, device=device)
        for j, t_val in enumerate(grid):
            noise = torch.stack([seeded_noise(tuple(z1.shape[1:]), sample_seed(seed, f"val{r}", j))
                                 for r in batch["row"].tolist()]).to(device)
            t = torch.full((z1.shape[0],), float(t_val), device=device)
            with autocast(device, amp):
                losses = flow_matching_loss(model, z1, anchor, t, noise, reduce=False, anchor_mean=anchor_mean,
                                            **cond)
            total += float(losses.float().sum())
            count += z1.shape[0]
    tensor = torch.tensor([total, count], dtype=torch.float64, device=device)
    if udist.is_distributed():
        torch.distributed.all_reduce(tensor)
    return float(tensor[0] / tensor[1].clamp_min(1))


def write_previews(pipeline: ECGToCine, prepared, split: LatentSplit, out_dir: Path, tag: str,
                   seed: int, sampler: str, steps: int, guidance: float, n: int = PREVIEW_SUBJECTS) -> list[str]:
    """Generate ``n`` validation subjects from their ECG alone and save GIFs (rank 0)."""
    from ..utils.previews import save_preview

    written = []
    rows = list(range(min(n, len(split))))
    if not rows:
        return written
    ecg = torch.from_numpy(np.stack([np.asarray(prepared.ecg[int(split.prepared_index[r])], dtype=np.float32)
                                     for r in rows]))
    ids = [split.subject_ids[r] for r in rows]
    result = pipeline.generate(ecg, [sample_seed(seed, s, 0) for s in ids], sampler, steps, guidance)
    for i, sid in enumerate(ids):
        path = out_dir / f"{tag}_{sid}.gif"
        save_preview(path, result.cine[i].numpy(), ecg[i].numpy(), int(result.start[i]), int(result.end[i]),
                     title=f"{sid} {tag}", fallback=bool(result.fallback[i]))
        written.append(str(path))
    return written


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


@dataclass
class FlowInputs:
    """What stages 1 and 2 (and the prepared dataset) give stage 3, loaded and checked."""

    template: dict
    template_hash: str
    vae: torch.nn.Module
    vae_spec: dict
    norm: LatentNorm
    anchor: TemplateAnchor
    splits: dict
    prepared: object
    encoder: torch.nn.Module
    ecg_spec: dict
    frozen_state: dict
    datasets: dict
    morphology: MorphologyCode | None = None
    train_codes: np.ndarray | None = None     # (N_train, k) out-of-fold codes replacing the cached ones

    @property
    def condition_encoder(self) -> torch.nn.Module:
        """What conditions the flow: the stage-1 encoder, with the morphology code when there is one."""
        return self.encoder if self.morphology is None else MorphologyEncoder(self.encoder, self.morphology)

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        return self.splits["train"].latent_shape

    @property
    def ecg_dim(self) -> int:
        return int(getattr(self.encoder, "dim", 0) or 0)

    @property
    def pooled_dim(self) -> int:
        return self.ecg_dim + (0 if self.morphology is None else self.morphology.dims)


def load_inputs(cfg: Config, paths: StagePaths, device: torch.device, out: Path, log) -> FlowInputs:
    """Template, VAE and latents of stage 2, the stage-1 encoder, and the datasets it conditions."""
    from ..data.datasets import Prepared

    fl = cfg.flow
    template = load_checkpoint(paths.template, stage_hint="train_disentangle_vae3d.py")
    template = {k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in template.items()}
    vae, vae_spec = gen.load_stage2_vae(paths.vae_ckpt, device)
    vae.eval()
    if template.get("vae_hash") and template["vae_hash"] != vae_spec["hash"]:
        raise RuntimeError(f"'{paths.template}' was made by VAE {template['vae_hash']} but '{paths.vae_ckpt}' "
                           f"is VAE {vae_spec['hash']}: the cached latents are stale. Re-run "
                           "train_disentangle_vae3d.py --extract-only with this config.")
    norm = LatentNorm.from_template(template)
    anchor = TemplateAnchor(norm.normalize(template["template"][None])[0], fl.alpha, fl.use_template,
                            residual_input=fl.anchor == "ecg" and fl.anchor_residual)
    splits = {s: LatentSplit(paths.latents, s) for s in LATENT_SPLITS}
    latent_shape = splits["train"].latent_shape
    if len(splits["train"]) == 0:
        raise RuntimeError(f"'{paths.latents / 'train.npy'}' has no rows: nothing to train on")
    if tuple(template["template"].shape[:1]) + tuple(template["template"].shape[2:]) != \
            (latent_shape[0],) + latent_shape[2:]:
        raise RuntimeError(f"template shape {tuple(template['template'].shape)} does not match latents "
                           f"{latent_shape}; re-run the latent extraction")
    prepared = Prepared(paths.data_root)
    encoder, ecg_spec = gen.load_stage1_encoder(paths.ecg_ckpt, device, cfg.ecg.cycle_mode)
    encoder.eval()
    frozen_state = {k: v.detach().cpu().clone() for k, v in encoder.state_dict().items()}
    morphology, train_codes = None, None
    if fl.morphology_dims:
        rows = splits["train"].prepared_index
        feats = training_features(encoder, prepared.ecg, rows, device, batch_size=max(fl.batch_size, 16))
        if fl.morphology_code != "pca":
            latents = norm.normalize(torch.from_numpy(np.array(splits["train"].z, dtype=np.float32)))
            morphology, train_codes, fit = fit_latent_code(feats, latent_targets(latents, fl.morphology_code),
                                                           fl.morphology_dims, seed=cfg.seed)
            log.info("latent code: the median beats predict %.2f %% of the latents' first principal components "
                     "out of fold (L2 strengths %s), out-of-fold code SD %s",
                     100 * (1 - fit["oof_error"] / fit["total_error"]), fit["lambda_counts"],
                     " ".join(f"{v:.2f}" for v in fit["oof_code_sd"]))
        else:
            morphology = MorphologyCode.fit(feats, fl.morphology_dims)
        log.info("morphology code (%s): %d numbers from the median beats of %d training ECGs (hash %s)",
                 fl.morphology_code, fl.morphology_dims, len(rows), state_hash(morphology.state_dict()))
    inputs = FlowInputs(template, template_hash(template), vae, vae_spec, norm, anchor, splits, prepared,
                        encoder, ecg_spec, frozen_state, {}, morphology, train_codes)
    inputs.datasets = condition_datasets(cfg, inputs, device, out, log)
    if not inputs.ecg_dim:
        raise RuntimeError("the stage-1 encoder does not report its token width (encoder.dim)")
    return inputs


def condition_datasets(cfg: Config, inputs: FlowInputs, device: torch.device, out: Path, log) -> dict:
    """Train/val ``FlowDataset``s: raw ECGs for a fine-tuned encoder, else its cached tokens (built
    once per encoder and cycle mode, every rank encoding its share)."""
    fl, splits, encoder = cfg.flow, inputs.splits, inputs.condition_encoder
    encoder.requires_grad_(fl.ecg_finetune)
    if fl.ecg_finetune:
        return {s: FlowDataset(splits[s], inputs.norm, ecg_array=inputs.prepared.ecg) for s in LATENT_SPLITS}
    datasets = {}
    bf16 = "_bf16" if cfg.ecg.amp and device.type == "cuda" else ""        # tokens differ from fp32 ones
    spec = inputs.ecg_spec
    morph = "" if inputs.morphology is None else f"_morph{state_hash(inputs.morphology.state_dict())}"
    for s in LATENT_SPLITS:
        folder = out / "ecg_cache" / f"{spec['hash']}_{spec['config'].get('cycle_mode', '')}{bf16}{morph}" / s
        if not udist.all_gather_object(ConditionCache.valid(folder, len(splits[s])))[0]:  # rank 0 decides
            log.info("caching frozen-encoder ECG tokens of %d %s subjects -> %s", len(splits[s]), s, folder)
            ConditionCache.build(folder, encoder, inputs.prepared.ecg, splits[s].prepared_index, device,
                                 batch_size=max(fl.batch_size, 16), desc=s, amp=cfg.ecg.amp)
        cache = ConditionCache(folder)
        if s == "train" and inputs.train_codes is not None:   # the cache keeps the full fit's codes
            cache.pooled = np.concatenate([cache.pooled[:, :inputs.ecg_dim], inputs.train_codes], 1).astype(np.float32)
        datasets[s] = FlowDataset(splits[s], inputs.norm, cache=cache)
    return datasets


def anchor_head_for(cfg: Config, inputs: FlowInputs, ckpt: dict | None, device: torch.device,
                    log) -> tuple[ECGAnchor | None, dict, bool]:
    """The frozen ECG anchor head (``flow.anchor=ecg``; None for the template anchor): from the
    checkpoint a run resumes, or fitted now. Returns (head, its fit summary, fitted now)."""
    fl = cfg.flow
    if fl.anchor != "ecg":
        return None, {}, False
    if fl.anchor_fit == "ridge":
        head = RidgeAnchor(inputs.latent_shape, inputs.pooled_dim).to(device)
    else:
        head = AnchorHead(inputs.anchor.template, inputs.ecg_dim, inputs.latent_shape[1], fl.anchor_hidden,
                          pooled_dim=inputs.pooled_dim).to(device)
    saved = ckpt.get("anchor_head") if ckpt is not None else None
    if saved:
        head.load_state_dict(saved["state_dict"])
        head.eval().requires_grad_(False)
        return head, dict(saved.get("fit", {})), False
    if fl.anchor_fit == "ridge":
        return head, fit_ridge_anchor(head, inputs.datasets["train"], inputs.datasets["val"], fl.motion_weight,
                                      log), True
    fit = fit_anchor_head(head, inputs.datasets["train"], inputs.datasets["val"], fl.anchor_steps, fl.anchor_lr,
                          max(fl.batch_size, 16), fl.motion_weight, cfg.seed, device, log)
    return head, fit, True


class FlowStage(Stage):
    """The DiT (and a fine-tuned encoder) trained by flow matching; EMA weights validate and sample.

    t, noise and CFG drops come from the stage's own per-rank generator on the training device
    (saved in checkpoints): the DataLoader draws from the global RNG whenever an epoch's iterator
    starts, which would make a run resumed inside an epoch draw different noise."""

    name, rng_key, best_key, epoch_means = "flow", "flow_rng", "best_val", ("loss",)

    def __init__(self, cfg: Config, inputs: FlowInputs, anchor_head: ECGAnchor | None, anchor_fit: dict,
                 device: torch.device, steps_per_epoch: int, out: Path):
        fl = self.fl = cfg.flow
        self.cfg, self.inputs, self.device, self.out = cfg, inputs, device, out
        self.anchor_head, self.anchor_fit = anchor_head, anchor_fit
        self.amp = fl.amp                         # autocast() is bf16 on CUDA only
        self.dit = build_dit(fl, inputs.latent_shape, ecg_dim=inputs.ecg_dim, ecg_tokens=cfg.ecg.num_tokens,
                             pooled_dim=inputs.pooled_dim if fl.morphology_in == "both" else inputs.ecg_dim)
        self.model = FlowModel(self.dit, inputs.encoder if fl.ecg_finetune else None).to(device)
        self.ema = EMA(self.model, fl.ema_decay)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, fl.lr, fl.ecg_lr, fl.weight_decay), lr=fl.lr)
        # the schedule spans flow.epochs; flow.max_steps only stops early (smoke runs, interrupted runs)
        self.scheduler = cosine_schedule(self.optimizer, fl.warmup_steps, fl.epochs * steps_per_epoch)
        self.ddp_model = udist.wrap_ddp(self.model, device, find_unused_parameters=fl.ecg_finetune)
        self.rng_seed = cfg.seed * 1000
        self.generator = torch.Generator(device).manual_seed(self.rng_seed + udist.rank())

    def train_mode(self) -> None:
        self.model.train()
        if self.model.encoder is not None:        # fine-tuned, but deterministic (no dropout / batch stats)
            self.model.encoder.eval()

    def train_step(self, batch: dict, step: int) -> dict:
        fl, device, rng = self.fl, self.device, self.generator
        z1 = batch["z1"].to(device, non_blocking=True)                  # (B, C, T, h, w)
        t = sample_t(z1.shape[0], fl.t_sampling, device=device, generator=rng)
        noise = torch.randn(z1.shape, generator=rng, device=device)
        drop = cfg_drop_mask(z1.shape[0], fl.cfg_drop, device=device, generator=rng)
        cond = _condition(batch, device)
        anchor_mean = _anchor_mean(self.anchor_head, cond)
        if fl.morphology_noise > 0:          # after the anchor: it reads the code clean, as in generation
            cond["ecg_pooled"] = noisy_code(cond["ecg_pooled"], fl.morphology_dims, fl.morphology_noise, rng)
        with autocast(device, self.amp):
            loss = flow_matching_loss(self.ddp_model, z1, self.inputs.anchor, t, noise, drop=drop,
                                      anchor_mean=anchor_mean, motion_weight=fl.motion_weight, **cond)
        grad_norm = optimizer_step(loss, self.optimizer, self.scheduler, self.model.parameters(), fl.grad_clip)
        return {"loss": loss.detach(), "grad_norm": grad_norm, "lr": self.scheduler.get_last_lr()[0]}

    def validate(self) -> dict[str, float]:
        """Deterministic validation loss of the EMA weights, conditional and with the null ECG."""
        fl, model = self.fl, self.ema.module.eval()
        kw = dict(anchor_head=self.anchor_head, subjects=fl.val_subjects)
        args = (self.inputs.datasets["val"], self.inputs.anchor, self.device, max(fl.batch_size, 8),
                self.cfg.seed, self.amp)
        return {"loss": validation_loss(model, *args, **kw),
                "loss_uncond": validation_loss(model, *args, unconditional=True, **kw)}

    def describe(self, record: dict) -> str:
        val, uncond = record.get("val_loss", math.nan), record.get("val_loss_uncond", math.nan)
        return (f"train {record['train_loss']:.5f} val {'-' if math.isnan(val) else f'{val:.5f}'}"
                + ("" if math.isnan(uncond) else f" (null ECG {uncond:.5f})"))

    def state(self) -> dict:
        return {"optimizer": self.optimizer, "scheduler": self.scheduler}

    def encoder_state(self) -> tuple[dict, str]:
        """The encoder's weights and hash as trained (EMA when fine-tuned, else the frozen stage-1 one)."""
        if self.fl.ecg_finetune:
            return encoder_state_from(self.ema.state_dict()), module_hash(self.ema.module.encoder)
        return self.inputs.frozen_state, self.inputs.ecg_spec["hash"]

    def extra(self) -> dict:
        return {"template_hash": self.inputs.template_hash, "vae_hash": self.inputs.vae_spec["hash"],
                "ecg_hash": self.encoder_state()[1], "ecg_source_hash": self.inputs.ecg_spec["hash"],
                "ecg_finetune": self.fl.ecg_finetune}

    def checkpoint(self, ckpt: dict, best: bool) -> dict:
        """Embeds what generation needs: DiT arch, encoder, VAE, template and the flow's settings."""
        fl, inputs = self.fl, self.inputs
        enc_state, enc_hash = self.encoder_state()
        ckpt.update({"dit_arch": dict(self.dit.arch),
                     "ecg_encoder": {"config": inputs.ecg_spec["config"], "state_dict": enc_state, "hash": enc_hash},
                     "vae": inputs.vae_spec, "template": inputs.template,
                     "flow": {"latent_norm": inputs.norm.to_dict(), "alpha": fl.alpha, "use_template": fl.use_template,
                              "latent_shape": list(inputs.latent_shape), "normalized": True,
                              "t_sampling": fl.t_sampling, "cfg_drop": fl.cfg_drop, "anchor": fl.anchor,
                              "residual_input": inputs.anchor.residual_input, "motion_weight": fl.motion_weight,
                              "morphology_dims": fl.morphology_dims, "morphology_in": fl.morphology_in,
                              "morphology_code": fl.morphology_code,
                              "morphology_noise": fl.morphology_noise, "balance_by": fl.balance_by,
                              "balance_power": fl.balance_power}})
        if inputs.morphology is not None:
            ckpt["morphology"] = {k: v.detach().cpu() for k, v in inputs.morphology.state_dict().items()}
        if self.anchor_head is not None:
            ckpt["anchor_head"] = {"arch": dict(self.anchor_head.arch), "fit": self.anchor_fit,
                                   "state_dict": {k: v.detach().cpu()
                                                  for k, v in self.anchor_head.state_dict().items()}}
        return ckpt

    def check_resumable(self, ckpt: dict, path: Path) -> None:
        """Stage-1/2 outputs that changed since ``ckpt`` make it another run."""
        extra = ckpt.get("extra", {})
        for key, now in (("template_hash", self.inputs.template_hash), ("vae_hash", self.inputs.vae_spec["hash"]),
                         ("ecg_source_hash", self.inputs.ecg_spec["hash"])):
            if extra.get(key) and extra[key] != now:
                raise RuntimeError(f"cannot resume '{path}': its {key} {extra[key]} differs from the current "
                                   f"stage-1/2 outputs ({now}). Start over with --fresh.")

    def on_epoch_end(self, record: dict, validated: bool, stopping: bool, finished: bool) -> None:
        fl, epoch = self.fl, record["epoch"]
        if fl.sample_every <= 0 or len(self.inputs.splits["val"]) == 0:
            return
        if epoch % fl.sample_every == 0 or epoch >= fl.epochs or not finished:
            self.preview(f"epoch{epoch:03d}" + ("" if finished else f"_step{record['step']}"))

    def preview(self, tag: str) -> None:
        inputs, infer = self.inputs, self.cfg.infer
        enc = self.ema.module.encoder if self.fl.ecg_finetune else inputs.condition_encoder
        pipe = ECGToCine(self.ema.module.dit, enc, inputs.vae, inputs.template, inputs.norm, self.fl.alpha,
                         self.fl.use_template, self.device, amp=self.fl.amp, anchor_head=self.anchor_head,
                         residual_input=inputs.anchor.residual_input)
        written = write_previews(pipe, inputs.prepared, inputs.splits["val"], self.out / "previews", tag,
                                 infer.seed, infer.sampler, infer.steps, infer.guidance)
        logging.getLogger("ecgflowcmr").info("previews: %s", ", ".join(written))


def _finished_run(run: StageRun) -> dict:
    """The summary of a run ``run.ckpt`` already completed."""
    ckpt, out = run.ckpt, run.out
    extra = ckpt.get("extra", {})
    return {"epochs": int(ckpt["epoch"]), "steps": int(ckpt["step"]), "best_val_loss": extra.get("best_val"),
            "history": extra.get("history", []), "seconds": 0.0, "best": str(out / "best.pt"),
            "last": str(out / "last.pt"), "skipped": True}


def train(cfg: Config, resume: bool = False, fresh: bool = False,
          stop_after_epochs: int | None = None) -> dict:
    """Train stage 3 from ``cfg``; returns a summary dict (also written to flow/train_summary.json).

    Resuming (the same rules as stage 1): ``resume=True`` continues from ``last.pt`` (which must
    exist) exactly, also inside an epoch; without flags an existing ``last.pt`` of the same
    configuration is resumed too (re-running ``make demo`` continues or skips finished work), one
    of a different configuration is an error unless ``fresh=True`` (start over). Stage-1/2 outputs
    that changed since (other template, VAE or encoder hash) are always an error.
    ``stop_after_epochs``: return after that many epochs of this call, as if the process had been
    killed there (tests of exact resume)."""
    if resume and fresh:  # checked again by checkpoint_to_resume; here before DDP starts
        raise ConfigError("--resume and --fresh contradict each other")
    return run_stage(cfg, "flow", "train_flow.py", resume, fresh, lambda run: _train(run, stop_after_epochs),
                     done=_finished_run, requires=StagePaths(cfg).requirements(), also=RESUME_ALSO)


def _train(run: StageRun, stop_after_epochs: int | None) -> dict:
    cfg, device, out, log, ckpt, fl = run.cfg, run.device, run.out, run.log, run.ckpt, run.cfg.flow
    last_path, paths = run.last_path, StagePaths(cfg)
    seed_everything(cfg.seed + udist.rank())
    inputs = load_inputs(cfg, paths, device, out, log)
    anchor_head, anchor_fit, fitted = anchor_head_for(cfg, inputs, ckpt, device, log)
    weights, balance = training_weights(cfg, inputs, log)
    loader = udist.make_loader(inputs.datasets["train"], fl.batch_size, train=True, seed=cfg.seed,
                               num_workers=fl.num_workers, weights=weights)
    stage = FlowStage(cfg, inputs, anchor_head, anchor_fit, device, len(loader), out)
    settings = LoopSettings(epochs=fl.epochs, max_steps=fl.max_steps, log_every=fl.log_every,
                            val_every=fl.val_every, snapshot_steps=tuple(fl.snapshot_steps), step_log="log.jsonl")
    trainer = Trainer(stage, loader, settings, out, cfg.to_dict(), cfg.seed, device, log)
    if ckpt is not None:
        stage.check_resumable(ckpt, last_path)
    trainer.restore(ckpt)
    if fitted:
        trainer.history_log.write(**anchor_fit)
    n_params = sum(p.numel() for p in stage.dit.parameters())
    log.info("flow DiT: %.2f M parameters, latents %s, %d train / %d val subjects, %d steps/epoch, encoder %s%s",
             n_params / 1e6, inputs.latent_shape, len(inputs.datasets["train"]), len(inputs.datasets["val"]),
             trainer.steps_per_epoch, "fine-tuned" if fl.ecg_finetune else "frozen (cached tokens)",
             "" if ckpt is None else f"; resumed from {last_path} at step {trainer.state.step}")
    del ckpt, run.ckpt                  # the optimizer state it holds is in the trainer now
    started = time.time()
    state = trainer.fit(stop_after_epochs)
    summary = {"epochs": state.epoch, "steps": state.step,
               "best_val_loss": state.best if state.best < math.inf else None,
               "first_train_loss": trainer.first_loss, "history": state.history, "seconds": time.time() - started,
               "dit_parameters": n_params, "encoder": "fine-tuned" if fl.ecg_finetune else "frozen",
               "best": str(trainer.best_path), "last": str(last_path), **({"balance": balance} if balance else {})}
    if udist.is_main():
        (out / "train_summary.json").write_text(json.dumps(summary, indent=1))
    return summary
