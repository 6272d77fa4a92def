"""Experiment configuration: dataclasses <-> YAML, dotted overrides, validation.

One YAML per experiment (``configs/demo.yaml``, ``configs/ukb.yaml``) with run-level keys
(``name``, ``run_dir``, ``device``, ``seed``) and one section per stage. Every script does::

    cfg = load_config("configs/demo.yaml", ["flow.lr=2e-4", "device=cpu"])

An unknown key, a value of the wrong type, or an impossible value raises ``ConfigError``
naming the dotted key. ``cfg.to_dict()`` is a plain-Python dict, safe to store in
checkpoints (``torch.load(..., weights_only=True)``) and written beside each stage's outputs.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import contract


class ConfigError(ValueError):
    """A config key is unknown, has the wrong type, or an impossible value."""


# ----------------------------------------------------------------------------------------------
# Sections. Fields are grouped: what the data/model is, then how it is trained.
# ----------------------------------------------------------------------------------------------


@dataclass
class TrainLoop:
    """Optimisation knobs shared by the three training stages."""

    epochs: int = 10
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 100
    grad_clip: float = 1.0          # max global grad norm; <= 0 disables clipping
    amp: bool = True                # bf16 autocast, CUDA only (ignored on CPU)
    num_workers: int = 0            # DataLoader workers
    log_every: int = 20             # steps between log lines
    val_every: int = 1              # epochs between validations
    max_steps: int = 0              # > 0: stop after this many optimiser steps (smoke runs)


@dataclass
class DataConfig:
    root: str = ""                  # prepared dataset folder; "" -> <run_dir>/data
    manifest: str = ""              # manifest CSV for prepare_data.py; "" -> <phantom_dir>/manifest.csv
    phantom_dir: str = ""           # where the phantom is generated; "" -> <run_dir>/phantom
    phantom_n: int = 128            # subjects generated when the phantom is missing
    phantom_seed: int = 0
    phantom_version: int = 1        # phantom generator: 1 (the benchmark tables so far), 2 (UK Biobank-like
                                    # timing, coupling scatter, image and layout: docs/phantom_realism.md)
    phantom_prevalence: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])  # version 2 only:
                                    # normal / dilated / hypertrophic shares (version 1 is 2:1:1 by design)
    split_fractions: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])  # train/val/test
    split_seed: int = 0
    num_frames: int = contract.NUM_FRAMES    # cine frames per R-R cycle (fixed by the contract)
    image_size: int = contract.IMAGE_SIZE    # cine H = W (fixed)
    ecg_fs: int = contract.ECG_FS            # Hz (fixed)
    ecg_seconds: float = contract.ECG_SECONDS  # (fixed: 10 s -> 5000 samples)
    ecg_length_tolerance_s: float = 0.5  # records within this of 10 s are cropped/padded; else refused
    crop_mm: float = 0.0            # cine crop around the heart: 0 = 0.75 of the shorter image side; > 0 = a
                                    # square of this many mm (NIfTI pixel size), one physical scale for any FOV
    workers: int = 2                # processes for phantom generation / preparation
    unpaired_ecg: str = ""          # ECG-only records for stage 1 (self-supervised; stages 2-3 need pairs): a
                                    # folder of ECG files or a CSV with ecg_path[, subject_id]; prepare_data.py
                                    # reads them with the same readers and QC into <data root>/unpaired
    ukb_bulk: str = ""              # a folder of UK Biobank bulk files ({eid}_20208_{instance}_0.zip DICOM cines,
                                    # {eid}_20205_{instance}_0.xml ECGs): prepare_data.py pairs and reads them and
                                    # writes the manifest itself (<run_dir>/ukb/); docs/ukb.md
    ukb_instance: int = 2           # the visit paired: 2 first imaging visit, 3 repeat imaging visit
    ukb_missing_frames: str = "reject"  # a cine with fewer frames than CardiacNumberOfImages: reject | fill (up
                                    # to 10 % of the frames interpolated in time, flagged in the QC report)


@dataclass
class ECGConfig(TrainLoop):
    """Stage 1, PA-MAE."""

    arch: str = "project"           # project | official (the published weights' ResNet encoder, ecgflowcmr/official/;
                                    # written by convert_official: it reads width and base_filters, not depth/heads)
    width: int = 128                # feature width of the encoder (768 in ukb.yaml and the official weights)
    base_filters: int = 64          # arch official: channels of the first ResNet stage (8x that at the last)
    input_scale: float = 1.0        # arch official: the ECG in mV is multiplied by this before the encoder (no
                                    # normalisation there): 1 mV, 1000 uV, 200 UK Biobank counts at 5 uV/LSB
    depth: int = 4                  # transformer blocks after the conv stem
    heads: int = 4
    decoder_depth: int = 2
    mask_ratio: float = 0.5         # fraction of the 625 encoded positions zeroed
    phase_weight: float = 1.0       # lambda in L_rec + lambda * L_phase
    cycle_mode: str = "median"      # median | ensemble | window (ablation: fixed centre window, no cycles) |
                                    # official (arch official: the official mid-beat-to-mid-beat cut)
    num_tokens: int = 50            # aligned tokens per R-R cycle (= cine frames)
    augment: bool = True            # realistic ECG augmentation of the training records (ecg/augment.py:
                                    # noise, wander, lead gain/polarity/loss, heart rate 40-150 bpm)
    augment_fraction: float = 1.0   # share of the training records augmented (the rest pass clean)
    augment_denoise: bool = False   # reconstruct the record before noise and lead loss (not the noisy input)
    lr: float = 3e-4
    weight_decay: float = 0.05
    batch_size: int = 32


@dataclass
class VAEConfig(TrainLoop):
    """Stage 2, anisotropic 3D-VAE: 8x spatial, 1x temporal compression."""

    arch: str = "project"           # project | official (the published weights' VAE: base_channels, channel_mult,
                                    # num_res_blocks, latent_channels, z_channels; the other keys do not apply)
    z_channels: int = 0             # arch official: encoder output channels before quant_conv (0: latent_channels)
    latent_channels: int = 4
    base_channels: int = 32
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])  # 4 levels = 8x (3 levels: 2x2 patches + 4x)
    num_res_blocks: int = 1
    attention: bool = True          # factorised (spatial, then temporal) self-attention at the bottleneck
    temporal_levels: int = 4        # coarsest levels with 3x3x3 convs (finer: 1x3x3); 4 = all
    time_padding: str = "circular"  # circular (the cine is one R-R cycle) | replicate | zeros
    kl_weight: float = 1e-6         # on the KL summed over latents, per pixel (SD's sum-loss ratio)
    perceptual_weight: float = 0.0  # > 0 needs LPIPS weights in eval.weights_dir
    perceptual_frames: int = 0      # LPIPS on this many random frames per video (0: all frames)
    disc_weight: float = 0.5
    disc_start: int = 1000          # optimiser steps before the PatchGAN switches on
    disc_lr: float = 1e-4
    disc_channels: int = 64         # PatchGAN width (first layer)
    disc_layers: int = 3            # PatchGAN stride-2 (spatial) layers
    clip_frames: int = 0            # train on random cyclic clips of this many frames (0: whole cycle)
    ckpt_every: int = 0             # steps between mid-epoch last.pt saves (0: at epoch ends only)
    lr: float = 2e-4
    batch_size: int = 4


@dataclass
class FlowConfig(TrainLoop):
    """Stage 3, Anatomy-Motion Disentangled Flow (DiT over VAE latents)."""

    arch: str = "project"           # project | official (the published weights' DiT: hidden, depth, heads, mlp_ratio;
                                    # patch_size 1)
    hidden: int = 128               # 512 in ukb.yaml
    depth: int = 4                  # 8 in ukb.yaml
    heads: int = 4                  # 8 in ukb.yaml
    patch_size: int = 1             # spatial patch size over the 12x12 latent: 1 or 2
    mlp_ratio: float = 4.0
    grad_checkpoint: bool = False   # recompute each DiT block in backward: saved activations ~1/depth, ~+1/3
                                    # compute (benchmarks/gpu_plan.py says when a batch needs it)
    alpha: float = 1.0              # z0 = template + alpha * eps (in per-channel normalised latent units)
    use_template: bool = True       # False: z0 = eps (ablation "without template anchor")
    anchor: str = "template"        # template: z0 = template + alpha * eps (the paper); ecg: z0 = head(ECG)
                                    # + alpha * eps, a light head regressing the latent video from the ECG
                                    # tokens (flow/anchor.py), fitted first, then frozen while the flow trains
    anchor_residual: bool = False   # True: the DiT sees z_t - head(ECG), not z_t. Lower validation loss, but
                                    # worse cines on the phantom bench (docs/flow_levers.md), so off
    anchor_hidden: int = 128        # width of that head
    anchor_steps: int = 500         # its fitting steps (cached tokens: seconds on CPU)
    anchor_lr: float = 2e-3
    anchor_fit: str = "sgd"         # sgd: the head above, fitted by gradient steps with early stopping; ridge:
                                    # the whole latent video linear in the pooled condition, fitted in closed
                                    # form, its L2 strength chosen on the val split (flow/anchor.py RidgeAnchor)
    morphology_dims: int = 0        # k > 0: the pooled condition also carries k numbers read from the raw ECG
                                    # (whitened PCA of the median beats of the 12 leads at stage 1's R-peaks,
                                    # fitted on the training ECGs: ecg/morphology.py); 0 = stage 1's alone
    morphology_code: str = "pca"    # its axes: pca (the median beats' principal components) | latent (the
                                    # directions of the training cines' latents the median beats predict best,
                                    # reduced-rank ridge; training rows read out-of-fold codes) | latent_motion
                                    # (the same on the latents' motion: each latent minus its mean over frames)
    morphology_in: str = "both"     # who reads the code: both (the DiT's adaLN and the ECG anchor) | anchor
    morphology_noise: float = 0.0   # SD of Gaussian noise added to the (unit-variance) code the DiT reads in
                                    # training steps: conditioning augmentation against memorising each
                                    # subject's k numbers; the anchor, validation and generation read it clean
    balance_by: str = ""            # a column of the prepared subjects.csv (a diagnosis, a phenotype class):
                                    # training subjects are drawn with probability proportional to
                                    # count(their value) ** -balance_power, so rare phenotypes come up more
                                    # often; "" = every subject once an epoch (the paper)
    balance_power: float = 1.0      # 1: every value drawn equally often; 0.5: shares as the square roots of
                                    # the counts; 0: as in the data
    snapshot_steps: list[int] = field(default_factory=list)  # also save the EMA weights at these steps
                                    # (flow/snapshots/step_NNNNNN.pt, loadable like best.pt): learning curves
    motion_weight: float = 0.0      # extra loss weight on the motion part of the latent (the latent minus its
                                    # time mean), the part the ECG determines; 0 = the paper's plain MSE
    t_sampling: str = "uniform"     # uniform | logit_normal
    cfg_drop: float = 0.1           # probability of replacing the ECG tokens by the null condition
    ema_decay: float = 0.999
    ecg_finetune: bool = False      # fine-tune the stage-1 encoder (else frozen)
    ecg_lr: float = 1e-5            # lr of the encoder when fine-tuned
    val_subjects: int = 0           # validate on this many fixed val subjects, evenly spread (0: all); with
                                    # flow.val_every, what validation costs against training
    sample_every: int = 0           # epochs between sample previews of 2 val subjects (0: never; the
                                    # last epoch always previews when > 0): runs/<exp>/flow/previews/
    lr: float = 2e-4
    batch_size: int = 16


@dataclass
class InferConfig:
    """Stage 4, ECG-only generation."""

    sampler: str = "euler"          # euler | heun | midpoint | euler_mid (Euler steps with the velocity at each
                                    # step's mid time (i + 0.5) / steps, as the official inference)
    steps: int = 10
    guidance: float = 1.0           # classifier-free guidance scale (1 = conditional only)
    num_samples: int = 1            # variations per ECG
    seed: int = 0
    batch_size: int = 8
    checkpoint: str = ""            # "" -> <run_dir>/flow/best.pt
    out_dir: str = ""               # "" -> <run_dir>/samples
    previews: bool = True


@dataclass
class EvalConfig:
    weights_dir: str = ""           # "" -> torch hub checkpoint folder
    fid_variant: str = "standard"   # standard (TF-ported Inception) | paper (torchvision IMAGENET1K_V1)
    fvd_variant: str = "standard"   # standard (StyleGAN-V I3D) | paper (VideoGPT i3d_pretrained_400)
    bootstrap: int = 0              # bootstrap resamples for confidence intervals (0: none)
    batch_size: int = 16
    out_dir: str = ""               # "" -> <run_dir>/eval


@dataclass
class DownstreamConfig:
    """``downstream.py``: MAE pretraining on real + synthetic cines, CV fine-tuning on labelled subjects."""

    # -- data: who is labelled, who pretrains, where the synthetic pool comes from
    label_splits: list[str] = field(default_factory=lambda: ["val", "test"])  # labelled (scored) subjects
    labelled_n: int = 0             # > 0: a seeded subset of that many labelled subjects (scarcity); 0: all
    pretrain_splits: list[str] = field(default_factory=lambda: ["train"])  # real pretraining cines (minus
                                    # every labelled subject)
    real_n: int = 0                 # > 0: a seeded subset of that many real pretraining cines (CMRs are
                                    # scarce, ECGs are not); synthetic ratios are % of this count
    class_column: str = "class"     # subjects.csv column of the class ("" : no classification tasks)
    normal_class: str = "normal"    # the reference class of the "disease vs normal" cohorts
    regression_columns: list[str] = field(
        default_factory=lambda: ["lv_ed_area_mm2", "ef_area", "wall_thickness_mm", "rv_ed_area_mm2"])
    pool: str = ""                  # ECG-only pool: a folder of ECG files or a manifest CSV (ecg_path
                                    # [, oracle_cmr_path]); "" -> <phantom_dir>/ecg_only/manifest.csv
    pool_n: int = 0                 # with pool "": ECG-only phantom subjects written there if missing
    label_pool: bool = False        # also label the pool subjects that no row draws, with their true
                                    # cines and the manifest's label columns (the phantom's pool has
                                    # both): more scored subjects, none ever seen by any stage
    sources: list[str] = field(default_factory=lambda: ["generator", "nearest", "template", "oracle"])
    ratios: list[int] = field(default_factory=lambda: [0, 100, 200, 300])  # synthetic count, % of the real
                                    # pretraining count; 0 = MAE on real cines only
    scratch: bool = True            # also the ViT trained from scratch (no pretraining)
    samples_per_ecg: int = 1        # K generated cines per pool ECG (generator source)
    flow_checkpoint: str = ""       # "" -> <run_dir>/flow/best.pt (generator, nearest, template sources)
    # -- the video ViT (input is resampled to frames x image_size^2 before the tubelets)
    frames: int = 50
    image_size: int = 96
    tubelet: int = 2                # frames per tubelet
    patch: int = 16                 # pixels per tubelet side
    width: int = 192
    depth: int = 6
    heads: int = 3
    mlp_ratio: float = 4.0
    decoder_width: int = 128
    decoder_depth: int = 2
    decoder_heads: int = 4
    mask_ratio: float = 0.9         # tube masking: this fraction of spatial patches hidden in every frame
    # -- pretraining (one run per source x ratio; steps equal for every row)
    pretrain_steps: int = 2000
    pretrain_batch: int = 16
    pretrain_lr: float = 1.5e-4
    pretrain_warmup: int = 100
    weight_decay: float = 0.05
    ckpt_every: int = 200           # steps between resumable checkpoints of a pretraining run
    # -- fine-tuning (k-fold CV; one model per fold fits the class and every phenotype together)
    folds: int = 5
    finetune_epochs: int = 30
    finetune_batch: int = 8
    finetune_lr: float = 5e-4
    regression_weight: float = 1.0  # loss = CE(class) + weight * MSE(standardised phenotypes)
    probe: str = "finetune"         # finetune: the whole ViT; linear: the frozen encoder's pooled
                                    # features -> L2 logistic regression (class) and ridge (phenotypes)
    probe_l2: float = 1.0e-2        # linear probe: L2 penalty on standardised features
    seed: int = 0
    out_dir: str = ""               # "" -> <run_dir>/downstream


@dataclass
class Config:
    name: str = "demo"
    run_dir: str = ""               # "" -> runs/<name>
    device: str = "auto"            # auto | cpu | cuda | cuda:N
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    ecg: ECGConfig = field(default_factory=ECGConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    downstream: DownstreamConfig = field(default_factory=DownstreamConfig)

    # -- derived paths (one place decides where things live) ---------------------------------
    @property
    def run_path(self) -> Path:
        return Path(self.run_dir or os.path.join("runs", self.name))

    @property
    def data_root(self) -> Path:
        return Path(self.data.root) if self.data.root else self.run_path / "data"

    @property
    def unpaired_root(self) -> Path:
        """Where ``prepare_data.py`` puts the ECG-only records of ``data.unpaired_ecg``."""
        return self.data_root / "unpaired"

    @property
    def phantom_path(self) -> Path:
        return Path(self.data.phantom_dir) if self.data.phantom_dir else self.run_path / "phantom"

    @property
    def manifest_path(self) -> Path:
        return Path(self.data.manifest) if self.data.manifest else self.phantom_path / "manifest.csv"

    def stage_dir(self, stage: str) -> Path:
        """``runs/<exp>/<stage>`` for stage in ecg, vae, latents, flow, samples, eval."""
        return self.run_path / stage

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> Config:
        _validate(self)
        return self


# ----------------------------------------------------------------------------------------------
# Loading, overrides, type checking
# ----------------------------------------------------------------------------------------------


def _check_type(key: str, value: Any, annotation: Any) -> Any:
    """Return ``value`` coerced to ``annotation`` (int -> float allowed), or raise ConfigError."""
    origin = typing.get_origin(annotation)
    if origin in (list, tuple):
        (item_type,) = typing.get_args(annotation)[:1] or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        return [_check_type(f"{key}[{i}]", v, item_type) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            try:
                return _check_type(key, value, arg)
            except ConfigError:
                pass
        raise ConfigError(f"config key '{key}': {value!r} is not of type {annotation}")
    if annotation is Any:
        return value
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        try:  # YAML 1.1 reads "2e-4" (no dot) as a string
            return float(value)
        except ValueError:
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}") from None
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
    if annotation is int and isinstance(value, bool):
        raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
    if isinstance(annotation, type) and not isinstance(value, annotation):
        raise ConfigError(
            f"config key '{key}': expected {annotation.__name__}, got {type(value).__name__} {value!r}")
    return value


def _fill(obj: Any, values: dict, prefix: str = "") -> None:
    """Set dataclass ``obj`` fields from ``values`` recursively, checking keys and types."""
    if not isinstance(values, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in values.items():
        dotted = prefix + key
        if key not in names:
            close = ", ".join(sorted(names))
            raise ConfigError(f"unknown config key '{dotted}' (known here: {close})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _fill(current, value, dotted + ".")
        else:
            setattr(obj, key, _check_type(dotted, value, hints[key]))


def section_from_dict(section: str, values: dict) -> Any:
    """The validated ``Config`` section ``section`` ("ecg", "vae", ...) from a checkpoint's stored
    ``config[section]``: how a model is rebuilt with the constructor arguments it was trained with.
    Keys a checkpoint predates keep their defaults; an unknown key is an error naming it."""
    obj = getattr(Config(), section)
    _fill(obj, dict(values), section + ".")
    return obj


def section_values(section: Any) -> dict:
    """A config section as a dict, whether given as its dataclass (``cfg.vae``) or as the dict a
    checkpoint stores (``ckpt["config"]["vae"]``); anything else is a ``TypeError``."""
    if dataclasses.is_dataclass(section):
        return dataclasses.asdict(section)
    if not isinstance(section, Mapping):
        raise TypeError(f"expected a config section (dataclass or dict), got {type(section).__name__}")
    return dict(section)


def config_diffs(old: dict, new: dict, section: str, resumable: set[str] | frozenset[str] = frozenset(),
                 also: tuple[str, ...] = ("seed",)) -> list[str]:
    """The differences between a checkpoint's config ``old`` and this run's ``new`` (``to_dict()``s)
    that make them different runs: the keys of ``section`` except ``resumable``, and the dotted keys
    ``also``. A key the checkpoint predates counts as its default (new keys default to the old behaviour)."""
    defaults = Config().to_dict()

    def get(tree: dict, dotted: str):
        *parents, key = dotted.split(".")
        node, fallback = tree, defaults
        for name in parents:
            node, fallback = node.get(name, {}), fallback[name]
        return node.get(key, fallback[key])

    keys = [f"{section}.{k}" for k in new[section] if k not in resumable] + list(also)
    return [f"{key}: {get(old, key)!r} -> {get(new, key)!r}" for key in keys if get(old, key) != get(new, key)]


def refuse_other_config(ckpt: dict, cfg: Config, path, section: str, resumable: set[str],
                        also: tuple[str, ...] = ("seed",), advice: str = "Pass --fresh to start over") -> None:
    """Raise ``ConfigError`` naming every key in which ``cfg`` differs from the run ``ckpt`` belongs to."""
    diffs = config_diffs(ckpt.get("config", {}), cfg.to_dict(), section, resumable, also)
    if diffs:
        raise ConfigError(f"'{path}' was written with a different configuration ({'; '.join(diffs)}). "
                          f"{advice}, or choose another run_dir=.")


def parse_overrides(overrides: list[str]) -> dict:
    """``["flow.lr=2e-4", "device=cpu"]`` -> nested dict with YAML-parsed values."""
    nested: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return nested


def config_from_dict(values: dict) -> Config:
    cfg = Config()
    _fill(cfg, values)
    return cfg.validate()


def _merge(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``: sections merge key by key, any other value (lists too) replaces."""
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_config_file(path: str | os.PathLike, _chain: tuple[Path, ...] = ()) -> dict:
    """A YAML experiment file as a dict, its ``base:`` (a path relative to the file) resolved first:
    an experiment states only how it differs from the one it builds on. Bases chain; a loop is an error."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' not found" + (f" (base of '{_chain[-1]}')" if _chain else ""))
    if path.resolve() in _chain:
        raise ConfigError(f"config base loop: {' -> '.join(str(p) for p in (*_chain, path.resolve()))}")
    with open(path) as f:
        values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: a config file holds sections and keys, got {type(values).__name__}")
    base = values.pop("base", None)
    if base is None:
        return values
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: config key 'base' must be the path of another config file, got {base!r}")
    return _merge(read_config_file(path.parent / base, (*_chain, path.resolve())), values)


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML experiment file (and the ``base:`` files it builds on), apply dotted overrides, validate."""
    cfg = Config()
    if path is not None:
        values = read_config_file(path)
        try:
            _fill(cfg, values)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
    if overrides:
        _fill(cfg, parse_overrides(overrides))
    return cfg.validate()


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config (every key, defaults included) as YAML."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': {message}")


