"""Template-anchored flow matching (small separate pieces, in the spirit of SiT's ``transport/``).

Convention (stored in every flow checkpoint, applied automatically at inference):

* The flow works on **per-channel normalised latents**: ``z_norm = (z - mean) / std`` with
  ``mean, std (C,)`` from ``latents/template.pt``. The template is normalised the same way. With
  this, ``alpha`` is measured in units of the latent spread of each channel and one noise scale
  fits every channel; ``LatentNorm.denormalize`` maps samples back before the VAE decodes them.
* Path (rectified flow / linear interpolant), from the anchor to the data::

      z0 = template + alpha * eps            (use_template=True; eps ~ N(0, I))
      z0 = eps                               (use_template=False: "without template anchor")
      z_t = (1 - t) * z0 + t * z1,   target velocity  u = z1 - z0,   loss = MSE(v(z_t, t), u)

  The template ``(C, 1, h, w)`` is broadcast over the 50 frames: every video starts at the static
  population anatomy, and the flow only has to add this subject's anatomy and its ECG-timed motion.
* ``flow.anchor=ecg``: the anchor's mean is a per-subject prediction from the ECG
  (``flow/anchor.py``) instead of the template: ``z0 = head(ECG) + alpha * eps``. With
  ``flow.anchor_residual`` the network sees ``z_t - head(ECG)`` (the flow in the anchor's frame;
  the velocity is unchanged, as the anchor does not move with t), so it need not recompute the
  subject's anchor to tell it apart from the noise. On the phantom bench that lowers the
  validation loss but gives worse cines than the network seeing ``z_t`` (docs/flow_levers.md).
* Motion weighting (``flow.motion_weight`` w): the error ``e`` splits into its time mean and the
  motion ``e - mean_T(e)`` (orthogonal parts), and the loss is ``MSE(e) + w * MSE(motion)``.
  Most latent variance is anatomy the ECG cannot reveal; the weight keeps the ECG-timed motion
  from being a few per cent of the loss.
* ``t ~ U(0, 1)`` or logit-normal (``sigmoid(N(0, 1))``, more weight mid-path).
* The validation loss is deterministic: a fixed grid of ``t`` and per-subject noise seeds.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

# ----------------------------------------------------------------------------------------------
# Latent normalisation
# ----------------------------------------------------------------------------------------------


@dataclass
class LatentNorm:
    """Per-channel affine normalisation of latents ``(B, C, T, H, W)``; ``mean, std (C,)``."""

    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def identity(cls, channels: int) -> LatentNorm:
        return cls(torch.zeros(channels), torch.ones(channels))

    @classmethod
    def from_template(cls, template: dict, enabled: bool = True) -> LatentNorm:
        if not enabled:
            return cls.identity(int(template["template"].shape[0]))
        std = template["std"].float().clamp_min(1e-6)
        return cls(template["mean"].float(), std)

    def _view(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return v.to(device=x.device, dtype=x.dtype).view(1, -1, *([1] * (x.dim() - 2)))

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self._view(z, self.mean)) / self._view(z, self.std)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z * self._view(z, self.std) + self._view(z, self.mean)

    def to_dict(self) -> dict:
        return {"mean": self.mean.detach().cpu().float(), "std": self.std.detach().cpu().float()}

    @classmethod
    def from_dict(cls, d: dict) -> LatentNorm:
        return cls(d["mean"].float(), d["std"].float())


def template_hash(template: dict, length: int = 16) -> str:
    """Identity of a template dict (template, mean, std tensors and the VAE hash it came from)."""
    h = hashlib.sha256()
    for key in ("template", "mean", "std"):
        t = template[key].detach().cpu().float().contiguous()
        h.update(key.encode() + str(tuple(t.shape)).encode() + t.numpy().tobytes())
    h.update(str(template.get("vae_hash", "")).encode())
    return h.hexdigest()[:length]


# ----------------------------------------------------------------------------------------------
# The path
# ----------------------------------------------------------------------------------------------


class TemplateAnchor:
    """Source distribution of the flow: ``template + alpha * eps`` (or ``eps``).

    ``template``: normalised template ``(C, 1, H, W)`` (or ``(C, T, H, W)``).
    """

    def __init__(self, template: torch.Tensor, alpha: float = 1.0, use_template: bool = True,
                 residual_input: bool = False):
        self.template = template.detach().float()
        self.alpha = float(alpha)
        self.use_template = bool(use_template)
        self.residual_input = bool(residual_input)

    def model_input(self, z: torch.Tensor, mean: torch.Tensor | None) -> torch.Tensor:
        """What the velocity network sees of ``z``: ``z - mean`` for a residual ECG anchor, else ``z``."""
        return z - mean.to(z.dtype) if self.residual_input and mean is not None else z

    def sample(self, noise: torch.Tensor, mean: torch.Tensor | None = None) -> torch.Tensor:
        """``noise (B, C, T, H, W)`` ~ N(0, I) -> ``z0`` of the same shape. ``mean``: a per-sample
        anchor ``(B, C, T, H, W)`` (the ECG anchor) in place of the template."""
        if not self.use_template:
            return noise
        if mean is None:
            mean = self.template.to(device=noise.device, dtype=noise.dtype).unsqueeze(0)
        return mean.to(noise.dtype) + self.alpha * noise

    def mean(self, shape: tuple, device=None, dtype=torch.float32) -> torch.Tensor:
        """The anchor itself broadcast to ``shape`` (what ``sample`` returns for zero noise)."""
        return self.sample(torch.zeros(shape, device=device, dtype=dtype))


def interpolate(z0: torch.Tensor, z1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``z_t = (1 - t) z0 + t z1`` with ``t (B,)``."""
    t = t.to(z0.dtype).view(-1, *([1] * (z0.dim() - 1)))
    return (1 - t) * z0 + t * z1


