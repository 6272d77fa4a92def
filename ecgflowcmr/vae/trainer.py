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

import math
from pathlib import Path

import numpy as np
import torch

from ..config import Config, ConfigError
from ..data.datasets import PreparedDataset
from ..utils.device import autocast, select_device
from ..utils.dist import init_distributed, is_distributed, is_main, make_loader, rank, world_size, wrap_ddp
from ..utils.run import require_file, setup_logging, stage_dir
from ..utils.seed import seed_everything
from ..utils.stage import StageRun, run_stage
from ..utils.train import build_optimizer, clip_grad, cosine_schedule
from ..utils.trainer import LoopSettings, Stage, Trainer
from .discriminator import PatchDiscriminator3D
from .losses import adaptive_weight, build_lpips, framewise_lpips, hinge_d_loss, kl_per_pixel
from .model import VAE3D

# ----------------------------------------------------------------------------------------------
# One training step
# ----------------------------------------------------------------------------------------------


class VAETrainer(Stage):
    """VAE + optional PatchGAN with their optimisers, schedulers and scalers: stage 2 of the
    training loop (``val_set``, ``fig_set`` and ``out_dir`` are needed only there)."""

    name, best_key = "vae", "best_val_l1"

    def __init__(self, cfg: Config, device: torch.device, total_steps: int, val_set=None, fig_set=None,
                 out_dir: Path | None = None):
        v = cfg.vae
        self.cfg, self.v, self.device = cfg, v, device
        self.val_set, self.fig_set, self.out_dir = val_set, fig_set, out_dir
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

    def state(self) -> dict:
        return {"optimizer": self.opt_g, "scheduler": self.sched_g, "scaler": self.scaler_g, **self._disc_state()}

    def extra(self) -> dict:
        return {"vae_hash": self.model.state_hash()}

    def checkpoint(self, ckpt: dict, best: bool) -> dict:
        """best.pt: weights + config + metrics (what load_vae and stage 3 need)."""
        return {k: ckpt[k] for k in ("model", "step", "epoch", "config", "extra")} if best else ckpt

    def check_resumable(self, ckpt: dict) -> None:
        if self.use_gan and ckpt.get("disc") is None:
            raise ConfigError("the checkpoint has no discriminator but vae.disc_weight > 0; pass --fresh")

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

    def train_step(self, cine: torch.Tensor | dict, step: int | None = None) -> dict:
        """One G (and D) update on a batch ``(B, 1, T, H, W)`` (or a loader batch holding it) after
        ``step`` steps (default: this object's count); returns statistics as device tensors."""
        v, device, amp = self.v, self.device, self.v.amp
        cine = cine["cine"] if isinstance(cine, dict) else cine
        self.step = self.step if step is None else step
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
        grad_norm = clip_grad(self.model.parameters(), v.grad_clip, sync=False)
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
            d_grad = clip_grad(self.disc.parameters(), v.grad_clip, sync=False)
            self.scaler_d.step(self.opt_d)
            self.scaler_d.update()
            self.sched_d.step()
            logits_real, logits_fake = logits_real.mean(), logits_fake.mean()

        self.step += 1
        out = {"loss": loss, "rec": rec, "kl": kl, "lpips": p_loss, "g_loss": g_loss, "d_weight": d_weight,
               "d_loss": d_loss, "logits_real": logits_real, "logits_fake": logits_fake}
        out = {k: t.detach() for k, t in out.items()}
        out.update(grad_norm=grad_norm, d_grad_norm=d_grad, lr=self.sched_g.get_last_lr()[0])
        return out

    # -- the loop's hooks -------------------------------------------------------------------------
    def validate(self) -> dict[str, float]:
        return validate(self.model, self.val_set, self.device, self.v.batch_size) if len(self.val_set) else {}

    def score(self, record: dict) -> float:
        """Validation L1 of the posterior mode (the train L1 when there is no val split)."""
        return record.get("val_l1", record.get("train_rec", math.inf))

    def describe(self, record: dict) -> str:
        nan = float("nan")
        return (f"{record['epoch_seconds']:.0f} s this epoch, {record['seconds']:.0f} s in all: train l1 "
                f"{record.get('train_rec', nan):.4f} | val l1 {record.get('val_l1', nan):.4f} PSNR "
                f"{record.get('val_psnr', nan):.2f} dB SSIM {record.get('val_ssim', nan):.4f}")

    def on_epoch_end(self, record: dict, validated: bool, stopping: bool, finished: bool) -> None:
        if validated:
            save_figures(self.model, self.fig_set, self.out_dir / "figures", self.device, record["epoch"])


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


def train(cfg: Config, resume: bool = False, fresh: bool = False, extract: bool = True) -> dict:
    """Train the VAE, then (``extract``) cache latents + template from ``best.pt``; returns a summary.
    A finished training run still extracts: the latents may be what is missing."""

    def then_extract(summary: dict, run: StageRun) -> dict:
        if extract:
            summary["latents"] = extract_latents(cfg, run.device)
        return summary

    def finished_run(run: StageRun) -> dict:
        extra = run.ckpt.get("extra", {})
        return then_extract({"val": extra.get("val", {}), "best_val_l1": float(extra.get("best_val_l1", math.inf)),
                             "step": int(run.ckpt["step"])}, run)

    return run_stage(cfg, "vae", "train_disentangle_vae3d.py", resume, fresh,
                     lambda run: then_extract(_train(run), run), done=finished_run,
                     requires=((cfg.data_root / "meta.json", "prepare_data.py (the prepared dataset)"),))


def _train(run: StageRun) -> dict:
    cfg, device, out_dir, log, ckpt, v = run.cfg, run.device, run.out, run.log, run.ckpt, run.cfg.vae
    seed_everything(cfg.seed)
    train_set = PreparedDataset(cfg.data_root, "train", fields=("cine",))
    val_set = PreparedDataset(cfg.data_root, "val", fields=("cine",))
    if len(train_set) == 0:
        raise ConfigError(f"the train split of '{cfg.data_root}' is empty")
    loader = make_loader(train_set, v.batch_size, train=True, seed=cfg.seed, num_workers=v.num_workers)
    total_steps = v.epochs * len(loader)
    if v.max_steps:
        total_steps = min(total_steps, v.max_steps)
    stage = VAETrainer(cfg, device, total_steps, val_set, val_set if len(val_set) else train_set, out_dir)
    settings = LoopSettings(epochs=v.epochs, max_steps=v.max_steps, log_every=v.log_every, val_every=v.val_every,
                            ckpt_every=v.ckpt_every, step_log="steps.jsonl")
    trainer = Trainer(stage, loader, settings, out_dir, cfg.to_dict(), cfg.seed, device, log)
    if ckpt is not None:
        stage.check_resumable(ckpt)
    trainer.restore(ckpt)
    n_disc = sum(p.numel() for p in stage.disc.parameters()) if stage.use_gan else 0
    log.info("stage 2 VAE: %d train / %d val videos, VAE %.2fM + disc %.2fM parameters, %d steps/epoch, "
             "%d steps in all, GAN from step %s, LPIPS %s, device %s", len(train_set), len(val_set),
             sum(p.numel() for p in stage.model.parameters()) / 1e6, n_disc / 1e6, trainer.steps_per_epoch,
             total_steps, v.disc_start if stage.use_gan else "never", "on" if stage.lpips is not None else "off",
             device)
    state = trainer.fit()
    log.info("stage 2 trained: %s (best val l1 %.4f)", trainer.best_path, state.best)
    return {"val": state.last_val, "best_val_l1": state.best, "step": state.step}


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