ARCHS = ("project", "official")


def _validate(cfg: Config) -> None:
    """Every section's values, section by section; the first bad key raises ``ConfigError``."""
    _require(cfg.device == "auto" or cfg.device == "cpu" or cfg.device.startswith("cuda"),
             "device", f"must be auto, cpu, cuda or cuda:N, got {cfg.device!r}")
    _validate_data(cfg.data)
    _validate_training(cfg)
    _validate_ecg(cfg.ecg, cfg.data)
    _validate_vae(cfg.vae, cfg.data)
    _validate_flow(cfg.flow, cfg.ecg)
    _validate_infer_eval(cfg.infer, cfg.eval)
    _validate_downstream(cfg.downstream)


def _validate_data(d: DataConfig) -> None:
    """``data``: the contract's shapes and rates, the phantom, UK Biobank bulk files."""
    _require(len(d.split_fractions) == 3 and all(x >= 0 for x in d.split_fractions)
             and abs(sum(d.split_fractions) - 1) < 1e-6,
             "data.split_fractions", "must be three non-negative numbers summing to 1")
    _require(d.num_frames == contract.NUM_FRAMES, "data.num_frames",
             f"the cine contract is {contract.NUM_FRAMES} frames per R-R cycle")
    _require(d.image_size == contract.IMAGE_SIZE, "data.image_size",
             f"the cine contract is {contract.IMAGE_SIZE} x {contract.IMAGE_SIZE}")
    _require(d.ecg_fs == contract.ECG_FS, "data.ecg_fs", f"the ECG contract is {contract.ECG_FS} Hz")
    _require(d.ecg_seconds == contract.ECG_SECONDS, "data.ecg_seconds",
             f"the ECG contract is {contract.ECG_SECONDS:g} s")
    _require(d.phantom_n >= 1, "data.phantom_n", "must be >= 1")
    _require(d.phantom_version in (1, 2), "data.phantom_version", f"must be 1 or 2, got {d.phantom_version}")
    _require(len(d.phantom_prevalence) == 3 and all(x >= 0 for x in d.phantom_prevalence)
             and abs(sum(d.phantom_prevalence) - 1) < 1e-6,
             "data.phantom_prevalence",
             "must be three non-negative shares (normal, dilated, hypertrophic) summing to 1")
    _require(d.ecg_length_tolerance_s >= 0, "data.ecg_length_tolerance_s", "must be >= 0")
    _require(d.crop_mm >= 0, "data.crop_mm", "must be >= 0 (0: the relative crop)")
    _require(d.ukb_instance in (2, 3), "data.ukb_instance",
             f"must be 2 (first imaging visit) or 3 (repeat imaging visit), got {d.ukb_instance}")
    _require(d.ukb_missing_frames in ("reject", "fill"), "data.ukb_missing_frames",
             f"must be reject or fill, got {d.ukb_missing_frames!r}")
    _require(not (d.ukb_bulk and d.manifest), "data.ukb_bulk",
             "set either data.ukb_bulk (the manifest is then written for you) or data.manifest, not both")