def target_velocity(z0: torch.Tensor, z1: torch.Tensor) -> torch.Tensor:
    """d z_t / d t along the straight path."""
    return z1 - z0


def sample_t(n: int, mode: str = "uniform", device=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """``(n,)`` flow times in [0, 1): ``uniform`` or ``logit_normal`` (sigmoid of N(0, 1))."""
    where = generator.device if generator is not None else None        # a generator draws on its device
    if mode == "uniform":
        return torch.rand(n, generator=generator, device=where).to(device)
    if mode == "logit_normal":
        return torch.sigmoid(torch.randn(n, generator=generator, device=where)).to(device)
    raise ValueError(f"flow.t_sampling: unknown mode '{mode}' (use uniform or logit_normal)")


def cfg_drop_mask(n: int, p: float, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """``(n,)`` bool, True where the ECG condition is replaced by the null (prob. ``p``).

    Always a tensor (all False for ``p = 0``), so the null parameters stay in the graph (DDP)."""
    if p <= 0:
        return torch.zeros(n, dtype=torch.bool, device=device)
    where = generator.device if generator is not None else None
    return (torch.rand(n, generator=generator, device=where) < p).to(device)


def motion_weighted_mse(pred: torch.Tensor, target: torch.Tensor, motion_weight: float = 0.0) -> torch.Tensor:
    """Per-sample ``MSE(e) + motion_weight * MSE(e - mean_T(e))`` for ``(B, C, T, H, W)``: ``(B,)``."""
    err = pred.float() - target.float()
    per_sample = err.pow(2).flatten(1).mean(1)
    if motion_weight > 0:
        motion = err - err.mean(dim=2, keepdim=True)
        per_sample = per_sample + motion_weight * motion.pow(2).flatten(1).mean(1)
    return per_sample


def flow_matching_loss(velocity_fn, z1: torch.Tensor, anchor: TemplateAnchor, t: torch.Tensor,
                       noise: torch.Tensor, reduce: bool = True, anchor_mean: torch.Tensor | None = None,
                       motion_weight: float = 0.0, **cond) -> torch.Tensor:
    """(Motion-weighted) MSE between the predicted and the straight-path velocity.

    ``velocity_fn(z_t, t, **cond) -> (B, C, T, H, W)``; ``z1`` normalised data latents;
    ``t (B,)``; ``noise`` like ``z1``; ``anchor_mean``: the ECG anchor's prediction (else the
    template). Returns a scalar, or ``(B,)`` per-sample losses.
    """
    z0 = anchor.sample(noise, anchor_mean)
    z_t = interpolate(z0, z1, t)
    pred = velocity_fn(anchor.model_input(z_t, anchor_mean), t, **cond)
    per_sample = motion_weighted_mse(pred, target_velocity(z0, z1), motion_weight)
    return per_sample.mean() if reduce else per_sample


# ----------------------------------------------------------------------------------------------
# Deterministic validation
# ----------------------------------------------------------------------------------------------


def validation_t_grid(points: int = 8) -> torch.Tensor:
    """Midpoints of ``points`` equal bins of [0, 1]: ``(points,)``."""
    return (torch.arange(points, dtype=torch.float32) + 0.5) / points


def seeded_noise(shape: tuple, seed: int) -> torch.Tensor:
    """CPU normal noise from its own generator (identical on every device and batch layout)."""
    g = torch.Generator().manual_seed(int(seed) % (2 ** 63))
    return torch.randn(shape, generator=g)
