"""Reading the official checkpoint files into the official-compatible networks.

What the official training scripts save (``torch.save`` of a dict; no EMA anywhere)::

    stage 1 (train_ecg.py)       {"epoch", "model_state_dict": {"encoder.*", "decoder.*"},
                                  "optimizer_state_dict", "scheduler_state_dict", "scaler_state_dict", "best_val"}
    stage 2 (train_disentangle_vae3d.py)
                                 {"epoch", "model_state_dict": {"encoder_3d.*", "decoder.*", "quant_conv.*",
                                  "post_quant_conv.*", "loss.*" (LPIPS, discriminator, logvar)},
                                  "optimizer_state_dict", "optimizer_d_state_dict", ..., "global_step"}
    stage 3 (train_flow.py)      {"epoch", "model_state_dict": the DiT, "encoder_state_dict": the ECG
                                  encoder as fine-tuned with it, "optimizer_state_dict", ..., "val_loss"}
    template                     a bare tensor (1, C, 1, h, w): the mean train latent over subjects and frames

Each file may also be a bare state dict (what ``model.state_dict()`` gives), and keys may carry
``module.`` prefixes (DistributedDataParallel). Files are read with ``torch.load(weights_only=True)``:
tensors and plain containers only, so a file cannot run code.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..utils.checkpoint import state_dict_mismatch

PREFIXES = ("module.", "_orig_mod.")        # DistributedDataParallel, torch.compile
STATE_KEYS = ("model_state_dict", "state_dict", "model")
UNUSED_VAE = ("loss.",)                     # the training loss: LPIPS, discriminator, logvar
UNUSED_VAE_PARTS = (".temb_proj.",)         # the residual blocks' time projection: no forward uses it


class OfficialCheckpointError(ValueError):
    """An official file whose layout or contents do not fit what the converter expects."""


def load_file(path: str | os.PathLike) -> object:
    """``torch.load(weights_only=True)`` with a clear message when the file is missing or holds
    more than tensors and plain containers."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"'{path}' not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:            # noqa: BLE001 - the unpickler raises several types
        raise OfficialCheckpointError(
            f"'{path}' could not be read with torch.load(weights_only=True): {err}. The official "
            "checkpoints hold only tensors, numbers and dicts; a file that needs full unpickling is "
            "not one of them (or re-save its state dict: torch.save(ckpt['model_state_dict'], ...))") from None


def is_state_dict(obj: object) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) for k in obj) \
        and all(isinstance(v, torch.Tensor) for v in obj.values())


def strip_prefixes(state: dict) -> dict:
    """Remove leading ``module.`` / ``_orig_mod.`` (any number, any order) from every key."""
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


def describe(obj: object, limit: int = 12) -> str:
    """A short account of what a loaded file holds (for error messages)."""
    if isinstance(obj, torch.Tensor):
        return f"a bare tensor of shape {tuple(obj.shape)}"
    if not isinstance(obj, dict):
        return f"a {type(obj).__name__}"
    keys = list(obj)
    kinds = {k: ("tensor" if isinstance(v, torch.Tensor) else "dict" if isinstance(v, dict) else type(v).__name__)
             for k, v in list(obj.items())[:limit]}
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return "a dict with keys " + ", ".join(f"'{k}' ({kinds[k]})" for k in keys[:limit]) + more


def state_from(obj: object, path, what: str, expected: str, keys: tuple[str, ...] = STATE_KEYS) -> dict:
    """The state dict inside ``obj``: under the first of ``keys`` present, or ``obj`` itself when it
    is a bare state dict; prefixes stripped. Anything else stops with what was found."""
    if isinstance(obj, dict):
        for key in keys:
            if is_state_dict(obj.get(key)):
                return strip_prefixes(obj[key])
    if is_state_dict(obj):
        return strip_prefixes(obj)
    raise OfficialCheckpointError(f"'{path}' ({what}): found {describe(obj)}; expected {expected}")