def _validate_training(cfg: Config) -> None:
    """What the three trained stages share: loop sizes, schedule, architecture family."""
    for sec_name in ("ecg", "vae", "flow"):
        sec = getattr(cfg, sec_name)
        for key in ("epochs", "batch_size"):
            _require(getattr(sec, key) >= 1, f"{sec_name}.{key}", "must be >= 1")
        _require(sec.lr > 0, f"{sec_name}.lr", "must be > 0")
        _require(sec.warmup_steps >= 0, f"{sec_name}.warmup_steps", "must be >= 0")
        _require(sec.max_steps >= 0, f"{sec_name}.max_steps", "must be >= 0")
    for sec_name in ("ecg", "vae", "flow"):
        _require(getattr(cfg, sec_name).arch in ARCHS, f"{sec_name}.arch",
                 f"must be one of {', '.join(ARCHS)}, got {getattr(cfg, sec_name).arch!r}")


def _validate_ecg(e: ECGConfig, d: DataConfig) -> None:
    """``ecg`` (stage 1)."""
    _require(0 <= e.mask_ratio < 1, "ecg.mask_ratio", "must be in [0, 1)")
    _require(e.width % e.heads == 0, "ecg.width", f"must be divisible by ecg.heads={e.heads}")
    _require(e.cycle_mode in ("median", "ensemble", "window", "official"), "ecg.cycle_mode",
             "must be median, ensemble, window or official")
    _require(e.cycle_mode != "official" or e.arch == "official", "ecg.cycle_mode",
             "official (the official cycle cut) needs ecg.arch=official")
    _require(e.base_filters >= 1, "ecg.base_filters", "must be >= 1")
    _require(e.input_scale > 0, "ecg.input_scale", "must be > 0")
    _require(e.input_scale == 1 or e.arch == "official", "ecg.input_scale",
             "applies to ecg.arch=official only (this project's encoder normalises each lead)")
    _require(e.num_tokens == d.num_frames, "ecg.num_tokens", "must equal data.num_frames")
    _require(e.phase_weight >= 0, "ecg.phase_weight", "must be >= 0")
    _require(0 <= e.augment_fraction <= 1, "ecg.augment_fraction", "must be in [0, 1]")


