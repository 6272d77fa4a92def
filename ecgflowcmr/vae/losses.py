"""Stage-2 losses: L1 + KL + frame-wise LPIPS + hinge PatchGAN with the adaptive weight.

Scaling. Stable Diffusion's VAE loss sums the reconstruction error over pixels and the KL over
latents per sample, with ``kl_weight = 1e-6``. Here the reconstruction terms are *means* over
pixels (so learning rates do not depend on the video size) and the KL sum is divided by the number
of pixels of the video: the ratio between the two is exactly SD's, so ``kl_weight = 1e-6`` means the
same thing. The GAN term needs no such care: the adaptive weight rescales it to the gradient of
the reconstruction terms at the decoder's last layer.

LPIPS weights. ``lpips`` (AlexNet) needs two files and may not download either:
* the torchvision ImageNet AlexNet ``alexnet-owt-7be5be79.pth``, looked up in ``eval.weights_dir``
  and the torch hub checkpoint folder (``~/.cache/torch/hub/checkpoints`` by default);
* the LPIPS linear heads ``weights/v0.1/alex.pth``, shipped inside the ``lpips`` wheel (also
  accepted as ``lpips_alex_v0.1.pth`` in the weights folder).
If either is missing, ``build_lpips`` raises ``MissingWeightsError`` naming the file, its URL and
where to put it. It never falls back to random weights.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
ALEXNET_URL = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"
LPIPS_LIN_URL = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/alex.pth"
# torchvision alexnet.features index -> the lpips slice that holds it
_ALEX_SLICE = {0: 1, 3: 2, 6: 3, 8: 4, 10: 5}


class MissingWeightsError(FileNotFoundError):
    """Pretrained weights that cannot be downloaded here are not where we looked."""


def build_lpips(weights_dir: str | os.PathLike | None = "") -> nn.Module:
    """LPIPS (AlexNet trunk, v0.1 linear heads) with pretrained weights, frozen, in eval mode.

    The AlexNet file is found the way ``evaluation.py`` finds it (``ecgflowcmr.metrics.weights``:
    ``eval.weights_dir``, default the torch hub checkpoint folder, sha256 prefix checked).
    """
    import warnings

    from ..metrics.weights import WeightsUnavailable, load_strict, resolve

    try:
        alex_path = resolve("lpips_alex", weights_dir).path
    except WeightsUnavailable as err:
        raise MissingWeightsError(
            f"vae.perceptual_weight > 0 needs LPIPS: {err} (file '{ALEXNET_FILE}', from {ALEXNET_URL}). "
            f"Set eval.weights_dir to the folder holding it, or train without the perceptual loss "
            f"with vae.perceptual_weight=0.") from None
    import lpips

    lin_path = Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth"
    if not lin_path.is_file():
        raise MissingWeightsError(f"the lpips package lacks its linear weights '{lin_path}'; reinstall "
                                  f"lpips or put {LPIPS_LIN_URL} there")
    with warnings.catch_warnings():  # torchvision's "pretrained is deprecated" (we pass no weights)
        warnings.simplefilter("ignore")
        model = lpips.LPIPS(pretrained=False, net="alex", pnet_rand=True, verbose=False)
    alex = torch.load(alex_path, map_location="cpu", weights_only=True)
    trunk = {}
    for key, value in alex.items():
        parts = key.split(".")
        if parts[0] == "features" and int(parts[1]) in _ALEX_SLICE:
            trunk[f"slice{_ALEX_SLICE[int(parts[1])]}.{parts[1]}.{parts[2]}"] = value
    load_strict(model.net, trunk, str(alex_path))
    lin = torch.load(lin_path, map_location="cpu", weights_only=True)
    heads = nn.ModuleList(model.lins)
    load_strict(heads, {k.replace("lin", "", 1): v for k, v in lin.items() if k.startswith("lin")},
                str(lin_path))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def framewise_lpips(lpips_model: nn.Module, x_hat: torch.Tensor, x: torch.Tensor,
                    frames: int = 0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mean LPIPS over frames. x_hat, x ``(B, 1, T, H, W)`` in [-1, 1]; ``frames > 0``: that many
    random frames per video (same frames for both)."""
    b, c, t, h, w = x.shape
    if 0 < frames < t:
        idx = torch.stack([torch.randperm(t, generator=generator)[:frames] for _ in range(b)])
        idx = idx.to(x.device)[:, None, :, None, None].expand(b, c, frames, h, w)
        x_hat, x = torch.gather(x_hat, 2, idx), torch.gather(x, 2, idx)
        t = frames
    to_img = lambda v: v.transpose(1, 2).reshape(b * t, c, h, w).expand(-1, 3, -1, -1)
    return lpips_model(to_img(x_hat), to_img(x)).mean()


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())


def adaptive_weight(nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4) -> torch.Tensor:
    """``||dnll/dW|| / (||dg/dW|| + 1e-4)`` at the decoder's last layer W (taming / SD), detached."""
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = torch.norm(nll_grad.float()) / (torch.norm(g_grad.float()) + 1e-4)
    return torch.clamp(weight, 0.0, max_weight).detach()


def kl_per_pixel(posterior, x: torch.Tensor) -> torch.Tensor:
    """Batch mean of the KL summed over latents, divided by the pixels of one video."""
    return posterior.kl().mean() / float(x[0].numel())
