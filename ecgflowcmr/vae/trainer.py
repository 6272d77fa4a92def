"""Stage-2 training loop (``train_disentangle_vae3d.py`` is the command line around ``train``).

Reads the prepared dataset, writes ``runs/<exp>/vae/``: ``best.pt`` (lowest validation L1 of the
posterior mode on the val split: deterministic), ``last.pt`` (every epoch and when ``max_steps``
stops the run; holds VAE, discriminator, both optimisers, schedulers and scalers, step, epoch,
position in the epoch, RNG), ``config.yaml``, ``train.log``, ``log.jsonl`` and
``figures/frames_epochNNN.png`` (real vs reconstructed frames) and ``figures/curve_epochNNN.png``
(pixel-intensity time curves). Then it caches the latents and the template (``latents.py``)
from ``best.pt``.

One optimisation step (``VAETrainer.train_step``):

* G step: ``loss = L1 + perceptual_weight * LPIPS + kl_weight * KL/pixels`` and, from
  ``disc_start`` on, ``+ d_weight * (-mean D(x_hat))`` with the adaptive ``d_weight`` (grad-norm
  ratio at ``decoder.conv_out``) times ``disc_weight``. Before ``disc_start`` the discriminator is
  not run at all and its terms are exactly 0. The discriminator's parameters are frozen during the
  G step (no gradient reaches them), and the G gradient is clipped over the VAE's parameters only.
* D step (from ``disc_start``): hinge loss on ``D(cat[x, x_hat.detach()])``, its own AdamW
  (betas 0.5, 0.9, ``disc_lr``) and cosine schedule over the steps after ``disc_start``, gradient
  clipped over the discriminator's parameters only.
* AMP: bf16 autocast on CUDA (``amp: true``), fp32 on CPU. bf16 has fp32's exponent range, so no
  loss scaling is needed: each optimiser has a ``torch.amp.GradScaler`` constructed *disabled*,
  and the step still goes ``scale -> backward -> unscale_ -> clip -> step -> update`` with it
  (pass-through), its (empty) state saved and restored. Switching to fp16 would only mean
  enabling both scalers; clipping already happens on unscaled gradients.
* Randomness of a step (posterior sample, clip position, LPIPS frames) comes from generators
  seeded by (seed, rank, step), so a resumed run repeats an uninterrupted one exactly.
"""
from __future__ import annotations

import itertools
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..config import Config, ConfigError
from ..data.datasets import PreparedDataset
from ..utils.checkpoint import atomic_save, checkpoint_to_resume, make_checkpoint, restore_checkpoint
from ..utils.device import autocast, select_device
from ..utils.dist import (all_reduce_mean, barrier, cleanup, init_distributed, is_distributed, is_main,
                          make_loader, rank, set_loader_epoch, world_size, wrap_ddp)
from ..utils.run import JsonlLog, require_file, setup_logging, stage_dir
from ..utils.seed import seed_everything
from ..utils.train import build_optimizer, clip_grad, cosine_schedule
from .discriminator import PatchDiscriminator3D
from .losses import adaptive_weight, build_lpips, framewise_lpips, hinge_d_loss, kl_per_pixel
from .model import VAE3D

# vae keys that may change between a run and its resumption (they change neither model nor data order)
RESUMABLE_KEYS = {"epochs", "max_steps", "log_every", "val_every", "num_workers", "ckpt_every"}


# ----------------------------------------------------------------------------------------------
# One training step
# ----------------------------------------------------------------------------------------------