def _validate_vae(v: VAEConfig, d: DataConfig) -> None:
    """``vae`` (stage 2)."""
    _require(1 <= len(v.channel_mult) <= 4, "vae.channel_mult",
             "needs 1 to 4 levels: 4 levels = 3 downsamplings = 8x; with fewer, the rest of the 8x is "
             "a pixel-unshuffle (3 levels: 2x2 patches)")
    _require(v.latent_channels >= 1, "vae.latent_channels", "must be >= 1")
    _require(v.base_channels >= 1 and all(m >= 1 for m in v.channel_mult), "vae.base_channels",
             "base_channels and channel_mult entries must be >= 1")
    _require(v.num_res_blocks >= 1, "vae.num_res_blocks", "must be >= 1")
    _require(v.temporal_levels >= 0, "vae.temporal_levels", "must be >= 0 (0: no temporal convolution)")
    _require(v.time_padding in ("circular", "replicate", "zeros"), "vae.time_padding",
             "must be circular, replicate or zeros")
    _require(v.perceptual_frames >= 0, "vae.perceptual_frames", "must be >= 0 (0: all frames)")
    _require(0 <= v.clip_frames <= d.num_frames, "vae.clip_frames",
             f"must be in [0, data.num_frames={d.num_frames}] (0: whole cycle)")
    _require(v.disc_start >= 0, "vae.disc_start", "must be >= 0")
    _require(v.ckpt_every >= 0, "vae.ckpt_every", "must be >= 0 (0: save at epoch ends only)")
    _require(v.disc_lr > 0, "vae.disc_lr", "must be > 0")
    _require(v.disc_channels >= 1 and v.disc_layers >= 1, "vae.disc_channels",
             "disc_channels and disc_layers must be >= 1")
    _require(v.kl_weight >= 0 and v.perceptual_weight >= 0 and v.disc_weight >= 0,
             "vae.kl_weight", "loss weights must be >= 0")
    _require(v.z_channels >= 0, "vae.z_channels", "must be >= 0 (0: vae.latent_channels)")
    _require(v.z_channels == 0 or v.arch == "official", "vae.z_channels", "applies to vae.arch=official only")
    if v.arch == "official":
        _require(len(v.channel_mult) == 4, "vae.channel_mult",
                 "vae.arch=official needs 4 levels (3 downsamplings = 8x; it has no pixel-unshuffle)")
        _require(all((v.base_channels * m) % 32 == 0 for m in v.channel_mult), "vae.base_channels",
                 "vae.arch=official: base_channels x every channel_mult entry must be a multiple of 32 (GroupNorm)")


