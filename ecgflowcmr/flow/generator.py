"""ECG -> cine generation from ONE flow checkpoint (used by infer_flow.py, previews and benchmarks).

A flow checkpoint (``runs/<exp>/flow/{best,last}.pt``, written by ``train_flow.py``) embeds
everything inference needs, so ``infer_flow.py`` needs nothing else::

    ckpt["model"], ckpt["ema"]    FlowModel state (``dit.*`` [+ ``encoder.*`` when fine-tuned])
    ckpt["dit_arch"]              FlowDiT constructor arguments
    ckpt["ecg_encoder"]           {"config": ecg section, "state_dict", "hash"}: the encoder weights
                                  training used (frozen stage-1 weights, or the EMA of the
                                  fine-tuned ones)
    ckpt["vae"]                   {"config": vae section, "state_dict", "hash"}
    ckpt["template"]              latents/template.pt dict {"template", "mean", "std", "vae_hash", ...}
    ckpt["flow"]                  {"latent_norm": {"mean", "std"}, "alpha", "use_template",
                                   "latent_shape", "normalized": bool, "anchor", "motion_weight",
                                   "residual_input"}
    ckpt["anchor_head"]           {"arch", "state_dict", "fit"}: the ECG anchor head (flow.anchor=ecg)
    ckpt["morphology"]            the ECG morphology code's buffers (flow.morphology_dims > 0): the encoder
                                  is wrapped so that its pooled output carries it (ecg/morphology.py)
    ckpt["extra"]                 {"vae_hash", "template_hash", "ecg_hash", best metric, ...}

On load the hashes are recomputed from the embedded weights and compared with the recorded ones;
a checkpoint whose VAE, template or encoder does not match what it was trained with is refused
(``CheckpointMismatch``).

Per-sample seeds are derived from ``(seed, subject_id, k)`` (``sample_seed``), and the noise is
drawn on the CPU from a generator of its own, so a video does not depend on batching, sharding
or device.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..utils.checkpoint import load_checkpoint, state_hash
from ..utils.device import autocast
from .anchor import ECGAnchor, anchor_from_arch
from .dit import FlowDiT, dit_from_arch
from .samplers import guided_velocity, integrate
from .transport import LatentNorm, TemplateAnchor, template_hash

PIXEL_MM = 1.8        # nominal in-plane pixel size of the 96 x 96 cine (see write_nifti)
SLICE_MM = 6.0        # nominal slice thickness of a long-axis cine


class CheckpointMismatch(ValueError):
    """A flow checkpoint's embedded VAE / template / encoder differs from what it recorded."""


# ----------------------------------------------------------------------------------------------
# Bridges to stages 1 and 2 (the only place that knows their loading API)
# ----------------------------------------------------------------------------------------------

def module_hash(module: nn.Module) -> str:
    """The module's own ``state_hash()`` when it has one, else the hash of its state dict."""
    fn = getattr(module, "state_hash", None)
    return fn() if callable(fn) else state_hash(module.state_dict())


def load_stage1_encoder(path: str | os.PathLike, device: torch.device, cycle_mode: str | None = None):
    """Load the stage-1 encoder from ``runs/<exp>/ecg/best.pt``; returns ``(encoder, spec)``.

    The architecture comes from the stage-1 checkpoint's config; ``cycle_mode`` (the stage-3
    config's ``ecg.cycle_mode``) picks the cycle rule. ``spec`` = what a flow checkpoint embeds to
    rebuild the same encoder: ``{"config": ecg section, "hash"}`` (+ ``state_dict`` at save time).
    """
    from ..ecg.encoder import load_ecg_encoder

    encoder = load_ecg_encoder(str(path), device, cycle_mode=cycle_mode)
    ckpt = load_checkpoint(path, stage_hint="train_ecg.py")
    ecg_cfg = dict(ckpt["config"]["ecg"])
    ecg_cfg["cycle_mode"] = getattr(encoder, "cycle_mode", ecg_cfg.get("cycle_mode"))
    return encoder, {"config": ecg_cfg, "hash": module_hash(encoder)}


def encoder_from_spec(spec: dict, device: torch.device) -> nn.Module:
    """Rebuild the encoder a flow checkpoint embeds (config + weights)."""
    from ..config import section_from_dict
    from ..ecg.encoder import build_ecg_encoder

    encoder = build_ecg_encoder(section_from_dict("ecg", spec["config"]))
    encoder.load_state_dict(spec["state_dict"])
    return encoder.to(device).eval()


