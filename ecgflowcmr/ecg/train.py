"""Stage-1 training loop (``train_ecg.py`` is the command line around ``train``).

Reads ``<data root>`` (``prepare_data.py``; with ``data.unpaired_ecg`` also its ECG-only records in
``<data root>/unpaired``, added to the training split), writes ``runs/<exp>/ecg/``: ``best.pt`` (lowest
validation loss), ``last.pt`` (every epoch, and when ``max_steps`` stops the run), ``config.yaml``,
``train.log``, ``log.jsonl`` (one line per epoch, with the validation metrics where it validated) and
``figures/{reconstruction,phase}.png``.

Resuming: ``--resume`` continues from ``last.pt`` exactly (model, optimiser, scheduler, step, RNG,
and the position inside the epoch). Without flags, an existing ``last.pt`` of the same
configuration is resumed too (re-running ``make demo`` continues or skips finished work); one of a
different configuration is an error unless ``--fresh`` (start over) is given.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from ..config import Config
from ..utils.checkpoint import state_hash
from ..utils.device import autocast
from ..utils.dist import make_loader, rank, wrap_ddp
from ..utils.run import require_file
from ..utils.seed import seed_everything
from ..utils.stage import StageRun, run_stage
from ..utils.train import build_optimizer, cosine_schedule, optimizer_step
from ..utils.trainer import LoopSettings, Stage, Trainer
from .augment import augment_batch
from .dataset import ECGPhaseDataset
from .metrics import evaluate
from .pamae import PAMAE, pamae_losses, sincos_to_phase

FIGURE_INTERVAL_S = 300     # figures at the end of the run and at most every 5 minutes before


def _val_batches(dataset: ECGPhaseDataset, batch_size: int):
    for lo in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(lo, min(lo + batch_size, len(dataset)))]
        yield (torch.stack([it["ecg"] for it in items]),
               [dataset.rpeaks(i) for i in range(lo, lo + len(items))],
               torch.stack([it["phase"] for it in items]))


def _figures(model: PAMAE, dataset: ECGPhaseDataset, out_dir, device, cycle_mode: str, epoch: int) -> None:
    from ..data.phase import phase_from_rpeaks
    from .cycles import select_cycles
    from .figures import plot_phase, plot_reconstruction
    from .metrics import VAL_MASK_SEED

    item = dataset[0]
    ecg = item["ecg"][None].to(device)
    with torch.no_grad():
        out = model(ecg, generator=torch.Generator().manual_seed(VAL_MASK_SEED))
        phase = sincos_to_phase(out["sincos"], ecg.shape[-1])
        sel = select_cycles(phase, cycle_mode, 50)
    ref = dataset.rpeaks(0)
    subject = dataset.prepared.subject_ids([item["index"]])[0]
    plot_reconstruction(out_dir / "figures" / "reconstruction.png", out["target"][0].float().cpu().numpy(),
                        out["recon"][0].float().cpu().numpy(), out["mask"][0].cpu().numpy(),
                        title=f"PA-MAE reconstruction, val subject {subject}, epoch {epoch}")
    wraps = sel.wraps.as_lists()[0] if sel.wraps is not None else []
    plot_phase(out_dir / "figures" / "phase.png", item["ecg"][1].numpy(),
               phase_from_rpeaks(ref, ecg.shape[-1]), phase[0].cpu().numpy(), int(sel.start[0]),
               int(sel.end[0]), ref, wraps, bool(sel.fallback[0]),
               title=f"predicted vs true phase, val subject {subject}, epoch {epoch} ({cycle_mode} cycle)")


def training_sets(cfg: Config):
    """(training set, paired train split, val split). The training set is the paired train split,
    plus, with ``data.unpaired_ecg``, the prepared ECG-only records less any subject of the paired
    val/test splits (so no validation or test subject ever trains stage 1, whichever pool holds it)."""
    paired_train = ECGPhaseDataset(cfg.data_root, "train")
    val_set = ECGPhaseDataset(cfg.data_root, "val")
    if not cfg.data.unpaired_ecg:
        return paired_train, paired_train, val_set
    require_file(cfg.unpaired_root / "meta.json", "prepare_data.py (the ECG-only records of data.unpaired_ecg)")
    prepared = val_set.prepared
    held_out = set(prepared.subject_ids(prepared.split_indices("val"))) | \
        set(prepared.subject_ids(prepared.split_indices("test")))
    pool = ECGPhaseDataset(cfg.unpaired_root, "all", exclude_subjects=held_out)
    return torch.utils.data.ConcatDataset([paired_train, pool]), paired_train, val_set


class ECGStage(Stage):
    """The PA-MAE: masked reconstruction + phase regression on (augmented) ECG batches.

    Masks come from the stage's own per-rank generator (saved in checkpoints): the DataLoader draws
    from the global RNG whenever an epoch starts, which would make a resumed run draw other masks."""

    name, rng_key, best_key, epoch_means = "ecg", "mask_rng", "best_val_loss", ("loss", "rec", "phase")

    def __init__(self, cfg: Config, paired_train: ECGPhaseDataset, val_set: ECGPhaseDataset, device: torch.device,
                 steps_per_epoch: int, out_dir, fit_normalizer: bool):
        e = self.e = cfg.ecg
        self.cfg, self.val_set, self.device, self.out_dir = cfg, val_set, device, out_dir
        self.model = PAMAE.from_config(e)
        if fit_normalizer:
            self.model.encoder.normalizer.fit(paired_train.training_sample())
        self.model.to(device)
        self.ddp_model = wrap_ddp(self.model, device)
        self.optimizer = build_optimizer(self.model.parameters(), e.lr, e.weight_decay)
        # the schedule spans ecg.epochs; ecg.max_steps only stops early (smoke runs, interrupted runs)
        self.scheduler = cosine_schedule(self.optimizer, e.warmup_steps, e.epochs * steps_per_epoch)
        self.rng_seed = cfg.seed * 1009
        self.generator = torch.Generator().manual_seed(self.rng_seed + rank())
        self.last_figures = time.time()

    def train_step(self, batch: dict, step: int) -> dict:
        e, device = self.e, self.device
        ecg, label, target = batch["ecg"], batch["phase"], None          # (B, 12, 5000), (B, P, 2)
        if e.augment:       # drawn from (seed, rank, step): a resumed run draws the same
            ecg, label, clean = augment_batch(ecg, batch["rpeaks"],
                                              np.random.default_rng([self.cfg.seed, rank(), step]),
                                              fraction=e.augment_fraction)
            target = clean.to(device, non_blocking=True) if e.augment_denoise else None
        ecg = ecg.to(device, non_blocking=True)
        label = label.to(device, non_blocking=True)
        with autocast(device, e.amp):
            out = self.ddp_model(ecg, generator=self.generator, target=target)
        losses = pamae_losses(out, label, e.phase_weight)
        grad_norm = optimizer_step(losses["loss"], self.optimizer, self.scheduler, self.model.parameters(), e.grad_clip)
        return {**{k: losses[k].detach() for k in ("loss", "rec", "phase")}, "grad_norm": grad_norm,
                "lr": self.scheduler.get_last_lr()[0]}

    def validate(self) -> dict[str, float]:
        """Every rank evaluates the whole val split (deterministic masks): the same numbers everywhere."""
        e = self.e
        return evaluate(self.model, _val_batches(self.val_set, e.batch_size), self.device, e.cycle_mode,
                        phase_weight=e.phase_weight)

    def describe(self, record: dict) -> str:
        line = f"train rec {record['train_rec']:.4f} phase {record['train_phase']:.4f} ({record['seconds']:.0f} s)"
        if "val_loss" not in record:
            return line
        return (line + " | val loss {val_loss:.4f} rec {val_loss_rec:.4f} phase {val_loss_phase:.4f}, phase error "
                "{val_phase_mae:.3f} rad, R-peak sens {val_sensitivity:.3f} ppv {val_ppv:.3f}, start offset "
                "{val_start_offset_ms:.1f} ms").format(**record)

    def state(self) -> dict:
        return {"optimizer": self.optimizer, "scheduler": self.scheduler}

    def extra(self) -> dict:
        return {"encoder_hash": state_hash(self.model.encoder.state_dict())}

    def on_epoch_end(self, record: dict, validated: bool, stopping: bool, finished: bool) -> None:
        """Figures after a validation: at the end of the run and at most every FIGURE_INTERVAL_S before."""
        if validated and (stopping or time.time() - self.last_figures > FIGURE_INTERVAL_S):
            _figures(self.model, self.val_set, self.out_dir, self.device, self.e.cycle_mode, record["epoch"])
            self.last_figures = time.time()


def train(cfg: Config, resume: bool = False, fresh: bool = False) -> dict:
    """Train the PA-MAE; returns the last validation metrics."""
    return run_stage(cfg, "ecg", "train_ecg.py", resume, fresh, _train,
                     done=lambda run: run.ckpt["extra"].get("val", {}),
                     requires=((cfg.data_root / "meta.json", "prepare_data.py (the prepared dataset)"),),
                     also=("seed", "data.unpaired_ecg"))


def _train(run: StageRun) -> dict:
    cfg, device, out_dir, log, ckpt, e = run.cfg, run.device, run.out, run.log, run.ckpt, run.cfg.ecg
    seed_everything(cfg.seed)
    train_set, paired_train, val_set = training_sets(cfg)
    if len(train_set) > len(paired_train):
        log.info("stage 1 also trains on %d ECG-only records (%s)", len(train_set) - len(paired_train),
                 cfg.data.unpaired_ecg)
    loader = make_loader(train_set, e.batch_size, train=True, seed=cfg.seed, num_workers=e.num_workers)
    stage = ECGStage(cfg, paired_train, val_set, device, len(loader), out_dir, fit_normalizer=ckpt is None)
    settings = LoopSettings(epochs=e.epochs, max_steps=e.max_steps, log_every=e.log_every, val_every=e.val_every)
    trainer = Trainer(stage, loader, settings, out_dir, cfg.to_dict(), cfg.seed, device, log)
    trainer.restore(ckpt)
    log.info("stage 1 PA-MAE: %d train / %d val records, %.2fM parameters, %d steps/epoch, device %s",
             len(train_set), len(val_set), sum(p.numel() for p in stage.model.parameters()) / 1e6,
             trainer.steps_per_epoch, device)
    state = trainer.fit()
    log.info("stage 1 done: %s (best val loss %.4f)", trainer.best_path, state.best)
    return state.last_val
