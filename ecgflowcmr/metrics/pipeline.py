"""``evaluate(real, fake, ...) -> dict``: every metric of evaluation.py in one call.

Distribution metrics (FID frame-wise, FVD per video) compare the generated set with the real set;
paired metrics (LPIPS, PSNR, SSIM per frame) and the functional metrics compare each generated cine
with the real cine of the same subject. Each metric reports its variant, the numbers of videos and
frames behind it, the weight files (with sha256) it used, or why it is unavailable. A metric whose
weights are missing never stops the others.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from . import extractors as ex
from . import fidelity, functional
from .frechet import fd_from_features
from .io import CineSet, pair_by_subject, resolve_fake, resolve_real
from .manifold import K_DEFAULT, precision_recall_by_frame
from .weights import WeightsUnavailable, no_downloads, weights_dir

ALL_METRICS = ("fid", "fvd", "lpips", "psnr", "ssim", "functional")
QUANTISATION = "uint8 = round((x + 1) * 127.5), clipped to [0, 255], for real and generated alike"

FID_DESCRIPTION = {
    "standard": "frame-wise FID, TF Inception 2015-12-05 (pool3, 2048-d), TF1 bilinear resize to 299, "
                "(x - 128) / 128, grey replicated to RGB",
    "paper": "frame-wise FID, torchvision inception_v3 IMAGENET1K_V1 (avgpool, 2048-d), bilinear resize to 299, "
             "ImageNet normalisation, grey replicated to RGB",
}
FVD_DESCRIPTION = {
    "standard": "FVD, StyleGAN-V protocol: i3d_torchscript.pt(rescale=True, resize=True, return_features=True) on "
                "uint8 RGB clips of all frames, 400-d logits",
    "paper": "FVD, VideoGPT I3D i3d_pretrained_400.pt, clips of all frames resized to 224 in [-1, 1], "
             "1024-d final-pool features averaged over time",
}


def _noop(*_args, **_kwargs):
    return None


def _hash_cines(cines: np.ndarray) -> str:
    digest = hashlib.sha256()
    digest.update(str(cines.shape).encode())
    digest.update(np.ascontiguousarray(cines).tobytes())
    return digest.hexdigest()[:20]


def _percentile_ci(values: list[float]) -> list[float] | None:
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=np.float64)
    if v.size < 2:
        return None
    return [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))]


def _frame_subset(t: int, frames: int | None) -> np.ndarray:
    if not frames or frames >= t:
        return np.arange(t)
    return np.unique(np.linspace(0, t - 1, frames).round().astype(np.int64))


class _FeatureCache:
    """Real-set features on disk (``<out>/cache``), keyed by the cines' hash, the network's file
    hash and the frames used, so that several generated sets (ablations) share one real pass."""

    def __init__(self, folder: Path | None):
        self.folder = folder

    def get(self, key: str):
        if self.folder is None:
            return None
        path = self.folder / f"{key}.npy"
        return np.load(path) if path.is_file() else None

    def put(self, key: str, value: np.ndarray) -> None:
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f"{key}.tmp.npy"
        np.save(tmp, value)
        tmp.replace(self.folder / f"{key}.npy")


@dataclass
class EvalOptions:
    """Every setting of ``evaluate``; ``resolve`` fills what is not given from ``cfg.eval`` / ``cfg.device``.

    paired: pair by subject id (False: distribution metrics only). samples: ``first`` (sample 0 per
    subject) or ``all`` (every sample, each paired with its real cine). fid_frames: frames per video
    entering FID (evenly spaced; None = all, the standard). weights: the weights folder. out_dir: the
    folder for caches. networks: {"fid" | "fvd" | "lpips": module} replaces pretrained networks
    (plumbing tests only). data_root: the prepared dataset of ``split:NAME`` (default ``cfg.data_root``)."""
    paired: bool = True
    samples: str = "first"
    metrics: tuple[str, ...] = ALL_METRICS
    fid_variant: str = "standard"
    fvd_variant: str = "standard"
    weights: str = ""
    bootstrap: int = 0
    batch_size: int = 16
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    out_dir: Path | None = None
    segmenter_steps: int = 400
    fid_frames: int | None = None
    seed: int = 0
    networks: dict = field(default_factory=dict)
    data_root: str | Path | None = None

    @classmethod
    def resolve(cls, cfg=None, **given) -> EvalOptions:
        unknown = sorted(set(given) - {f.name for f in fields(cls)})
        if unknown:
            raise TypeError(f"evaluate() got unknown options {unknown}")
        given = {k: v for k, v in given.items() if v is not None}
        for key in ("batch_size", "fid_variant", "fvd_variant"):      # 0 / "": the config's
            if key in given and not given[key]:
                del given[key]
        ev = cfg.eval if cfg is not None else None
        if ev is not None:
            for key, value in (("fid_variant", ev.fid_variant), ("fvd_variant", ev.fvd_variant),
                               ("weights", ev.weights_dir), ("bootstrap", ev.bootstrap), ("batch_size", ev.batch_size)):
                given.setdefault(key, value)
        if given.get("data_root") is None and cfg is not None:
            given["data_root"] = cfg.data_root
        if given.get("device") is None:
            from ..utils.device import select_device

            given["device"] = select_device(cfg.device if cfg is not None else "auto")
        opts = cls(**given)
        opts.device, opts.bootstrap, opts.batch_size = torch.device(opts.device), int(opts.bootstrap), \
            int(opts.batch_size)
        opts.metrics = tuple(opts.metrics) if opts.metrics else ALL_METRICS
        opts.out_dir = Path(opts.out_dir) if opts.out_dir else None
        unknown = [m for m in opts.metrics if m not in ALL_METRICS]
        if unknown:
            raise ValueError(f"unknown metrics {unknown} (known: {', '.join(ALL_METRICS)})")
        if opts.samples not in ("first", "all"):
            raise ValueError(f"samples must be 'first' or 'all', got {opts.samples!r}")
        return opts


@dataclass
class _Run:
    """One evaluation's sets, pairing and bootstrap draws, shared by the metric pieces."""
    opts: EvalOptions
    real_set: CineSet
    fake_set: CineSet
    pairing: object | None                  # io.Pairing; None when unpaired
    real_idx: np.ndarray                    # videos entering the distribution metrics
    fake_idx: np.ndarray
    boot_real: list | None
    boot_fake: list | None
    boot_pairs: list | None
    cache: _FeatureCache
    result: dict
    log: Callable[[str], None]