def _validate_flow(fl: FlowConfig, ecg: ECGConfig) -> None:
    """``flow`` (stage 3)."""
    _require(fl.patch_size in (1, 2), "flow.patch_size", "must be 1 or 2 (latent is 12 x 12)")
    _require(fl.patch_size == 1 or fl.arch == "project", "flow.patch_size",
             "flow.arch=official has one token per latent pixel: use 1")
    _require(fl.hidden % fl.heads == 0, "flow.hidden", f"must be divisible by flow.heads={fl.heads}")
    _require(fl.hidden % 4 == 0 or fl.arch == "official", "flow.hidden",
             "must be divisible by 4 (2-D sin-cos positional embedding)")
    _require(fl.depth >= 1 and fl.heads >= 1, "flow.depth", "depth and heads must be >= 1")
    _require(fl.mlp_ratio > 0, "flow.mlp_ratio", "must be > 0")
    _require(fl.ecg_lr > 0, "flow.ecg_lr", "must be > 0")
    _require(fl.val_subjects >= 0, "flow.val_subjects", "must be >= 0 (0: every val subject)")
    _require(fl.sample_every >= 0, "flow.sample_every", "must be >= 0 (0: no previews)")
    _require(fl.alpha >= 0, "flow.alpha", "must be >= 0")
    _require(fl.anchor in ("template", "ecg"), "flow.anchor", "must be template or ecg")
    _require(fl.anchor == "template" or fl.use_template, "flow.anchor",
             "the ECG anchor replaces the template: it needs flow.use_template=true")
    _require(fl.anchor == "template" or not fl.ecg_finetune, "flow.anchor",
             "the ECG anchor is fitted on the frozen encoder's tokens: use flow.ecg_finetune=false")
    _require(fl.anchor_hidden >= 1, "flow.anchor_hidden", "must be >= 1")
    _require(fl.anchor_steps >= 0, "flow.anchor_steps", "must be >= 0")
    _require(fl.anchor_lr > 0, "flow.anchor_lr", "must be > 0")
    _require(fl.anchor_fit in ("sgd", "ridge"), "flow.anchor_fit", "must be sgd or ridge")
    _require(fl.anchor_fit == "sgd" or fl.anchor == "ecg", "flow.anchor_fit",
             "fits the ECG anchor: it needs flow.anchor=ecg")
    _require(fl.morphology_dims >= 0, "flow.morphology_dims", "must be >= 0 (0: no morphology code)")
    _require(fl.morphology_in in ("both", "anchor"), "flow.morphology_in", "must be both or anchor")
    _require(fl.morphology_in == "both" or fl.morphology_dims == 0 or fl.anchor == "ecg", "flow.morphology_in",
             "anchor: only the ECG anchor reads the code; it needs flow.anchor=ecg")
    _require(fl.morphology_code in ("pca", "latent", "latent_motion"), "flow.morphology_code",
             "must be pca, latent or latent_motion")
    _require(fl.morphology_code == "pca" or fl.morphology_dims > 0, "flow.morphology_code",
             f"{fl.morphology_code} shapes a morphology code: it needs flow.morphology_dims > 0")
    _require(fl.morphology_noise >= 0, "flow.morphology_noise", "must be >= 0 (0: the code read clean)")
    _require(0 <= fl.balance_power <= 4, "flow.balance_power", "must be in [0, 4] (1: every value equally often)")
    _require(fl.morphology_noise == 0 or (fl.morphology_dims > 0 and fl.morphology_in == "both"),
             "flow.morphology_noise", "noises the code the DiT reads: it needs flow.morphology_dims > 0 and "
             "flow.morphology_in=both")
    _require(fl.morphology_dims == 0 or not fl.ecg_finetune, "flow.morphology_dims",
             "the morphology code is read beside the frozen encoder's tokens: use flow.ecg_finetune=false")
    _require(fl.morphology_dims == 0 or ecg.cycle_mode not in ("window", "official"), "flow.morphology_dims",
             "the median beats are cut at stage 1's R-peaks: use ecg.cycle_mode median or ensemble")
    _require(fl.motion_weight >= 0, "flow.motion_weight", "must be >= 0")
    _require(all(s >= 1 for s in fl.snapshot_steps), "flow.snapshot_steps", "steps must be >= 1")
    _require(0 <= fl.cfg_drop < 1, "flow.cfg_drop", "must be in [0, 1)")
    _require(0 <= fl.ema_decay < 1, "flow.ema_decay", "must be in [0, 1)")
    _require(fl.t_sampling in ("uniform", "logit_normal"), "flow.t_sampling",
             "must be uniform or logit_normal")