def load_stage2_vae(path: str | os.PathLike, device: torch.device):
    """Load the stage-2 VAE from ``runs/<exp>/vae/best.pt``; returns ``(vae, spec)`` with
    ``spec = {"config": vae section, "state_dict", "hash"}`` (no optimiser / discriminator)."""
    from ..vae import load_vae

    vae = load_vae(str(path), device)
    ckpt = load_checkpoint(path, stage_hint="train_disentangle_vae3d.py")
    state = {k: v.detach().cpu() for k, v in vae.state_dict().items()}
    return vae, {"config": dict(ckpt["config"]["vae"]), "state_dict": state, "hash": module_hash(vae)}


def vae_from_spec(spec: dict, device: torch.device) -> nn.Module:
    """Rebuild the VAE a flow checkpoint embeds."""
    from ..vae import build_vae

    vae = build_vae(spec["config"])
    vae.load_state_dict(spec["state_dict"])
    return vae.to(device).eval()


# ----------------------------------------------------------------------------------------------
# The trainable module
# ----------------------------------------------------------------------------------------------


class FlowModel(nn.Module):
    """The DiT, plus the ECG encoder when it is fine-tuned (one module for DDP and EMA).

    ``forward(z_t, t, ecg_tokens, ecg_pooled, drop)`` or ``forward(z_t, t, ecg=ecg, drop=drop)``
    (raw ECG ``(B, 12, 5000)`` through the trainable encoder).
    """

    def __init__(self, dit: FlowDiT, encoder: nn.Module | None = None):
        super().__init__()
        self.dit = dit
        self.encoder = encoder

    def forward(self, z_t, t, ecg_tokens=None, ecg_pooled=None, drop=None, ecg=None):
        if ecg is not None:
            if self.encoder is None:
                raise ValueError("FlowModel got a raw ECG but has no trainable encoder")
            out = self.encoder(ecg)
            ecg_tokens, ecg_pooled = out.tokens, out.pooled
        return self.dit(z_t, t, ecg_tokens, ecg_pooled, drop)


def dit_state_from(flow_state: dict) -> dict:
    return {k[len("dit."):]: v for k, v in flow_state.items() if k.startswith("dit.")}


def encoder_state_from(flow_state: dict) -> dict:
    return {k[len("encoder."):]: v for k, v in flow_state.items() if k.startswith("encoder.")}


# ----------------------------------------------------------------------------------------------
# Seeds
# ----------------------------------------------------------------------------------------------


def sample_seed(seed: int, subject_id: str, k: int) -> int:
    """Deterministic 63-bit seed of sample ``k`` of ``subject_id`` under the run seed."""
    digest = hashlib.sha256(f"{int(seed)}|{subject_id}|{int(k)}".encode()).hexdigest()
    return int(digest[:15], 16)


def seeded_noise_batch(seeds: list[int], shape: tuple) -> torch.Tensor:
    """``(len(seeds), *shape)`` standard normal noise, one CPU generator per sample."""
    out = torch.empty((len(seeds),) + tuple(shape))
    for i, s in enumerate(seeds):
        out[i] = torch.randn(shape, generator=torch.Generator().manual_seed(int(s)))
    return out


# ----------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------


@dataclass
class Generated:
    """Output of ``ECGToCine.generate`` (all CPU tensors).

    cine ``(B, 1, 50, 96, 96)`` in [-1, 1]; latents ``(B, C, 50, h, w)`` (VAE scale);
    start / end ``(B,)`` chosen ECG cycle in samples at 500 Hz; fallback ``(B,)`` bool.
    """

    cine: torch.Tensor
    latents: torch.Tensor
    start: torch.Tensor
    end: torch.Tensor
    fallback: torch.Tensor

    @classmethod
    def of(cls, cine: torch.Tensor, latents: torch.Tensor, cycle) -> Generated:
        """With the chosen cycle of the encoder output ``cycle``."""
        return cls(cine, latents, cycle.start.detach().cpu().long(), cycle.end.detach().cpu().long(),
                   cycle.fallback.detach().cpu().bool())