def evaluate(real, fake, *, cfg=None, log: Callable[[str], None] | None = None, **options) -> dict:
    """Evaluate generated cines against real ones; ``options``: the fields of ``EvalOptions``.

    real: ``"split:<name>"`` (the prepared dataset at ``data_root`` / ``cfg.data_root``), a folder of
      .npy / NIfTI cines, an array (N, 1, T, H, W) in [-1, 1] (or uint8), or a ``CineSet``.
    fake: a folder (``<subject>.npy`` / ``<subject>_<k>.npy`` / ``.nii.gz``), an array or a CineSet.
    Returns the metrics dict written to metrics.json (see report.write_outputs).
    """
    opts = EvalOptions.resolve(cfg, **options)
    timing: dict[str, float] = {}
    t_start = time.time()
    run = _load(real, fake, opts, log or _noop)
    timing["load"] = time.time() - t_start
    wanted, metrics, per_video = opts.metrics, run.result["metrics"], {}
    with no_downloads():
        for name, piece in (("fid", _fid), ("fvd", _fvd)):
            if name in wanted:
                t0 = time.time()
                metrics[name] = piece(run)
                timing[name] = time.time() - t0
        if opts.paired:
            per_video = _paired_fidelity(run, timing)
        else:
            for name in ("lpips", "psnr", "ssim"):
                if name in wanted:
                    metrics[name] = {"available": False, "reason": "unpaired mode: paired metric skipped"}
        if "functional" in wanted:
            t0 = time.time()
            entry, curves = _functional(run)
            metrics["functional"] = entry
            if curves is not None:
                per_video.update({k: v for k, v in curves.items() if k.startswith("pv_")})
                run.result["_curves"] = curves  # for the report's plots; dropped from metrics.json
            timing["functional"] = time.time() - t0
    result = run.result
    result["_real"], result["_fake"], result["_pairing"] = run.real_set, run.fake_set, run.pairing
    if opts.paired:
        result["per_video"] = _per_video_rows(run.real_set, run.fake_set, run.pairing, per_video)
    timing["total"] = time.time() - t_start
    result["timing_seconds"] = {k: round(v, 2) for k, v in timing.items()}
    return result


