"""Stage-1 training loop (``train_ecg.py`` is the command line around ``train``).

Reads ``<data root>`` (``prepare_data.py``; with ``data.unpaired_ecg`` also its ECG-only records in
``<data root>/unpaired``, added to the training split), writes ``runs/<exp>/ecg/``: ``best.pt`` (lowest
validation loss), ``last.pt`` (every epoch, and when ``max_steps`` stops the run), ``config.yaml``,
``train.log``, ``log.jsonl`` (one line per validation) and ``figures/{reconstruction,phase}.png``.

Resuming: ``--resume`` continues from ``last.pt`` exactly (model, optimiser, scheduler, step, RNG,
and the position inside the epoch). Without flags, an existing ``last.pt`` of the same
configuration is resumed too (re-running ``make demo`` continues or skips finished work); one of a
different configuration is an error unless ``--fresh`` (start over) is given.
"""
from __future__ import annotations

import itertools
import math
import time

import numpy as np
import torch
from tqdm import tqdm

from ..config import Config, ConfigError
from ..utils.checkpoint import (atomic_save, checkpoint_to_resume, make_checkpoint,
                                restore_checkpoint, state_hash)
from ..utils.device import autocast, select_device
from ..utils.dist import (all_gather_object, barrier, cleanup, init_distributed, is_main, make_loader, rank,
                          set_loader_epoch, world_size, wrap_ddp)
from ..utils.run import JsonlLog, require_file, setup_logging, stage_dir
from ..utils.seed import seed_everything
from ..utils.train import build_optimizer, clip_grad, cosine_schedule
from .augment import augment_batch
from .dataset import ECGPhaseDataset
from .metrics import evaluate
from .pamae import PAMAE, pamae_losses, sincos_to_phase

# ecg keys that may change between a run and its resumption (they do not change the model or data)
RESUMABLE_KEYS = {"epochs", "max_steps", "log_every", "val_every", "num_workers", "cycle_mode"}
FIGURE_INTERVAL_S = 300     # figures at the end of the run and at most every 5 minutes before


def _val_batches(dataset: ECGPhaseDataset, batch_size: int):
    for lo in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(lo, min(lo + batch_size, len(dataset)))]
        yield (torch.stack([it["ecg"] for it in items]),
               [dataset.rpeaks(i) for i in range(lo, lo + len(items))],
               torch.stack([it["phase"] for it in items]))


def _check_resumable(ckpt: dict, cfg: Config, path) -> None:
    old = ckpt.get("config", {})
    new = cfg.to_dict()
    diffs = [f"ecg.{k}: {old.get('ecg', {}).get(k)!r} -> {v!r}" for k, v in new["ecg"].items()
             if k not in RESUMABLE_KEYS and old.get("ecg", {}).get(k) != v]
    for key in ("seed",):
        if old.get(key) != new[key]:
            diffs.append(f"{key}: {old.get(key)!r} -> {new[key]!r}")
    if old.get("data", {}).get("unpaired_ecg", "") != new["data"]["unpaired_ecg"]:
        diffs.append(f"data.unpaired_ecg: {old.get('data', {}).get('unpaired_ecg', '')!r} -> "
                     f"{new['data']['unpaired_ecg']!r}")
    if diffs:
        raise ConfigError(f"'{path}' was written with a different configuration ({'; '.join(diffs)}). "
                          f"Start over with train_ecg.py --fresh (or delete '{path.parent}'), or choose "
                          f"another run_dir=.")


def _figures(model: PAMAE, dataset: ECGPhaseDataset, out_dir, device, cycle_mode: str, epoch: int) -> None:
    from .cycles import select_cycles
    from .figures import plot_phase, plot_reconstruction
    from .metrics import VAL_MASK_SEED
    from .phase import phase_from_rpeaks

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


def train(cfg: Config, resume: bool = False, fresh: bool = False) -> dict:
    """Train the PA-MAE; returns the last validation metrics."""
    device = select_device(cfg.device)
    init_distributed(device)
    try:
        return _train(cfg, device, resume, fresh)
    finally:
        cleanup()