class ECGToCine:
    """ECG-only generation: encoder -> flow ODE from the anchor (template, or the ECG anchor head)
    -> VAE decode."""

    def __init__(self, dit: FlowDiT, encoder: nn.Module, vae: nn.Module, template: dict,
                 norm: LatentNorm, alpha: float, use_template: bool, device: torch.device,
                 info: dict | None = None, amp: bool = True, anchor_head: ECGAnchor | None = None,
                 residual_input: bool = False):
        self.dit = dit.to(device).eval()
        self.encoder = encoder.to(device).eval() if encoder is not None else None
        self.vae = vae.to(device).eval() if vae is not None else None
        self.template = template
        self.norm = norm
        self.alpha, self.use_template = float(alpha), bool(use_template)
        self.anchor = TemplateAnchor(norm.normalize(template["template"].float()[None])[0], alpha, use_template,
                                     residual_input)
        self.latent_shape = (int(template["template"].shape[0]), dit.arch["num_frames"],
                             dit.arch["latent_size"], dit.arch["latent_size"])
        self.anchor_head = anchor_head.to(device).eval() if anchor_head is not None else None
        self.device = device
        self.info = info or {}
        self.amp = amp

    # -- loading ------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: torch.device | str = "cpu",
                        use_ema: bool = True, amp: bool = True) -> ECGToCine:
        device = torch.device(device)
        ckpt = load_checkpoint(path, stage_hint="train_flow.py")
        for key in ("dit_arch", "ecg_encoder", "vae", "template", "flow"):
            if key not in ckpt:
                raise CheckpointMismatch(f"'{path}' is not a flow checkpoint (no '{key}'); "
                                         "it is written by train_flow.py")
        extra = ckpt.get("extra", {})
        template = ckpt["template"]
        t_hash = template_hash(template)
        if extra.get("template_hash") and t_hash != extra["template_hash"]:
            raise CheckpointMismatch(f"'{path}': the embedded template (hash {t_hash}) is not the one "
                                     f"the flow was trained with ({extra['template_hash']})")
        vae = vae_from_spec(ckpt["vae"], device)
        v_hash = module_hash(vae)
        for name, recorded in (("checkpoint", extra.get("vae_hash")), ("template", template.get("vae_hash"))):
            if recorded and v_hash != recorded:
                raise CheckpointMismatch(f"'{path}': the embedded VAE (hash {v_hash}) is not the VAE the "
                                         f"{name} records ({recorded}); latents and decoder would disagree. "
                                         "Re-train the flow on latents of this VAE.")
        encoder = encoder_from_spec(ckpt["ecg_encoder"], device)
        e_hash = module_hash(encoder)
        if extra.get("ecg_hash") and e_hash != extra["ecg_hash"]:
            raise CheckpointMismatch(f"'{path}': the embedded ECG encoder (hash {e_hash}) is not the one "
                                     f"the flow was trained with ({extra['ecg_hash']})")
        if ckpt.get("morphology"):
            from ..ecg.morphology import MorphologyCode, MorphologyEncoder

            encoder = MorphologyEncoder(encoder, MorphologyCode.from_state(ckpt["morphology"]))
        dit = dit_from_arch(ckpt["dit_arch"])
        state = ckpt["ema"] if use_ema and ckpt.get("ema") is not None else ckpt["model"]
        dit.load_state_dict(dit_state_from(state))
        flow = ckpt["flow"]
        anchor_head = None
        if ckpt.get("anchor_head"):
            anchor_head = anchor_from_arch(ckpt["anchor_head"]["arch"])
            anchor_head.load_state_dict(ckpt["anchor_head"]["state_dict"])
        info = {"checkpoint": str(path), "step": ckpt.get("step"), "epoch": ckpt.get("epoch"),
                "weights": "ema" if state is ckpt.get("ema") else "model",
                "vae_hash": v_hash, "template_hash": t_hash, "ecg_hash": e_hash}
        return cls(dit, encoder, vae, template, LatentNorm.from_dict(flow["latent_norm"]),
                   flow["alpha"], flow["use_template"], device, info, amp, anchor_head,
                   bool(flow.get("residual_input", False)))

    # -- pieces -------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, ecg: torch.Tensor):
        """``(B, 12, 5000)`` mV -> stage-1 ``CycleOutput`` (tokens, pooled, start, end, fallback...),
        computed under the bf16 autocast stage 1 trained it with (CUDA), tokens returned in fp32."""
        with autocast(self.device, self.amp):
            out = self.encoder(ecg.to(self.device, torch.float32))
        return dataclasses.replace(out, tokens=out.tokens.float(), pooled=out.pooled.float())

    @torch.no_grad()
    def anchor_mean(self, ecg_tokens: torch.Tensor, ecg_pooled: torch.Tensor) -> torch.Tensor | None:
        """The ECG anchor ``(B, C, T, h, w)`` (normalised), or None with the template anchor."""
        if self.anchor_head is None:
            return None
        return self.anchor_head(ecg_tokens.to(self.device).float(), ecg_pooled.to(self.device).float())

    def initial(self, noise: torch.Tensor, mean: torch.Tensor | None = None) -> torch.Tensor:
        """Anchor sample ``z0`` (normalised latent space) for ``noise (B, C, T, h, w)``; ``mean``:
        the ECG anchor (else the template)."""
        return self.anchor.sample(noise.to(self.device), mean)

    @torch.no_grad()
    def sample_latents(self, ecg_tokens: torch.Tensor, ecg_pooled: torch.Tensor, noise: torch.Tensor,
                       sampler: str = "euler", steps: int = 10, guidance: float = 1.0) -> torch.Tensor:
        """Integrate the flow; returns normalised latents ``(B, C, T, h, w)``."""
        def model(z, t, tokens, pooled, drop):
            with autocast(self.device, self.amp):
                return self.dit(z, t, tokens, pooled, drop).float()
        guided = guided_velocity(model, ecg_tokens.to(self.device).float(), ecg_pooled.to(self.device).float(),
                                 guidance)
        mean = self.anchor_mean(ecg_tokens, ecg_pooled)
        return integrate(lambda z, t: guided(self.anchor.model_input(z, mean), t), self.initial(noise, mean),
                         steps, sampler)

    @torch.no_grad()
    def decode(self, latents_norm: torch.Tensor, chunk: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised latents -> (cine ``(B, 1, 50, 96, 96)`` in [-1, 1], VAE-scale latents), CPU."""
        latents = self.norm.denormalize(latents_norm.float())
        cines = []
        for i in range(0, latents.shape[0], chunk):
            with autocast(self.device, self.amp):      # as the VAE trained: bf16 convolutions on CUDA
                cine = self.vae.decode(latents[i:i + chunk].to(self.device))
            cines.append(cine.float().clamp(-1, 1).cpu())
        return torch.cat(cines, 0), latents.cpu()

    @torch.no_grad()
    def regress(self, ecg: torch.Tensor, cycle=None) -> Generated:
        """The ECG anchor head alone, decoded: the deterministic cross-modal autoencoder baseline
        (no noise, no flow). Needs a checkpoint trained with ``flow.anchor=ecg``."""
        if self.anchor_head is None:
            raise ValueError("this flow checkpoint has no ECG anchor head (train with flow.anchor=ecg)")
        out = cycle if cycle is not None else self.encode(ecg)
        cine, latents = self.decode(self.anchor_mean(out.tokens, out.pooled))
        return Generated.of(cine, latents, out)

    @torch.no_grad()
    def template_video(self) -> torch.Tensor:
        """The decoded template, the same anatomy in all 50 frames: ``(1, 1, 50, 96, 96)`` (the
        "template only" baseline: what generation gives with alpha 0 and no flow)."""
        c, t, h, w = self.latent_shape
        latent = self.template["template"].float().expand(c, t, h, w)[None]
        return self.vae.decode(latent.to(self.device)).float().clamp(-1, 1).cpu()

    @torch.no_grad()
    def generate(self, ecg: torch.Tensor, seeds: list[int], sampler: str = "euler", steps: int = 10,
                 guidance: float = 1.0, cycle=None) -> Generated:
        """``ecg (B, 12, 5000)`` + one seed per row -> ``Generated``. ``cycle``: a precomputed
        encoder output for these rows (skips the encoder)."""
        out = cycle if cycle is not None else self.encode(ecg)
        noise = seeded_noise_batch(seeds, self.latent_shape)
        z = self.sample_latents(out.tokens, out.pooled, noise, sampler, steps, guidance)
        cine, latents = self.decode(z)
        return Generated.of(cine, latents, out)


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------


def write_nifti(cine: np.ndarray, path: str | os.PathLike, frame_ms: float | None = None) -> None:
    """Write a cine ``(1, 50, 96, 96)`` (or ``(50, 96, 96)``) as NIfTI ``(96, 96, 1, 50)``.

    Layout follows UK Biobank long-axis exports, ``(H, W, 1, T)``: voxel ``[y, x, 0, t]`` is
    ``cine[t, y, x]``. Affine: ``PIXEL_MM`` (1.8 mm, the nominal in-plane size of a 96 x 96 crop
    of a UKB long-axis cine) in-plane, ``SLICE_MM`` (6 mm) through-plane, origin at 0; spatial
    units mm, time units ms, ``pixdim[4]`` = the generated frame interval (RR / 50) when known.
    Intensities are float32 in [-1, 1] as the model produces them. Written atomically.
    """
    import nibabel as nib

    arr = np.asarray(cine, dtype=np.float32)
    if arr.ndim == 4:
        arr = arr[0]
    vol = np.ascontiguousarray(arr.transpose(1, 2, 0)[:, :, None, :])          # (H, W, 1, T)
    affine = np.diag([PIXEL_MM, PIXEL_MM, SLICE_MM, 1.0])
    img = nib.Nifti1Image(vol, affine)
    img.header.set_xyzt_units("mm", "msec")
    zooms = (PIXEL_MM, PIXEL_MM, SLICE_MM, float(frame_ms) if frame_ms else 1.0)
    img.header.set_zooms(zooms)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.nii.gz")
    nib.save(img, str(tmp))
    os.replace(tmp, path)


def save_npy(array: np.ndarray, path: str | os.PathLike) -> None:
    """Atomic ``np.save``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, np.asarray(array, dtype=np.float32))
    os.replace(tmp, path)