def _load(real, fake, opts: EvalOptions, log) -> _Run:
    """The real and generated sets, their pairing, the bootstrap draws and the result's header."""
    real_set = resolve_real(real, opts.data_root or "")
    fake_set = resolve_fake(fake, set(real_set.subjects) if opts.paired else None, opts.samples)
    if opts.samples == "first":
        fake_set = _first_samples(fake_set)
    folder = weights_dir(opts.weights)
    result: dict = {
        "schema": 1,
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "mode": "paired" if opts.paired else "unpaired",
        "samples": opts.samples,
        "device": str(opts.device),
        "quantisation": QUANTISATION,
        "weights_dir": str(folder) + ("" if opts.weights else " (+ folders of installed packages that ship a network)"),
        "real": real_set.describe(),
        "fake": fake_set.describe(),
        "metrics": {},
        "weights": {},
    }
    pairing = None
    if opts.paired:
        pairing = _pair(real_set, fake_set, result)
        # Distribution metrics compare the generated set with the real cines of the same subjects.
        real_idx, fake_idx = np.unique(pairing.real_index), pairing.fake_index
    else:
        real_idx, fake_idx = np.arange(len(real_set)), np.arange(len(fake_set))
    n, rng = opts.bootstrap, np.random.default_rng(opts.seed)
    boot_real = [rng.integers(0, len(real_idx), len(real_idx)) for _ in range(n)]
    boot_fake = [rng.integers(0, len(fake_idx), len(fake_idx)) for _ in range(n)] if not opts.paired else None
    boot_pairs = ([rng.integers(0, len(pairing.real_index), len(pairing.real_index)) for _ in range(n)]
                  if opts.paired else None)
    result["bootstrap"] = {"resamples": n, "interval": "percentile 95%",
                           "unit": "videos (pairs resampled jointly)" if opts.paired else "videos"} if n else None
    cache = _FeatureCache(opts.out_dir / "cache" if opts.out_dir else None)
    return _Run(opts, real_set, fake_set, pairing, real_idx, fake_idx, boot_real, boot_fake, boot_pairs, cache,
                result, log)


def _pair(real_set: CineSet, fake_set: CineSet, result: dict):
    """Generated cines paired with the real cine of their subject (recorded in ``result["pairs"]``)."""
    pairing = pair_by_subject(real_set, fake_set)
    if len(pairing.real_index) == 0:
        raise ValueError(f"no generated cine matches a real subject: real ids look like "
                         f"{real_set.subjects[:3]}, generated like {fake_set.keys[:3]}. Use --unpaired "
                         f"for distribution metrics only.")
    if real_set.cines.shape[1:] != fake_set.cines.shape[1:]:
        raise ValueError(f"real cines are {real_set.cines.shape[1:]} but generated are "
                         f"{fake_set.cines.shape[1:]}; paired metrics need one shape")
    result["pairs"] = {"n_pairs": int(len(pairing.real_index)),
                       "n_subjects": int(len(set(pairing.real_index.tolist()))),
                       "unmatched_generated": pairing.unmatched_fake[:50],
                       "n_unmatched_generated": len(pairing.unmatched_fake),
                       "unmatched_real": pairing.unmatched_real[:50],
                       "n_unmatched_real": len(pairing.unmatched_real)}
    return pairing