def _validate_infer_eval(inf: InferConfig, ev: EvalConfig) -> None:
    """``infer`` and ``eval``."""
    _require(inf.sampler in ("euler", "heun", "midpoint", "euler_mid"), "infer.sampler",
             "must be euler, heun, midpoint or euler_mid")
    _require(inf.steps >= 1, "infer.steps", "must be >= 1")
    _require(inf.guidance >= 0, "infer.guidance", "must be >= 0")
    _require(inf.num_samples >= 1, "infer.num_samples", "must be >= 1")
    _require(ev.fid_variant in ("standard", "paper"), "eval.fid_variant", "must be standard or paper")
    _require(ev.fvd_variant in ("standard", "paper"), "eval.fvd_variant", "must be standard or paper")
    _require(ev.bootstrap >= 0, "eval.bootstrap", "must be >= 0")
    _require(inf.batch_size >= 1, "infer.batch_size", "must be >= 1")

DOWNSTREAM_SOURCES = ("generator", "nearest", "template", "oracle")


def _validate_downstream(ds: DownstreamConfig) -> None:
    key = "downstream."
    for name in ("label_splits", "pretrain_splits"):
        splits = getattr(ds, name)
        _require(len(splits) >= 1 and all(s in ("train", "val", "test") for s in splits), key + name,
                 f"must list train, val and/or test, got {splits}")
    _require(ds.labelled_n >= 0, key + "labelled_n", "must be >= 0 (0: every labelled subject)")
    _require(ds.real_n >= 0, key + "real_n", "must be >= 0 (0: every real pretraining subject)")
    _require(ds.probe in ("finetune", "linear"), key + "probe", f"must be finetune or linear, got {ds.probe!r}")
    _require(ds.probe_l2 > 0, key + "probe_l2", "must be > 0")
    _require(bool(ds.class_column) or bool(ds.regression_columns), key + "class_column",
             "no task: give a class column and/or regression_columns")
    _require(all(s in DOWNSTREAM_SOURCES for s in ds.sources) and len(set(ds.sources)) == len(ds.sources),
             key + "sources", f"must be distinct names among {DOWNSTREAM_SOURCES}, got {ds.sources}")
    _require(all(r >= 0 for r in ds.ratios) and len(set(ds.ratios)) == len(ds.ratios), key + "ratios",
             f"must be distinct percentages >= 0, got {ds.ratios}")
    _require(ds.pool_n >= 0, key + "pool_n", "must be >= 0")
    _require(ds.samples_per_ecg >= 1, key + "samples_per_ecg", "must be >= 1")
    _require(ds.frames >= 1 and ds.frames % ds.tubelet == 0, key + "frames",
             f"must be a positive multiple of downstream.tubelet={ds.tubelet}")
    _require(ds.tubelet >= 1, key + "tubelet", "must be >= 1")
    _require(ds.patch >= 1 and ds.image_size % ds.patch == 0, key + "image_size",
             f"must be a multiple of downstream.patch={ds.patch}")
    _require(ds.image_size <= contract.IMAGE_SIZE, key + "image_size",
             f"cines are {contract.IMAGE_SIZE} x {contract.IMAGE_SIZE}: must be <= {contract.IMAGE_SIZE}")
    _require(ds.width % ds.heads == 0, key + "width", f"must be divisible by downstream.heads={ds.heads}")
    _require(ds.decoder_width % ds.decoder_heads == 0, key + "decoder_width",
             f"must be divisible by downstream.decoder_heads={ds.decoder_heads}")
    _require(ds.depth >= 1 and ds.decoder_depth >= 1, key + "depth", "depth and decoder_depth must be >= 1")
    _require(ds.mlp_ratio > 0, key + "mlp_ratio", "must be > 0")
    n_spatial = (ds.image_size // ds.patch) ** 2 if ds.patch >= 1 else 0
    _require(0 < ds.mask_ratio < 1 and round(n_spatial * (1 - ds.mask_ratio)) >= 1, key + "mask_ratio",
             f"must be in (0, 1) and leave at least one of the {n_spatial} spatial patches visible")
    for name in ("pretrain_steps", "pretrain_batch", "finetune_epochs", "finetune_batch", "ckpt_every"):
        _require(getattr(ds, name) >= 1, key + name, "must be >= 1")
    _require(ds.pretrain_warmup >= 0, key + "pretrain_warmup", "must be >= 0")
    _require(ds.pretrain_lr > 0 and ds.finetune_lr > 0, key + "pretrain_lr", "learning rates must be > 0")
    _require(ds.weight_decay >= 0 and ds.regression_weight >= 0, key + "weight_decay", "must be >= 0")
    _require(ds.folds >= 2, key + "folds", "must be >= 2")