def _train(cfg: Config, device: torch.device, resume: bool, fresh: bool) -> dict:
    e = cfg.ecg
    require_file(cfg.data_root / "meta.json", "prepare_data.py (the prepared dataset)")
    last_path = cfg.stage_dir("ecg") / "last.pt"
    best_path = cfg.stage_dir("ecg") / "best.pt"
    ckpt = checkpoint_to_resume(last_path, resume, fresh, "train_ecg.py")
    if ckpt is not None:                 # before anything is written over the run's config
        _check_resumable(ckpt, cfg, last_path)
    out_dir = stage_dir(cfg, "ecg")
    log = setup_logging(out_dir / "train.log")
    history = JsonlLog(out_dir / "log.jsonl")
    if ckpt is not None:
        done_epochs = int(ckpt["epoch"])
        if done_epochs >= e.epochs or (e.max_steps and int(ckpt["step"]) >= e.max_steps):
            log.info("stage 1 already complete (%d epochs, %d steps in %s); nothing to do "
                     "(train_ecg.py --fresh starts over)", done_epochs, int(ckpt["step"]), last_path)
            return ckpt["extra"].get("val", {})
        log.info("resuming %s at epoch %d, step %d (train_ecg.py --fresh starts over)",
                 last_path, done_epochs, int(ckpt["step"]))

    seed_everything(cfg.seed)
    train_set, paired_train, val_set = training_sets(cfg)
    if len(train_set) > len(paired_train):
        log.info("stage 1 also trains on %d ECG-only records (%s)", len(train_set) - len(paired_train),
                 cfg.data.unpaired_ecg)
    model = PAMAE.from_config(e)
    if ckpt is None:
        model.encoder.normalizer.fit(paired_train.training_sample())
    model.to(device)
    ddp_model = wrap_ddp(model, device)
    optimizer = build_optimizer(model.parameters(), e.lr, e.weight_decay)
    loader = make_loader(train_set, e.batch_size, train=True, seed=cfg.seed, num_workers=e.num_workers)
    steps_per_epoch = len(loader)
    # the schedule spans ecg.epochs; ecg.max_steps only stops early (smoke runs, interrupted runs)
    scheduler = cosine_schedule(optimizer, e.warmup_steps, e.epochs * steps_per_epoch)
    # masks come from their own generator (saved in the checkpoint): the DataLoader draws from the
    # global RNG whenever an epoch starts, which would make a resumed run draw different masks
    mask_rng = torch.Generator().manual_seed(cfg.seed * 1009 + rank())

    step, epoch, epoch_step, best = 0, 0, 0, math.inf
    val_metrics: dict = {}
    if ckpt is not None:
        step, epoch = restore_checkpoint(ckpt, model, optimizer, scheduler)
        epoch_step = int(ckpt["extra"].get("epoch_step", 0))
        best = float(ckpt["extra"].get("best_val_loss", math.inf))
        val_metrics = ckpt["extra"].get("val", {})
        saved = ckpt["extra"]["mask_rng"]
        saved = saved if isinstance(saved, list) else [saved]          # one state per rank
        if len(saved) == world_size():
            mask_rng.set_state(saved[rank()])
        else:
            log.warning("last.pt has mask RNG states of %d processes, this run has %d: masks continue from a "
                        "fresh generator (not bit-exact)", len(saved), world_size())
            mask_rng.manual_seed(cfg.seed * 1009 + rank() + 7919 * step)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("stage 1 PA-MAE: %d train / %d val records, %.2fM parameters, %d steps/epoch, device %s",
             len(train_set), len(val_set), n_params / 1e6, steps_per_epoch, device)

    def save(path, extra_val):
        extra = {"best_val_loss": best, "epoch_step": epoch_step, "val": extra_val,
                 "steps_per_epoch": steps_per_epoch, "encoder_hash": state_hash(model.encoder.state_dict()),
                 "mask_rng": mask_states}
        atomic_save(make_checkpoint(model, optimizer, scheduler, step=step, epoch=epoch,
                                    config=cfg.to_dict(), extra=extra), path)

    started = time.time()
    last_figures = started
    while epoch < e.epochs and not (e.max_steps and step >= e.max_steps):
        set_loader_epoch(loader, epoch, cfg.seed)
        ddp_model.train()
        # on the device: reading a loss waits for the GPU, so only log steps do it
        sums = {key: torch.zeros((), dtype=torch.float64, device=device) for key in ("loss", "rec", "phase")}
        n = 0
        batches = itertools.islice(iter(loader), epoch_step, None)    # exact resume inside an epoch
        bar = tqdm(batches, total=steps_per_epoch, initial=epoch_step, disable=not is_main(),
                   desc=f"ecg epoch {epoch + 1}/{e.epochs}", leave=False, mininterval=2.0)
        for batch in bar:
            ecg, label, target = batch["ecg"], batch["phase"], None
            if e.augment:       # drawn from (seed, rank, step): a resumed run draws the same
                ecg, label, clean = augment_batch(ecg, batch["rpeaks"], np.random.default_rng([cfg.seed, rank(), step]),
                                                  fraction=e.augment_fraction)
                target = clean.to(device, non_blocking=True) if e.augment_denoise else None
            ecg = ecg.to(device, non_blocking=True)
            label = label.to(device, non_blocking=True)
            with autocast(device, e.amp):
                out = ddp_model(ecg, generator=mask_rng, target=target)
            losses = pamae_losses(out, label, e.phase_weight)
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            grad_norm = clip_grad(model.parameters(), e.grad_clip, sync=False)
            optimizer.step()
            scheduler.step()
            step += 1
            epoch_step += 1
            for key in sums:
                sums[key] += losses[key].detach().double()
            n += 1
            if step % e.log_every == 0:
                bar.set_postfix(rec=f"{losses['rec'].item():.4f}", phase=f"{losses['phase'].item():.4f}")
                log.info("step %d  loss %.4f  rec %.4f  phase %.4f  grad %.2f  lr %.2e", step,
                         float(losses["loss"]), float(losses["rec"]), float(losses["phase"]), float(grad_norm),
                         scheduler.get_last_lr()[0])
            if e.max_steps and step >= e.max_steps:
                break
        bar.close()
        finished_epoch = epoch_step >= steps_per_epoch
        if finished_epoch:
            epoch += 1
            epoch_step = 0
        stopping = epoch >= e.epochs or bool(e.max_steps and step >= e.max_steps)
        validate = (finished_epoch and epoch % e.val_every == 0) or stopping
        mask_states = all_gather_object(mask_rng.get_state())           # collective: every rank's masks resume
        if is_main():
            train_means = {f"train_{k}": float(v) / max(n, 1) for k, v in sums.items()}
            if validate:
                val_metrics = evaluate(model, _val_batches(val_set, e.batch_size), device, e.cycle_mode,
                                       phase_weight=e.phase_weight)
                improved = val_metrics["loss"] < best
                best = min(best, val_metrics["loss"])
                log.info("epoch %d (step %d, %.0f s): train rec %.4f phase %.4f | val loss %.4f rec %.4f "
                         "phase %.4f, phase error %.3f rad, R-peak sens %.3f ppv %.3f, start offset %.1f ms%s",
                         epoch, step, time.time() - started, train_means["train_rec"],
                         train_means["train_phase"], val_metrics["loss"], val_metrics["loss_rec"],
                         val_metrics["loss_phase"], val_metrics["phase_mae"], val_metrics["sensitivity"],
                         val_metrics["ppv"], val_metrics["start_offset_ms"], "  (best)" if improved else "")
                history.write(epoch=epoch, step=step, seconds=round(time.time() - started, 1),
                              **train_means, **{f"val_{k}": v for k, v in val_metrics.items()})
                if stopping or time.time() - last_figures > FIGURE_INTERVAL_S:
                    _figures(model, val_set, out_dir, device, e.cycle_mode, epoch)
                    last_figures = time.time()
                save(last_path, val_metrics)
                if improved:
                    save(best_path, val_metrics)
            else:
                save(last_path, val_metrics)
            model.train()
        barrier()
    log.info("stage 1 done: %s (best val loss %.4f)", best_path, best)
    return val_metrics