PAIRED_VARIANTS = {
    "psnr": "per-frame PSNR on [-1, 1] cines, data_range 2, mean over frames then videos",
    "ssim": "per-frame SSIM (Gaussian 11x11, sigma 1.5, K1 0.01, K2 0.03, valid region) on [-1, 1], "
            "data_range 2, mean over frames then videos",
    "lpips": "LPIPS v0.1, AlexNet trunk + lpips linear layers, per frame at 96 x 96, [-1, 1] input, grey "
             "replicated to RGB",
}


def _paired_fidelity(run: _Run, timing: dict) -> dict[str, np.ndarray]:
    """PSNR, SSIM and LPIPS of each generated cine against its subject's real cine; returns the
    per-video values (the metrics land in ``run.result``)."""
    opts, metrics, per_video = run.opts, run.result["metrics"], {}
    r_cines = run.real_set.cines[run.pairing.real_index]
    f_cines = run.fake_set.cines[run.pairing.fake_index]
    n_frames = int(r_cines.shape[0] * r_cines.shape[1])
    for name, fn, unit in (("psnr", fidelity.psnr_frames, "dB"), ("ssim", fidelity.ssim_frames, "")):
        if name not in opts.metrics:
            continue
        t0 = time.time()
        vals = np.array([fn(f.astype(np.float64) / 127.5 - 1.0, r.astype(np.float64) / 127.5 - 1.0).mean()
                         for f, r in zip(f_cines, r_cines)])
        per_video[name] = vals
        metrics[name] = _paired_summary(vals, run.boot_pairs, n_frames, variant=PAIRED_VARIANTS[name], unit=unit)
        timing[name] = time.time() - t0
    if "lpips" in opts.metrics:
        t0 = time.time()
        try:
            metric = ex.build_lpips(opts.weights, opts.device, opts.batch_size * 4, opts.networks.get("lpips"))
            vals = np.array([metric(f, r).mean() for f, r in zip(f_cines, r_cines)])
            per_video["lpips"] = vals
            entry = _paired_summary(vals, run.boot_pairs, n_frames, variant=PAIRED_VARIANTS["lpips"])
            entry["weights"] = _weight_info(metric.weight, "lpips network injected (plumbing)")
            if metric.weight is not None:
                entry["weights"]["linear_layers"] = str(ex.lpips_linear_weights_path())
                run.result["weights"]["lpips_alex"] = entry["weights"]
            metrics["lpips"] = entry
        except WeightsUnavailable as err:
            metrics["lpips"] = dict(err.as_dict(), variant="LPIPS v0.1 AlexNet")
            run.log(f"LPIPS unavailable: {err}")
        timing["lpips"] = time.time() - t0
    return per_video


# ----------------------------------------------------------------------------------------------
# pieces
# ----------------------------------------------------------------------------------------------


def _first_samples(cines: CineSet) -> CineSet:
    """Keep the lowest-numbered sample of each subject."""
    best: dict[str, int] = {}
    for i, (s, k) in enumerate(zip(cines.subjects, cines.samples)):
        if s not in best or k < cines.samples[best[s]]:
            best[s] = i
    keep = sorted(best.values())
    return cines if len(keep) == len(cines) else cines.subset(keep)


def _weight_info(weight, injected_note: str) -> dict:
    if weight is None:
        return {"file": None, "note": injected_note}
    return {"file": weight.file.name, "path": str(weight.path), "sha256": weight.sha256, "url": weight.file.url}


def _paired_summary(values: np.ndarray, boot_pairs, n_frames: int, variant: str, unit: str = "") -> dict:
    v = np.asarray(values, dtype=np.float64)
    entry = {"available": True, "value": float(v.mean()),
             "std_over_videos": float(v.std(ddof=1)) if v.size > 1 else 0.0,
             "variant": variant, "n_videos": int(v.size), "n_frames": int(n_frames)}
    if unit:
        entry["unit"] = unit
    if boot_pairs:
        entry["ci95"] = _percentile_ci([float(v[idx].mean()) for idx in boot_pairs])
    return entry


