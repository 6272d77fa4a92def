"""Cine CMR readers: NIfTI / .npy -> float32 ``(1, 50, 96, 96)`` in [-1, 1], and masks to match.

Input layouts (no reorientation: array axis 0 is taken as image rows, axis 1 as columns):

- NIfTI (``.nii``, ``.nii.gz``, via nibabel): ``(H, W, 1, T)`` (UK Biobank long-axis export),
  ``(H, W, T)``, or ``(H, W, T, 1)``.
- ``.npy``: ``(T, H, W)`` (or ``(1, T, H, W)``).
- ``.cine.json``: a cine index of a UK Biobank DICOM zip, written by the bulk scan
  (``ukb_bulk.py``, ``data.ukb_bulk``): frames in trigger-time order, in the UK Biobank NIfTI layout,
  pixel size from ``PixelSpacing``.

The frames are assumed to cover one R-R cycle, frame 0 at the R-peak, as UK Biobank's
retrospectively gated cines do. Processing, in order:

1. **Time**: periodic linear interpolation from T to 50 frames: output frame j samples the cycle
   at source position ``j * T / 50``, interpolating between frames ``floor`` and ``floor + 1`` with
   wrap-around (the frame after the last is frame 0). Frame 0 stays frame 0 exactly; T = 50 is
   the identity. Masks use the nearest source frame ``round(j * T / 50) mod T``.
2. **Box** (``find_heart_box``): a square around the heart, found where the image moves. The
   per-pixel temporal standard deviation (frames scaled by their 1st-99th percentile range) is
   smoothed (Gaussian, sigma = 3% of the image side) and its median (the noise floor) subtracted;
   pixels above a quarter of its 99.5th percentile are the moving region. The box centre is the
   motion-weighted centroid of that region. The box
   side is ``CROP_FRACTION`` (0.75) of the shorter image side: a fixed fraction of the field of
   view, so that a large heart still looks large after cropping, not zoomed to a standard size.
   With ``crop_mm`` > 0 (``data.crop_mm``) the side is that many millimetres instead, from the
   NIfTI header's pixel size (a DICOM cine index: ``PixelSpacing``): cines of any field of view then
   reach the model at one physical scale
   (``.npy`` files carry no pixel size and are refused with it).
   It is enlarged only when the moving region (its 1st-99th weighted percentile extent) would
   not fit, never beyond the image, and shifted to lie inside the image. A cine without motion
   falls back to the intensity moments (centroid) of the mean image.
   A box in mm is tight (160 mm around hearts of up to ~145 mm), so its centre is the heart's
   outline instead, not where it moves most (the RV free wall and the apex pulled the
   motion-weighted centroid 5 mm off the chambers' centroid in the median version-2 phantom
   subject, ``benchmarks/crop_centre.py``): the amplitude of the cycle's first
   ``REGION_HARMONICS`` temporal harmonics per pixel (the heart beats in them; noise spreads over
   all), smoothed (sigma 2.5 % of the image side), floor removed, above ``REGION_THRESHOLD`` of its
   99.5th percentile, largest connected part, holes filled: the centroid of that region.
3. **Space**: the box is resized to 96 x 96 with Pillow's bilinear filter (antialiased when
   shrinking); masks take the nearest pixel (pixel centres mapped, no new labels).
4. **Intensity**: the 0.5th and 99.5th percentiles of the cropped, resized cine map to -1 and 1,
   values outside are clipped.

Errors: ``CMRReadError`` (a ``ValueError``) naming the file and the reason: unreadable file,
wrong dimensions, too small, too few frames (< ``MIN_FRAMES``), NaN/inf, empty (constant) image,
mask that does not match its cine or holds non-label values.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..contract import IMAGE_SIZE, NUM_FRAMES
from .errors import CMRReadError  # noqa: F401  (raised here; importable from here as before)

MIN_FRAMES = 10            # fewer frames cannot describe one cardiac cycle
MIN_SIDE = 32              # smaller images are refused
CROP_FRACTION = 0.75       # box side as a fraction of the shorter image side (see module doc)
PERCENTILES = (0.5, 99.5)  # intensity normalisation to [-1, 1]
MOTION_THRESHOLD = 0.25    # moving region: motion map above this fraction of its 99.5th percentile
EXTENT_MARGIN = 1.0        # the box grows only when the moving region itself would not fit
MAX_LABEL = 5              # mask labels 0 bg, 1 LV, 2 RV, 3 LA, 4 RA, 5 myocardium
REGION_HARMONICS = 3       # box in mm: the moving region from the cycle's harmonics 1-3 (see module doc)
REGION_SIGMA = 0.025       # its smoothing, as a fraction of the shorter image side
REGION_THRESHOLD = 0.075   # its threshold, as a fraction of the smoothed map's 99.5th percentile


class CropBox(NamedTuple):
    """Square crop in source pixels: rows ``row:row+size``, columns ``col:col+size`` of an image
    of ``height`` x ``width`` (the source shape, kept to check that a mask matches its cine)."""

    row: int
    col: int
    size: int
    height: int
    width: int


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def read_cine(path: str | Path, return_box: bool = False, crop_mm: float = 0.0):
    """Read a cine -> float32 ``(1, 50, 96, 96)`` in [-1, 1] (and the ``CropBox`` if asked).
    ``crop_mm`` > 0: a square box of that side in mm around the heart (see module doc)."""
    path = Path(path)
    frames = load_frames(path)                      # (T, H, W) float32
    _check_values(frames, path)
    side_px = crop_mm / pixel_spacing_mm(path) if crop_mm > 0 else None
    box = find_heart_box(frames, side_px=side_px)
    cine = crop_resize(resample_frames(frames, NUM_FRAMES), box, IMAGE_SIZE)
    cine = normalise_intensity(cine, path)
    return (cine[None], box) if return_box else cine[None]


def read_mask(path: str | Path, box: CropBox) -> np.ndarray:
    """Read a label mask of the cine cropped with ``box`` -> uint8 ``(50, 96, 96)``; nearest
    neighbour in time and space."""
    path = Path(path)
    labels = load_frames(path)
    if labels.shape[1:] != (box.height, box.width):
        raise CMRReadError(f"{path}: mask is {labels.shape[1]} x {labels.shape[2]} but its cine is "
                           f"{box.height} x {box.width}")
    if not np.all(np.isfinite(labels)) or np.any(labels != np.round(labels)) \
            or labels.min() < 0 or labels.max() > MAX_LABEL:
        raise CMRReadError(f"{path}: mask values must be integer labels 0..{MAX_LABEL}")
    labels = labels[nearest_frame_indices(labels.shape[0], NUM_FRAMES)]
    idx_r = box.row + _nearest_pixel_indices(box.size, IMAGE_SIZE)
    idx_c = box.col + _nearest_pixel_indices(box.size, IMAGE_SIZE)
    return labels[:, idx_r][:, :, idx_c].astype(np.uint8)


def load_frames(path: str | Path) -> np.ndarray:
    """The raw frames of a cine or mask file as float32 ``(T, H, W)``, shape-checked."""
    path = Path(path)
    if not path.is_file():
        raise CMRReadError(f"{path}: file not found")
    name = path.name.lower()
    if name.endswith(".npy"):
        try:
            data = np.load(path, allow_pickle=False)
        except Exception as err:
            raise CMRReadError(f"{path}: unreadable .npy ({type(err).__name__}: {err})") from None
        if data.ndim == 4 and data.shape[0] == 1:
            data = data[0]
        if data.ndim != 3:
            raise CMRReadError(f"{path}: wrong dimensions {data.shape}: a .npy cine is (T, H, W)")
        frames = data
    elif name.endswith(".cine.json"):
        from .ukb_bulk import load_cine  # a UK Biobank DICOM cine, selected by the bulk scan

        frames = load_cine(path)
    elif name.endswith(".nii") or name.endswith(".nii.gz"):
        import nibabel as nib

        try:
            data = np.asanyarray(nib.load(str(path)).dataobj)
        except Exception as err:
            raise CMRReadError(f"{path}: unreadable NIfTI ({type(err).__name__}: {err})") from None
        if data.ndim == 4 and data.shape[2] == 1:
            data = data[:, :, 0, :]
        elif data.ndim == 4 and data.shape[3] == 1:
            data = data[:, :, :, 0]
        if data.ndim != 3:
            raise CMRReadError(f"{path}: wrong dimensions {data.shape}: need (H, W, 1, T) or "
                               f"(H, W, T) (one slice over time)")
        frames = np.moveaxis(data, -1, 0)
    else:
        raise CMRReadError(f"{path}: unsupported cine format (use .nii, .nii.gz, .npy, or a UK Biobank zip through "
                           f"data.ukb_bulk)")
    if not np.issubdtype(frames.dtype, np.number) or np.iscomplexobj(frames):
        raise CMRReadError(f"{path}: dtype {frames.dtype} is not a real number type")
    t, h, w = frames.shape
    if t < MIN_FRAMES:
        raise CMRReadError(f"{path}: too few frames ({t}); need at least {MIN_FRAMES} over one cycle")
    if min(h, w) < MIN_SIDE:
        raise CMRReadError(f"{path}: image {h} x {w} is too small (need at least {MIN_SIDE} x {MIN_SIDE})")
    return np.ascontiguousarray(frames, dtype=np.float32)


def resample_frames(frames: np.ndarray, num_frames: int = NUM_FRAMES) -> np.ndarray:
    """Periodic linear interpolation in time: ``(T, ...)`` -> ``(num_frames, ...)``; frame 0 kept."""
    t = frames.shape[0]
    if t == num_frames:
        return frames.copy()
    pos = np.arange(num_frames) * (t / num_frames)
    lo = np.floor(pos).astype(np.int64)
    frac = (pos - lo).astype(np.float32).reshape((-1,) + (1,) * (frames.ndim - 1))
    return (1 - frac) * frames[lo % t] + frac * frames[(lo + 1) % t]


def nearest_frame_indices(t: int, num_frames: int = NUM_FRAMES) -> np.ndarray:
    """Source frame of each output frame for nearest-neighbour periodic resampling."""
    return np.floor(np.arange(num_frames) * (t / num_frames) + 0.5).astype(np.int64) % t


def pixel_spacing_mm(path: str | Path) -> float:
    """In-plane pixel size (mm) of a NIfTI cine or a DICOM cine index (the mean of its two in-plane
    spacings)."""
    path = Path(path)
    if path.name.lower().endswith(".cine.json"):
        from .ukb_bulk import index_pixel_mm

        return index_pixel_mm(path)
    if not (path.name.lower().endswith(".nii") or path.name.lower().endswith(".nii.gz")):
        raise CMRReadError(f"{path}: a crop in mm (data.crop_mm) needs the pixel size, which only NIfTI "
                           f"files and DICOM cine indexes carry; set data.crop_mm=0 for this file type")
    import nibabel as nib

    zooms = nib.load(str(path)).header.get_zooms()
    spacing = 0.5 * (float(zooms[0]) + float(zooms[1]))
    if not np.isfinite(spacing) or spacing <= 0:
        raise CMRReadError(f"{path}: the header's pixel size ({zooms[:2]}) is not usable for a crop in mm")
    return spacing


def find_heart_box(frames: np.ndarray, fraction: float = CROP_FRACTION, side_px: float | None = None) -> CropBox:
    """Square ``CropBox`` around the moving heart in ``(T, H, W)`` frames (see module doc); its side
    is ``fraction`` of the shorter image side, or ``side_px`` pixels where given."""
    from scipy.ndimage import gaussian_filter

    t, h, w = frames.shape
    lo, hi = np.percentile(frames, [1, 99])
    scaled = (frames - lo) / max(hi - lo, 1e-6)
    motion = gaussian_filter(scaled.std(axis=0), sigma=0.03 * min(h, w))
    motion = np.clip(motion - np.median(motion), 0, None)  # remove the noise floor
    threshold = MOTION_THRESHOLD * np.percentile(motion, 99.5)
    weights = np.where(motion >= threshold, motion, 0.0) if threshold > 1e-4 else None
    if weights is None or weights.sum() <= 0:  # no motion: intensity moments of the mean image
        mean = np.clip(scaled.mean(axis=0), 0, None)
        weights = mean if mean.sum() > 0 else np.ones((h, w))
        extent = 0.0
    else:
        extent = EXTENT_MARGIN * max(_weighted_extent(weights.sum(axis=1)),
                                     _weighted_extent(weights.sum(axis=0)))
    centre = _heart_outline_centre(scaled) if side_px is not None else None
    if centre is None:
        rows, cols = np.arange(h), np.arange(w)
        total = weights.sum()
        centre = (float((weights.sum(axis=1) * rows).sum() / total), float((weights.sum(axis=0) * cols).sum() / total))
    centre_r, centre_c = centre
    side = fraction * min(h, w) if side_px is None else side_px
    size = int(round(min(max(side, extent), min(h, w))))
    row = int(np.clip(round(centre_r - size / 2 + 0.5), 0, h - size))
    col = int(np.clip(round(centre_c - size / 2 + 0.5), 0, w - size))
    return CropBox(row, col, size, h, w)


def _heart_outline_centre(scaled: np.ndarray) -> tuple[float, float] | None:
    """Centroid (row, col) of the heart's outline in ``(T, H, W)`` frames of one cycle (module doc,
    box in mm), or None without motion."""
    from scipy import ndimage

    t, h, w = scaled.shape
    k = min(REGION_HARMONICS, t // 2)
    if k < 1:
        return None
    # harmonics 1..k by a small DFT (cheaper than a full FFT over time): (2k, T) @ (T, H*W)
    phase = 2 * np.pi * np.outer(np.arange(1, k + 1), np.arange(t)) / t
    basis = np.concatenate([np.cos(phase), np.sin(phase)]).astype(np.float32)
    amplitude = np.sqrt(np.square(basis @ scaled.reshape(t, -1)).sum(axis=0)).reshape(h, w)
    amplitude = ndimage.gaussian_filter(amplitude, sigma=REGION_SIGMA * min(h, w))
    amplitude = np.clip(amplitude - np.median(amplitude), 0, None)
    threshold = REGION_THRESHOLD * np.percentile(amplitude, 99.5)
    if threshold <= 1e-4:
        return None
    parts, n = ndimage.label(amplitude >= threshold)
    if n == 0:
        return None
    largest = 1 + int(np.argmax(ndimage.sum_labels(np.ones_like(parts), parts, index=np.arange(1, n + 1))))
    region = ndimage.binary_fill_holes(parts == largest)
    rows, cols = np.nonzero(region)
    return float(rows.mean()), float(cols.mean())


def crop_resize(frames: np.ndarray, box: CropBox, size: int = IMAGE_SIZE) -> np.ndarray:
    """Crop ``box`` out of ``(T, H, W)`` float frames and resize to ``(T, size, size)`` (bilinear,
    antialiased when shrinking)."""
    crop = frames[:, box.row:box.row + box.size, box.col:box.col + box.size]
    if box.size == size:
        return np.ascontiguousarray(crop, dtype=np.float32)
    from PIL import Image

    out = np.empty((crop.shape[0], size, size), dtype=np.float32)
    for i, frame in enumerate(crop):
        out[i] = np.asarray(Image.fromarray(np.ascontiguousarray(frame, dtype=np.float32), mode="F")
                            .resize((size, size), Image.BILINEAR))
    return out


def normalise_intensity(cine: np.ndarray, path: str | Path = "<array>") -> np.ndarray:
    """Map the 0.5th / 99.5th percentiles to -1 / 1 and clip; refuse a constant image."""
    lo, hi = np.percentile(cine, PERCENTILES)
    if hi - lo <= 1e-6 * max(1.0, abs(hi)):
        raise CMRReadError(f"{path}: empty image (constant intensity in the heart box)")
    return np.clip(2.0 * (cine - lo) / (hi - lo) - 1.0, -1.0, 1.0).astype(np.float32)


def cine_to_uint8(cine: np.ndarray) -> np.ndarray:
    """[-1, 1] float -> uint8 with round((x + 1) * 127.5); the same as
    ``ecgflowcmr.data.datasets.cine_to_uint8`` (kept here so that preparation needs no torch)."""
    return np.clip(np.rint((np.asarray(cine, dtype=np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def _check_values(frames: np.ndarray, path: Path) -> None:
    if not np.all(np.isfinite(frames)):
        raise CMRReadError(f"{path}: {int(np.sum(~np.isfinite(frames)))} NaN/inf voxels")
    if float(frames.max() - frames.min()) <= 1e-6 * max(1.0, float(np.abs(frames).max())):
        raise CMRReadError(f"{path}: empty image (every voxel is {float(frames.flat[0]):g})")


def _weighted_extent(profile: np.ndarray, q: tuple[float, float] = (0.01, 0.99)) -> float:
    """Distance between the q-quantiles of a non-negative 1-D weight profile."""
    cdf = np.cumsum(profile) / profile.sum()
    lo, hi = np.searchsorted(cdf, q[0]), np.searchsorted(cdf, q[1])
    return float(hi - lo + 1)


def _nearest_pixel_indices(src: int, dst: int) -> np.ndarray:
    """Source pixel of each output pixel when resizing ``src`` -> ``dst`` (pixel centres)."""
    return np.minimum(np.floor((np.arange(dst) + 0.5) * src / dst), src - 1).astype(np.int64)