def split_prefix(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _examples(keys, limit: int = 6) -> str:
    keys = sorted(keys)
    return ", ".join(f"'{k}'" for k in keys[:limit]) + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def load_into(module: nn.Module, state: dict, path, what: str, sizes_hint: str) -> None:
    """Load ``state`` into ``module`` strictly; a mismatch stops naming the missing, unexpected and
    wrongly shaped keys and the command-line sizes to check (``sizes_hint``)."""
    expected = module.state_dict()
    missing, unexpected, differ = state_dict_mismatch(expected, state)
    shapes = [f"'{k}' {file_shape} in the file, {own_shape} expected" for k, file_shape, own_shape in differ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} keys missing: {_examples(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {_examples(unexpected)}")
        if shapes:
            parts.append(f"{len(shapes)} shapes differ: " + "; ".join(shapes[:4]) + (" ..." if len(shapes) > 4 else ""))
        raise OfficialCheckpointError(f"'{path}' ({what}) does not fit the network built from the given sizes: "
                                      + "; ".join(parts) + f". The sizes come from the command line: {sizes_hint}")
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})


# ----------------------------------------------------------------------------------------------
# The four files
# ----------------------------------------------------------------------------------------------


def read_stage1(path) -> tuple[dict, dict | None, dict]:
    """Stage-1 file -> (encoder state, decoder state or None, info). Accepts the training dict,
    ``{"encoder": state}``, a bare ``encoder.*``/``decoder.*`` state dict or a bare encoder one."""
    obj = load_file(path)
    expected = ("the stage-1 training dict {'model_state_dict': {'encoder.*', 'decoder.*'}, ...} or a bare "
                "state dict of the official ECGEncoder (keys like 'stem.0.weight', 'layer1.0.conv1.weight')")
    state = state_from(obj, path, "stage-1 ECG encoder", expected, STATE_KEYS + ("encoder",))
    encoder, decoder = split_prefix(state, "encoder."), split_prefix(state, "decoder.")
    if not encoder:
        if "stem.0.weight" not in state:
            raise OfficialCheckpointError(f"'{path}' (stage-1 ECG encoder): found keys {_examples(state)}; "
                                          f"expected {expected}")
        encoder, decoder = state, {}
    other = set(state) - {f"encoder.{k}" for k in encoder} - {f"decoder.{k}" for k in decoder}
    if decoder and other:
        raise OfficialCheckpointError(f"'{path}' (stage-1 ECG encoder): keys outside encoder.* / decoder.*: "
                                      f"{_examples(other)}; expected {expected}")
    return encoder, (decoder or None), _info(obj)


def read_stage2(path) -> tuple[dict, dict]:
    """Stage-2 file -> (VAE state without the unused entries, info with the dropped key count)."""
    obj = load_file(path)
    expected = ("the stage-2 training dict {'model_state_dict': {'encoder_3d.*', 'decoder.*', 'quant_conv.*', "
                "'post_quant_conv.*', 'loss.*'}, ...} or a bare state dict of the official VAE3d")
    state = state_from(obj, path, "stage-2 VAE", expected)
    if "quant_conv.weight" not in state or not any(k.startswith("encoder_3d.") for k in state):
        raise OfficialCheckpointError(f"'{path}' (stage-2 VAE): found keys {_examples(state)}; expected {expected}")
    kept = {k: v for k, v in state.items()
            if not k.startswith(UNUSED_VAE) and not any(part in k for part in UNUSED_VAE_PARTS)}
    info = _info(obj)
    info["dropped_keys"] = len(state) - len(kept)
    return kept, info


def read_stage3(path) -> tuple[dict, dict | None, dict]:
    """Stage-3 file -> (DiT state, fine-tuned encoder state or None, info)."""
    obj = load_file(path)
    expected = ("the stage-3 training dict {'model_state_dict': the DiT, 'encoder_state_dict': the fine-tuned "
                "ECG encoder, ...} or a bare state dict of the official ECG_DiT (keys like 'x_embedder.weight', "
                "'pos_embed', 'blocks.0.attn_spatial.in_proj_weight')")
    state = state_from(obj, path, "stage-3 flow DiT", expected)
    if "x_embedder.weight" not in state or "pos_embed" not in state:
        raise OfficialCheckpointError(f"'{path}' (stage-3 flow DiT): found keys {_examples(state)}; "
                                      f"expected {expected}")
    encoder = None
    if isinstance(obj, dict) and obj.get("encoder_state_dict") is not None:
        encoder = state_from({"e": obj["encoder_state_dict"]}, path, "fine-tuned ECG encoder",
                             "'encoder_state_dict' to be the official ECGEncoder's state dict", ("e",))
        encoder = split_prefix(encoder, "encoder.") or encoder
    return state, encoder, _info(obj)


def read_template(path, channels: int, size: int) -> torch.Tensor:
    """Template file -> ``(C, 1, h, w)`` float32. Accepts ``(1, C, 1, h, w)`` (as the official code
    saves it), ``(C, 1, h, w)``, ``(C, h, w)``, or a dict holding one under ``template``."""
    obj = load_file(path)
    if isinstance(obj, dict) and isinstance(obj.get("template"), torch.Tensor):
        obj = obj["template"]
    expected = (f"a tensor (1, {channels}, 1, {size}, {size}) (or ({channels}, 1, {size}, {size}), "
                f"({channels}, {size}, {size}))")
    if not isinstance(obj, torch.Tensor):
        raise OfficialCheckpointError(f"'{path}' (anatomy template): found {describe(obj)}; expected {expected}")
    t = obj.detach().float()
    if t.dim() == 5 and t.shape[0] == 1:
        t = t[0]
    elif t.dim() == 3:
        t = t.unsqueeze(1)
    if t.dim() != 4 or tuple(t.shape) != (channels, 1, size, size):
        raise OfficialCheckpointError(f"'{path}' (anatomy template): found a tensor of shape {tuple(obj.shape)}; "
                                      f"expected {expected} (--latent-channels, --latent-size)")
    return t.contiguous()


def _info(obj: object) -> dict:
    """The plain training facts a file carries (epoch, losses), for the conversion record."""
    if not isinstance(obj, dict):
        return {}
    return {k: (float(v) if isinstance(v, float) else v) for k, v in obj.items()
            if k in ("epoch", "global_step", "best_val", "val_loss") and isinstance(v, (int, float))}