def _video_features_by_frame(extractor, cines: np.ndarray, frames: np.ndarray) -> np.ndarray:
    """(N, T, H, W) uint8 -> (N, F, D) frame features."""
    n = cines.shape[0]
    flat = cines[:, frames].reshape(-1, *cines.shape[2:])
    feats = extractor(flat)
    return feats.reshape(n, len(frames), -1)


def _fd_frames(real_feats: np.ndarray, fake_feats: np.ndarray) -> float:
    return fd_from_features(real_feats.reshape(-1, real_feats.shape[-1]), fake_feats.reshape(-1, fake_feats.shape[-1]))


def _boot_fd(real_feats, fake_feats, paired, pairing_real_pos, boot_real, boot_fake, boot_pairs) -> list[float]:
    """Bootstrap FDs. Paired: resample pairs jointly (real side follows the pairs)."""
    values = []
    if paired:
        for idx in boot_pairs:
            values.append(_fd_frames(real_feats[pairing_real_pos[idx]], fake_feats[idx]))
    else:
        for ri, fi in zip(boot_real, boot_fake):
            values.append(_fd_frames(real_feats[ri], fake_feats[fi]))
    return values


def _real_position(real_dist_idx: np.ndarray, pairing) -> np.ndarray | None:
    """For each pair, the row of its real video within real_dist_idx."""
    if pairing is None:
        return None
    where = {int(r): i for i, r in enumerate(real_dist_idx)}
    return np.array([where[int(r)] for r in pairing.real_index], dtype=np.int64)


def _fid(run: _Run) -> dict:
    opts, real_set, fake_set, real_idx, fake_idx = run.opts, run.real_set, run.fake_set, run.real_idx, run.fake_idx
    variant, cache, log, result = opts.fid_variant, run.cache, run.log, run.result
    base = {"variant": variant, "description": FID_DESCRIPTION.get(variant, variant)}
    try:
        extractor = ex.build_fid(variant, opts.weights, opts.device, opts.batch_size * 4, opts.networks.get("fid"))
    except WeightsUnavailable as err:
        log(f"FID unavailable: {err}")
        return dict(err.as_dict(), **base)
    frames = _frame_subset(real_set.cines.shape[1], opts.fid_frames)
    real_c, fake_c = real_set.cines[real_idx], fake_set.cines[fake_idx]
    tag = extractor.weight.sha256[:16] if extractor.weight is not None else None
    key = f"fid-{variant}-{tag}-{_hash_cines(real_c)}-{len(frames)}" if tag else None
    real_feats = cache.get(key) if key else None
    log(f"FID ({variant}): {len(real_c)} real + {len(fake_c)} generated videos x {len(frames)} frames")
    if real_feats is None:
        real_feats = _video_features_by_frame(extractor, real_c, frames)
        if key:
            cache.put(key, real_feats)
    fake_feats = _video_features_by_frame(extractor, fake_c, frames)
    entry = dict(base, available=True, value=_fd_frames(real_feats, fake_feats),
                 n_real_videos=int(len(real_c)), n_fake_videos=int(len(fake_c)),
                 n_real_frames=int(real_feats.shape[0] * real_feats.shape[1]),
                 n_fake_frames=int(fake_feats.shape[0] * fake_feats.shape[1]),
                 frames_per_video=int(len(frames)), feature_dim=int(real_feats.shape[-1]),
                 covariance="unbiased (N - 1)",
                 note="Frechet distances are biased upwards at small N; compare only at equal N")
    # improved precision / recall (Kynkaanniemi et al. 2019, k = 3) of the same frames in the same features,
    # one frame per video at a time (a video's own frames would be each other's nearest neighbours)
    if min(len(real_feats), len(fake_feats)) > K_DEFAULT:
        pr = precision_recall_by_frame(real_feats, fake_feats)
        entry.update(precision=pr["precision"], recall=pr["recall"], pr_k=pr["k"], pr_rule="one frame per video")
    entry["weights"] = _weight_info(extractor.weight, "FID network injected (plumbing)")
    if extractor.weight is not None:
        result["weights"][extractor.weight.spec.key] = entry["weights"]
    if run.boot_real or run.boot_pairs:
        entry["ci95"] = _percentile_ci(_boot_fd(real_feats, fake_feats, opts.paired,
                                                _real_position(real_idx, run.pairing), run.boot_real, run.boot_fake,
                                                run.boot_pairs))
    return entry