class VAETrainer:
    """VAE + optional PatchGAN with their optimisers, schedulers and scalers."""

    def __init__(self, cfg: Config, device: torch.device, total_steps: int):
        v = cfg.vae
        self.cfg, self.v, self.device = cfg, v, device
        self.total_steps = max(int(total_steps), 1)
        self.model = VAE3D.from_config(v).to(device)
        self.ddp_model = wrap_ddp(self.model, device)
        self.opt_g = build_optimizer(self.model.parameters(), v.lr, v.weight_decay)
        self.sched_g = cosine_schedule(self.opt_g, v.warmup_steps, self.total_steps)
        self.scaler_g = torch.amp.GradScaler(device.type, enabled=False)
        self.use_gan = v.disc_weight > 0
        self.disc = self.ddp_disc = self.opt_d = self.sched_d = self.scaler_d = None
        if self.use_gan:
            self.disc = PatchDiscriminator3D.from_config(v).to(device)
            self.ddp_disc = wrap_ddp(self.disc, device)
            self.opt_d = build_optimizer(self.disc.parameters(), v.disc_lr, v.weight_decay, betas=(0.5, 0.9))
            self.sched_d = cosine_schedule(self.opt_d, v.warmup_steps,
                                           max(1, self.total_steps - v.disc_start))
            self.scaler_d = torch.amp.GradScaler(device.type, enabled=False)
        self.lpips = build_lpips(cfg.eval.weights_dir).to(device) if v.perceptual_weight > 0 else None
        self.step = 0

    # -- state ------------------------------------------------------------------------------
    def _disc_state(self) -> dict:
        if not self.use_gan:
            return {}
        return {"disc": self.disc, "disc_optimizer": self.opt_d, "disc_scheduler": self.sched_d,
                "disc_scaler": self.scaler_d}

    def checkpoint(self, epoch: int, extra: dict) -> dict:
        return make_checkpoint(self.model, self.opt_g, self.sched_g, self.scaler_g, step=self.step,
                               epoch=epoch, config=self.cfg.to_dict(), extra=extra, **self._disc_state())

    def restore(self, ckpt: dict) -> tuple[int, int]:
        if self.use_gan and ckpt.get("disc") is None:
            raise ConfigError("the checkpoint has no discriminator but vae.disc_weight > 0; pass --fresh")
        step, epoch = restore_checkpoint(ckpt, self.model, self.opt_g, self.sched_g, self.scaler_g,
                                         **self._disc_state())
        self.step = step
        return step, epoch

    # -- randomness of one step ---------------------------------------------------------------
    def _generators(self) -> tuple[torch.Generator, torch.Generator]:
        seed = ((self.cfg.seed * 1_000_003 + rank()) * 2_147_483_647 + self.step) % (2 ** 63)
        cpu = torch.Generator().manual_seed(seed)
        dev = cpu if self.device.type == "cpu" else torch.Generator(self.device).manual_seed(seed)
        return cpu, dev

    def _clip(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Random cyclic clip of ``clip_frames`` consecutive frames per video (the cine is periodic)."""
        t, length = x.shape[2], self.v.clip_frames
        if not 0 < length < t:
            return x
        starts = torch.randint(0, t, (x.shape[0],), generator=gen)
        idx = (starts[:, None] + torch.arange(length)[None]) % t                  # (B, L)
        idx = idx.to(x.device)[:, None, :, None, None].expand(-1, x.shape[1], -1, x.shape[3], x.shape[4])
        return torch.gather(x, 2, idx)

    # -- the step -------------------------------------------------------------------------------
    def gan_active(self, step: int | None = None) -> bool:
        return self.use_gan and (self.step if step is None else step) >= self.v.disc_start

    def train_step(self, cine: torch.Tensor) -> dict:
        """One G (and D) update on a batch ``(B, 1, T, H, W)``; returns plain-float statistics."""
        v, device, amp = self.v, self.device, self.v.amp
        gen_cpu, gen_dev = self._generators()
        x = self._clip(cine.to(device, non_blocking=True), gen_cpu)
        self.ddp_model.train()
        gan_on = self.gan_active()
        zero = torch.zeros((), device=device)

        with autocast(device, amp):
            x_hat, posterior = self.ddp_model(x, sample=True, generator=gen_dev)
        x_hat = x_hat.float()
        rec = (x_hat - x).abs().mean()
        # LPIPS in fp32 (its feature normalisation is fragile in bf16); frozen, so cheap
        p_loss = (framewise_lpips(self.lpips, x_hat, x, v.perceptual_frames, gen_cpu)
                  if self.lpips is not None else zero)
        nll = rec + v.perceptual_weight * p_loss
        kl = kl_per_pixel(posterior, x)
        loss = nll + v.kl_weight * kl
        g_loss, d_weight = zero, zero
        if gan_on:
            disc = self.disc                         # not the DDP wrapper: no D gradient in the G step
            disc.requires_grad_(False)
            with autocast(device, amp):
                g_loss = -disc(x_hat).float().mean()
            d_weight = adaptive_weight(nll, g_loss, self.model.last_layer) * v.disc_weight
            loss = loss + d_weight * g_loss
            disc.requires_grad_(True)

        self.opt_g.zero_grad(set_to_none=True)
        self.scaler_g.scale(loss).backward()
        self.scaler_g.unscale_(self.opt_g)
        grad_norm = clip_grad(self.model.parameters(), v.grad_clip)
        self.scaler_g.step(self.opt_g)
        self.scaler_g.update()
        self.sched_g.step()

        d_loss, logits_real, logits_fake, d_grad = zero, zero, zero, 0.0
        if gan_on:
            with autocast(device, amp):
                logits = self.ddp_disc(torch.cat([x, x_hat.detach()]))
            logits_real, logits_fake = logits.float().chunk(2)
            d_loss = hinge_d_loss(logits_real, logits_fake)
            self.opt_d.zero_grad(set_to_none=True)
            self.scaler_d.scale(d_loss).backward()
            self.scaler_d.unscale_(self.opt_d)
            d_grad = clip_grad(self.disc.parameters(), v.grad_clip)
            self.scaler_d.step(self.opt_d)
            self.scaler_d.update()
            self.sched_d.step()
            logits_real, logits_fake = logits_real.mean(), logits_fake.mean()

        self.step += 1
        out = {"loss": loss, "rec": rec, "kl": kl, "lpips": p_loss, "g_loss": g_loss, "d_weight": d_weight,
               "d_loss": d_loss, "logits_real": logits_real, "logits_fake": logits_fake}
        out = {k: float(t.detach()) for k, t in out.items()}
        out.update(grad_norm=grad_norm, d_grad_norm=d_grad, lr=self.sched_g.get_last_lr()[0])
        return out


# ----------------------------------------------------------------------------------------------
# Validation and figures
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def reconstruct(vae: VAE3D, cine: torch.Tensor) -> torch.Tensor:
    """Posterior-mode reconstruction in fp32, clamped to [-1, 1]: deterministic."""
    return vae.decode(vae.encode(cine).mode()).clamp(-1.0, 1.0)


@torch.no_grad()
def validate(vae: VAE3D, dataset: PreparedDataset, device: torch.device, batch_size: int,
             limit: int = 0) -> dict:
    """Mean over videos of L1, per-frame PSNR and SSIM (``metrics.fidelity``), posterior mode.

    Shards the videos over ranks (rank r takes r, r + world, ...) and sums exactly; ``limit``
    caps the number of videos (0: all)."""
    from ..metrics.fidelity import psnr_frames, ssim_frames

    was_training = vae.training
    vae.eval()
    n = len(dataset) if not limit else min(limit, len(dataset))
    mine = list(range(rank(), n, world_size()))
    sums = torch.zeros(4, dtype=torch.float64)
    for lo in range(0, len(mine), batch_size):
        cine = torch.stack([dataset[i]["cine"] for i in mine[lo:lo + batch_size]]).to(device)
        x_hat = reconstruct(vae, cine)
        for real, fake in zip(cine.cpu(), x_hat.float().cpu()):
            sums += torch.tensor([float((fake - real).abs().mean()),
                                  float(np.mean(psnr_frames(fake[0], real[0]))),
                                  float(np.mean(ssim_frames(fake[0], real[0]))), 1.0], dtype=torch.float64)
    if is_distributed():
        import torch.distributed as dist

        sums_dev = sums.to(device)
        dist.all_reduce(sums_dev)
        sums = sums_dev.cpu()
    vae.train(was_training)
    count = max(float(sums[3]), 1.0)
    return {"l1": float(sums[0]) / count, "psnr": float(sums[1]) / count, "ssim": float(sums[2]) / count,
            "videos": int(sums[3])}


def save_figures(vae: VAE3D, dataset: PreparedDataset, fig_dir: Path, device: torch.device,
                 epoch: int) -> None:
    """Real vs reconstructed frames and pixel-intensity time curves of the first video."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig_dir.mkdir(parents=True, exist_ok=True)
    item = dataset[0]
    subject = dataset.prepared.subject_ids([item["index"]])[0]
    real = item["cine"][None].to(device)
    fake = reconstruct(vae, real)[0, 0].float().cpu().numpy()
    real = real[0, 0].cpu().numpy()
    t = real.shape[0]
    frames = np.linspace(0, t - 1, 6).round().astype(int)
    fig, axes = plt.subplots(3, len(frames), figsize=(2.1 * len(frames), 6.6))
    for j, f in enumerate(frames):
        for row, (img, name, cmap, lim) in enumerate([(real[f], "real", "gray", (-1, 1)),
                                                      (fake[f], "recon", "gray", (-1, 1)),
                                                      (np.abs(fake[f] - real[f]), "|diff|", "magma", (0, 0.5))]):
            axes[row, j].imshow(img, cmap=cmap, vmin=lim[0], vmax=lim[1])
            axes[row, j].set_xticks([])
            axes[row, j].set_yticks([])
            if j == 0:
                axes[row, j].set_ylabel(name)
        axes[0, j].set_title(f"frame {f}")
    fig.suptitle(f"VAE reconstruction (posterior mode), subject {subject}, epoch {epoch}")
    fig.tight_layout()
    fig.savefig(fig_dir / f"frames_epoch{epoch:03d}.png", dpi=90)
    plt.close(fig)

    # time curves: whole-frame mean, and the mean over the 2% most dynamic pixels of the real cine
    dynamic = real.std(axis=0)
    mask = dynamic >= np.quantile(dynamic, 0.98)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for ax, (name, fn) in zip(axes, [("whole frame", lambda v: v.mean(axis=(1, 2))),
                                     ("2% most dynamic pixels", lambda v: v[:, mask].mean(axis=1))]):
        ax.plot(fn(real), label="real", color="k")
        ax.plot(fn(fake), label="recon", color="tab:red", linestyle="--")
        ax.set_xlabel("frame (0 = R-peak)")
        ax.set_ylabel("mean intensity")
        ax.set_title(name)
        ax.legend()
    fig.suptitle(f"pixel-intensity time curve, subject {subject}, epoch {epoch}")
    fig.tight_layout()
    fig.savefig(fig_dir / f"curve_epoch{epoch:03d}.png", dpi=90)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


def _check_resumable(ckpt: dict, cfg: Config, path) -> None:
    old, new = ckpt.get("config", {}), cfg.to_dict()
    diffs = [f"vae.{k}: {old.get('vae', {}).get(k)!r} -> {v!r}" for k, v in new["vae"].items()
             if k not in RESUMABLE_KEYS and old.get("vae", {}).get(k) != v]
    if old.get("seed") != new["seed"]:
        diffs.append(f"seed: {old.get('seed')!r} -> {new['seed']!r}")
    if diffs:
        raise ConfigError(f"'{path}' was written with a different configuration ({'; '.join(diffs)}). "
                          f"Pass --fresh to start over, or choose another run_dir=.")


def _trim_log(path: Path, max_step: int | None) -> None:
    """Drop records past ``max_step`` (written after the checkpoint we resume); None: drop all."""
    import json

    if not path.is_file() or not is_main():
        return
    keep = []
    if max_step is not None:
        for line in path.read_text().splitlines():
            try:
                if int(json.loads(line).get("step", 0)) <= max_step:
                    keep.append(line)
            except ValueError:
                continue
    path.write_text("".join(line + "\n" for line in keep))


def train(cfg: Config, resume: bool = False, fresh: bool = False, extract: bool = True) -> dict:
    """Train the VAE, then cache latents + template from ``best.pt``; returns a summary."""
    device = select_device(cfg.device)
    init_distributed(device)
    try:
        summary = _train(cfg, device, resume, fresh)
        if extract:
            summary["latents"] = extract_latents(cfg, device)
        return summary
    finally:
        cleanup()


def _train(cfg: Config, device: torch.device, resume: bool, fresh: bool) -> dict:
    v = cfg.vae
    require_file(cfg.data_root / "meta.json", "prepare_data.py (the prepared dataset)")
    out_dir = stage_dir(cfg, "vae")
    log = setup_logging(out_dir / "train.log")
    history = JsonlLog(out_dir / "log.jsonl")
    step_log = JsonlLog(out_dir / "steps.jsonl")      # every log_every steps
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"

    ckpt = checkpoint_to_resume(last_path, resume, fresh, "train_disentangle_vae3d.py", log)
    if ckpt is not None:
        _check_resumable(ckpt, cfg, last_path)

    seed_everything(cfg.seed)
    train_set = PreparedDataset(cfg.data_root, "train", fields=("cine",))
    val_set = PreparedDataset(cfg.data_root, "val", fields=("cine",))
    if len(train_set) == 0:
        raise ConfigError(f"the train split of '{cfg.data_root}' is empty")
    fig_set = val_set if len(val_set) else train_set
    loader = make_loader(train_set, v.batch_size, train=True, seed=cfg.seed, num_workers=v.num_workers)
    steps_per_epoch = len(loader)
    total_steps = v.epochs * steps_per_epoch
    if v.max_steps:
        total_steps = min(total_steps, v.max_steps)
    trainer = VAETrainer(cfg, device, total_steps)
    model = trainer.model

    epoch, epoch_step, best = 0, 0, math.inf
    val_metrics: dict = {}
    for log_file in (history.path, step_log.path):
        _trim_log(log_file, int(ckpt["step"]) if ckpt is not None else None)
    if ckpt is not None:
        _, epoch = trainer.restore(ckpt)
        epoch_step = int(ckpt["extra"].get("epoch_step", 0))
        best = float(ckpt["extra"].get("best_val_l1", math.inf))
        val_metrics = ckpt["extra"].get("val", {})
    done = lambda: epoch >= v.epochs or trainer.step >= total_steps
    if done():
        log.info("stage 2 already trained (%d epochs, %d steps in %s)", epoch, trainer.step, last_path)
        return {"val": val_metrics, "best_val_l1": best, "step": trainer.step}

    n_params = sum(p.numel() for p in model.parameters())
    n_disc = sum(p.numel() for p in trainer.disc.parameters()) if trainer.use_gan else 0
    log.info("stage 2 VAE: %d train / %d val videos, VAE %.2fM + disc %.2fM parameters, %d steps/epoch, "
             "%d steps in all, GAN from step %s, LPIPS %s, device %s", len(train_set), len(val_set),
             n_params / 1e6, n_disc / 1e6, steps_per_epoch, total_steps,
             v.disc_start if trainer.use_gan else "never", "on" if trainer.lpips is not None else "off",
             device)

    def save(path, extra_val, full=True):
        extra = {"best_val_l1": best, "epoch_step": epoch_step, "val": extra_val,
                 "steps_per_epoch": steps_per_epoch, "vae_hash": model.state_hash()}
        ckpt_out = trainer.checkpoint(epoch, extra)
        if not full:   # best.pt: weights + config + metrics (what load_vae and stage 3 need)
            ckpt_out = {k: ckpt_out[k] for k in ("model", "step", "epoch", "config", "extra")}
        atomic_save(ckpt_out, path)

    started, cpu_started = time.time(), time.process_time()
    while not done():
        set_loader_epoch(loader, epoch, cfg.seed)
        epoch_start = time.time()
        sums: dict[str, float] = {}
        n = 0
        batches = itertools.islice(iter(loader), epoch_step, None)    # exact resume inside an epoch
        bar = tqdm(batches, total=steps_per_epoch, initial=epoch_step, disable=not is_main(),
                   desc=f"vae epoch {epoch + 1}/{v.epochs}", leave=False, mininterval=2.0)
        for batch in bar:
            stats = trainer.train_step(batch["cine"])
            epoch_step += 1
            n += 1
            for key, value in stats.items():
                sums[key] = sums.get(key, 0.0) + value
            bar.set_postfix(l1=f"{stats['rec']:.4f}", gan="on" if trainer.gan_active(trainer.step - 1) else "off")
            if trainer.step % v.log_every == 0:
                step_log.write(step=trainer.step, epoch=epoch, **stats)
                log.info("step %d  loss %.4f  l1 %.4f  kl %.1f  lpips %.4f  g %.3f  d %.3f  w_d %.3g  "
                         "grad %.2f  lr %.2e", trainer.step, stats["loss"], stats["rec"], stats["kl"],
                         stats["lpips"], stats["g_loss"], stats["d_loss"], stats["d_weight"],
                         stats["grad_norm"], stats["lr"])
            if trainer.step >= total_steps:
                break
            if v.ckpt_every and trainer.step % v.ckpt_every == 0 and epoch_step < steps_per_epoch:
                if is_main():
                    save(last_path, val_metrics)
                barrier()
        bar.close()
        finished_epoch = epoch_step >= steps_per_epoch
        if finished_epoch:
            epoch += 1
            epoch_step = 0
        epoch_seconds = time.time() - epoch_start
        stopping = done()
        run_val = (finished_epoch and epoch % v.val_every == 0) or stopping
        train_means = {f"train_{k}": all_reduce_mean(s / max(n, 1), device) for k, s in sums.items()}
        if run_val:
            val_metrics = validate(model, val_set, device, v.batch_size) if len(val_set) else {}
        if is_main():
            if run_val:
                metric = val_metrics.get("l1", train_means.get("train_rec", math.inf))
                improved = metric < best
                best = min(best, metric)
                log.info("epoch %d (step %d, %.0f s this epoch, %.0f s in all): train l1 %.4f | val l1 %.4f "
                         "PSNR %.2f dB SSIM %.4f%s", epoch, trainer.step, epoch_seconds, time.time() - started,
                         train_means.get("train_rec", float("nan")), val_metrics.get("l1", float("nan")),
                         val_metrics.get("psnr", float("nan")), val_metrics.get("ssim", float("nan")),
                         "  (best)" if improved else "")
                history.write(epoch=epoch, step=trainer.step, epoch_seconds=round(epoch_seconds, 1),
                              seconds=round(time.time() - started, 1),
                              cpu_seconds=round(time.process_time() - cpu_started, 1), **train_means,
                              **{f"val_{k}": val for k, val in val_metrics.items()})
                save_figures(model, fig_set, out_dir / "figures", device, epoch)
                save(last_path, val_metrics)
                if improved or not best_path.is_file():
                    save(best_path, val_metrics, full=False)
            else:
                save(last_path, val_metrics)
        barrier()
    log.info("stage 2 trained: %s (best val l1 %.4f)", best_path, best)
    return {"val": val_metrics, "best_val_l1": best, "step": trainer.step}


def extract_latents(cfg: Config, device: torch.device | None = None) -> dict:
    """Cache latents of every split + the template from ``runs/<exp>/vae/best.pt`` (sharded over ranks)."""
    from .latents import extract_all
    from .model import load_vae

    device = device or select_device(cfg.device)
    init_distributed(device)                # --extract-only under torchrun: shard, do not race
    best_path = require_file(cfg.stage_dir("vae") / "best.pt", "train_disentangle_vae3d.py (stage 2 training)")
    require_file(cfg.data_root / "meta.json", "prepare_data.py (the prepared dataset)")
    out_dir = stage_dir(cfg, "latents")
    log = setup_logging(cfg.stage_dir("vae") / "train.log")
    vae = load_vae(best_path, device)
    if is_main():
        log.info("caching latents with %s (VAE %s) into %s", best_path, vae.state_hash(), out_dir)
    template = extract_all(vae, cfg.data_root, out_dir, device, batch_size=cfg.vae.batch_size)
    return {"vae_hash": template["vae_hash"], "n_subjects": template["n_subjects"],
            "template_shape": list(template["template"].shape)}