def _fvd(run: _Run) -> dict:
    opts, real_set, fake_set, real_idx, fake_idx = run.opts, run.real_set, run.fake_set, run.real_idx, run.fake_idx
    variant, cache, log, result = opts.fvd_variant, run.cache, run.log, run.result
    base = {"variant": variant, "description": FVD_DESCRIPTION.get(variant, variant)}
    try:
        extractor = ex.build_fvd(variant, opts.weights, opts.device, max(1, opts.batch_size // 4),
                                 opts.networks.get("fvd"))
    except WeightsUnavailable as err:
        log(f"FVD unavailable: {err}")
        return dict(err.as_dict(), **base)
    real_c, fake_c = real_set.cines[real_idx], fake_set.cines[fake_idx]
    if real_c.shape[1] < extractor.min_frames:
        return dict(base, available=False, reason=f"clips of {real_c.shape[1]} frames are shorter than the "
                                                  f"{extractor.min_frames} frames the I3D network accepts")
    if len(real_c) < 2 or len(fake_c) < 2:
        return dict(base, available=False, reason="FVD needs at least 2 real and 2 generated videos")
    tag = extractor.weight.sha256[:16] if extractor.weight is not None else None
    key = f"fvd-{variant}-{tag}-{_hash_cines(real_c)}" if tag else None
    log(f"FVD ({variant}): {len(real_c)} real + {len(fake_c)} generated clips of {real_c.shape[1]} frames")
    real_feats = cache.get(key) if key else None
    if real_feats is None:
        real_feats = extractor(real_c)
        if key:
            cache.put(key, real_feats)
    fake_feats = extractor(fake_c)
    entry = dict(base, available=True, value=fd_from_features(real_feats, fake_feats),
                 n_real_videos=int(len(real_c)), n_fake_videos=int(len(fake_c)),
                 frames_per_clip=int(real_c.shape[1]), feature_dim=int(real_feats.shape[-1]),
                 covariance="unbiased (N - 1)",
                 note="FVD with few videos is strongly biased (the covariance has rank < N); compare only at equal N")
    entry["weights"] = _weight_info(extractor.weight, "FVD network injected (plumbing)")
    if extractor.weight is not None:
        result["weights"][extractor.weight.spec.key] = entry["weights"]
    if run.boot_real or run.boot_pairs:
        pos = _real_position(real_idx, run.pairing)
        if opts.paired:
            vals = [fd_from_features(real_feats[pos[idx]], fake_feats[idx]) for idx in run.boot_pairs]
        else:
            vals = [fd_from_features(real_feats[ri], fake_feats[fi]) for ri, fi in zip(run.boot_real, run.boot_fake)]
        entry["ci95"] = _percentile_ci(vals)
    return entry


def _segmenter_source(real_set: CineSet, data_root):
    if real_set.prepared is not None and real_set.prepared.masks is not None:
        return real_set.prepared
    if data_root:
        from ..data.datasets import Prepared

        try:
            prepared = Prepared(data_root)
        except (FileNotFoundError, RuntimeError):
            return None
        return prepared if prepared.masks is not None else None
    return None


def _functional(run: _Run):
    opts, real_set, fake_set, pairing, boot_pairs = run.opts, run.real_set, run.fake_set, run.pairing, run.boot_pairs
    data_root, device = opts.data_root, opts.device
    prepared = _segmenter_source(real_set, data_root)
    if prepared is None:
        return ({"available": False,
                 "reason": "no prepared dataset with ground-truth masks to train the LV segmenter on "
                           f"(looked at the real set and data root '{data_root}'); run prepare_data.py"}, None)
    cache_path = (opts.out_dir / "segmenter.pt") if opts.out_dir else None
    model, seg_info = functional.segmenter_for(prepared, cache_path, steps=opts.segmenter_steps, seed=opts.seed,
                                               device=device, log=run.log)
    entry: dict = {"available": True, "segmenter": seg_info,
                   "definitions": {"lv_area": "pixels labelled LV per frame",
                                   "es_frame": "argmin of the LV area curve (frames, 0 = R-peak)",
                                   "es_frame_error": "circular |difference| in frames (period 50)",
                                   "ef_area": "100 * (A(0) - min A) / A(0) of the LV area curve A "
                                              "(percentage points; frame 0 = ED)",
                                   "curve_corr": "Pearson correlation of the two area curves",
                                   "curve_rmse_px": "RMSE between the area curves (pixels)",
                                   "curve_rmse_rel": "curve_rmse_px / max area of the reference curve"}}
    curves: dict = {}
    real_labels = functional.segment(model, real_set.cines, device=device)
    real_curves = functional.lv_area_curves(real_labels)
    fake_curves = functional.lv_area_curves(functional.segment(model, fake_set.cines, device=device))
    curves["real_seg"], curves["fake_seg"] = real_curves, fake_curves
    if real_set.masks is not None:
        truth_curves = functional.lv_area_curves(real_set.masks)
        curves["real_mask"] = truth_curves
        entry["segmenter_on_eval_real"] = {
            "what": "segmenter curves of the real evaluation cines vs their ground-truth masks (error floor)",
            **functional.summarise(functional.compare_curves(real_curves, truth_curves)),
            "dice": functional.dice_per_class(real_labels, real_set.masks)}
    gt = real_set.ground_truth
    if pairing is not None:
        r, f = pairing.real_index, pairing.fake_index
        per_pair = functional.compare_curves(fake_curves[f], real_curves[r])
        entry["generated_vs_real"] = dict(
            what="segmenter on generated vs segmenter on the paired real cine", **functional.summarise(per_pair))
        if boot_pairs:
            entry["generated_vs_real"]["ci95"] = {
                k: _percentile_ci([float(np.nanmean(v[idx])) for idx in boot_pairs]) for k, v in per_pair.items()}
        for k, v in per_pair.items():
            curves[f"pv_{k}"] = v
        if "real_mask" in curves:
            entry["generated_vs_real_masks"] = dict(
                what="segmenter on generated vs ground-truth masks of the paired real cine",
                **functional.summarise(functional.compare_curves(fake_curves[f], curves["real_mask"][r])))
        if "es_frame" in gt or "ef_area" in gt:
            es = gt.get("es_frame")
            ef = gt.get("ef_area")
            entry["generated_vs_ground_truth"] = dict(
                what="curve-derived ES frame / area EF of generated cines vs the manifest's ground truth "
                     "(es_frame, ef_area columns)",
                **functional.summarise(functional.compare_to_ground_truth(
                    fake_curves[f], None if es is None else es[r], None if ef is None else ef[r])))
            entry["real_vs_ground_truth"] = dict(
                what="the same for the real cines (segmenter error floor)",
                **functional.summarise(functional.compare_to_ground_truth(real_curves, es, ef)))
        curves["pairs"] = (r, f)
    else:
        entry["distributions"] = {
            "real": {"ef_area_mean": float(np.nanmean(functional.ef_area(real_curves))),
                     "ef_area_std": float(np.nanstd(functional.ef_area(real_curves))),
                     "es_frame_mean": float(np.mean(functional.es_frame(real_curves)))},
            "generated": {"ef_area_mean": float(np.nanmean(functional.ef_area(fake_curves))),
                          "ef_area_std": float(np.nanstd(functional.ef_area(fake_curves))),
                          "es_frame_mean": float(np.mean(functional.es_frame(fake_curves)))}}
    return entry, curves


def _per_video_rows(real_set, fake_set, pairing, per_video) -> list[dict]:
    rows = []
    for p, fi in enumerate(pairing.fake_index):
        row = {"subject": fake_set.subjects[fi], "sample": int(fake_set.samples[fi])}
        for key, values in per_video.items():
            name = key[3:] if key.startswith("pv_") else key
            v = float(values[p])
            row[name] = v if np.isfinite(v) else None
        rows.append(row)
    return rows
