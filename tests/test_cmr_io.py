"""Cine / mask readers: layouts, periodic time resampling, heart box, normalisation, refusals."""
from __future__ import annotations

import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ecgflowcmr.data import cmr_io
from ecgflowcmr.data.cmr_io import CMRReadError, CropBox, read_cine, read_mask, resample_frames


def blob_cine(height=160, width=200, frames=30, centre=(60.0, 130.0), seed=0, scale=1.0):
    """A pulsating bright disc (blood pool) in a ring (myocardium) over a static textured
    background: float32 ``(T, H, W)`` intensities ~0-1000 and uint8 labels (1 pool, 5 ring)."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:height, :width].astype(np.float64)
    dist = np.hypot(rows - centre[0], cols - centre[1])
    background = 150 + 60 * np.sin(rows / 7.0) * np.cos(cols / 11.0) + rng.normal(0, 10, (height, width))
    images, labels = [], []
    for t in range(frames):
        radius = scale * (14 + 6 * np.cos(2 * np.pi * t / frames))  # largest at frame 0 (end-diastole)
        pool, ring = dist < radius, (dist >= radius) & (dist < radius + 5 * scale)
        image = background.copy()
        image[ring] = 350
        image[pool] = 900
        images.append(image + rng.normal(0, 8, (height, width)))
        labels.append(np.where(pool, 1, np.where(ring, 5, 0)))
    return np.stack(images).astype(np.float32), np.stack(labels).astype(np.uint8)


def write_nifti(path: Path, frames: np.ndarray, layout: str = "hw1t") -> Path:
    """``(T, H, W)`` -> NIfTI ``(H, W, 1, T)`` (UK Biobank long axis) or ``(H, W, T)``."""
    data = np.moveaxis(frames, 0, -1)
    if layout == "hw1t":
        data = data[:, :, None, :]
    affine = np.diag([1.8, 1.8, 8.0, 1.0])
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data), affine), str(path))
    return path


def assert_cmr_error(func, path, *patterns):
    with pytest.raises(CMRReadError) as info:
        func(path)
    message = str(info.value)
    assert Path(path).name in message, message
    for pattern in patterns:
        assert re.search(pattern, message, re.IGNORECASE), message


def test_uint8_matches_dataset_contract():
    from ecgflowcmr.data.datasets import cine_to_uint8

    x = np.linspace(-1.2, 1.2, 1001, dtype=np.float32)
    np.testing.assert_array_equal(cmr_io.cine_to_uint8(x), cine_to_uint8(x))


def test_periodic_resampling_keeps_frame_zero():
    rng = np.random.default_rng(0)
    frames = rng.normal(size=(25, 8, 8)).astype(np.float32)
    out = resample_frames(frames, 50)
    assert out.shape == (50, 8, 8)
    np.testing.assert_array_equal(out[0], frames[0])
    np.testing.assert_allclose(out[2], frames[1], atol=1e-6)        # 2 * 25 / 50 = source frame 1
    np.testing.assert_allclose(out[49], 0.5 * (frames[24] + frames[0]), atol=1e-6)  # wraps around
    np.testing.assert_array_equal(resample_frames(frames[:20].repeat(1, 0), 20), frames[:20])
    out = resample_frames(rng.normal(size=(60, 4, 4)).astype(np.float32), 50)
    assert out.shape == (50, 4, 4)
    # Nearest for masks: frame 0 -> 0, periodic.
    idx = cmr_io.nearest_frame_indices(30, 50)
    assert idx[0] == 0 and idx.max() < 30 and np.all(np.diff(idx) >= 0)


def test_blob_is_cropped_centred(tmp_path):
    frames, _ = blob_cine()
    cine, box = read_cine(write_nifti(tmp_path / "sub_la_4ch.nii.gz", frames), return_box=True)
    assert cine.shape == (1, 50, 96, 96) and cine.dtype == np.float32
    assert cine.min() >= -1 and cine.max() <= 1 and cine.min() < -0.9 and cine.max() > 0.9
    assert isinstance(box, CropBox) and (box.height, box.width) == (160, 200)
    assert box.size == 120  # 0.75 of the shorter side: the heart's own size is not normalised away
    assert abs(box.row + (box.size - 1) / 2 - 60) <= 1.0
    assert abs(box.col + (box.size - 1) / 2 - 130) <= 1.0
    # In the output the blood pool (brightest) is centred.
    pool = cine[0, 0] > 0.6
    rows, cols = np.nonzero(pool)
    assert abs(rows.mean() - 47.5) < 1.5 and abs(cols.mean() - 47.5) < 1.5
    # Frame 0 (end-diastole) keeps the largest pool; the pool shrinks mid-cycle.
    areas = (cine[0] > 0.6).sum(axis=(1, 2))
    assert areas[0] == areas.max() and areas[25] < 0.5 * areas[0]


def test_box_moves_inside_image_near_border(tmp_path):
    frames, _ = blob_cine(centre=(25.0, 30.0))
    _, box = read_cine(write_nifti(tmp_path / "edge.nii.gz", frames), return_box=True)
    assert box.row == 0 and box.col == 0 and box.size == 120


def test_big_heart_enlarges_box(tmp_path):
    frames, _ = blob_cine(height=128, width=160, centre=(64.0, 80.0), scale=2.5)
    _, box = read_cine(write_nifti(tmp_path / "big.nii.gz", frames), return_box=True)
    assert 96 < box.size <= 128  # 0.75 * 128 = 96 would cut the moving region (outer diameter 125)


def test_layouts_agree(tmp_path):
    frames, _ = blob_cine(frames=20)
    a = read_cine(write_nifti(tmp_path / "a.nii.gz", frames, "hw1t"))
    b = read_cine(write_nifti(tmp_path / "b.nii", frames, "hwt"))
    np.save(tmp_path / "c.npy", frames)
    c = read_cine(tmp_path / "c.npy")
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(a, c, atol=1e-6)


def test_mask_follows_cine_box(tmp_path):
    frames, labels = blob_cine(frames=30)
    cine, box = read_cine(write_nifti(tmp_path / "cine.nii.gz", frames), return_box=True)
    mask = read_mask(write_nifti(tmp_path / "mask.nii.gz", labels), box)
    assert mask.shape == (50, 96, 96) and mask.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 1, 5}
    lv = mask[0] == 1
    rows, cols = np.nonzero(lv)
    assert abs(rows.mean() - 47.5) < 1.5 and abs(cols.mean() - 47.5) < 1.5
    # The mask's pool lies on the cine's bright pool.
    assert cine[0, 0][lv].mean() > 0.5 and cine[0, 0][mask[0] == 0].mean() < 0.0
    np.testing.assert_array_equal(mask[0], read_mask(tmp_path / "mask.nii.gz", box)[0])
    areas = (mask == 1).sum(axis=(1, 2))
    assert areas[0] == areas.max()


def test_cine_refusals(tmp_path):
    frames, _ = blob_cine(frames=20)
    assert_cmr_error(read_cine, tmp_path / "absent.nii.gz", "not found")
    (tmp_path / "garbage.nii.gz").write_bytes(b"not a nifti at all")
    assert_cmr_error(read_cine, tmp_path / "garbage.nii.gz", "unreadable")
    (tmp_path / "garbage.npy").write_bytes(b"nope")
    assert_cmr_error(read_cine, tmp_path / "garbage.npy", "unreadable")
    (tmp_path / "cine.mp4").write_bytes(b"\x00")
    assert_cmr_error(read_cine, tmp_path / "cine.mp4", "unsupported")
    two_slices = np.stack([np.moveaxis(frames, 0, -1)] * 2, axis=2)
    nib.save(nib.Nifti1Image(two_slices, np.eye(4)), str(tmp_path / "sax.nii.gz"))
    assert_cmr_error(read_cine, tmp_path / "sax.nii.gz", "wrong dimensions")
    nib.save(nib.Nifti1Image(frames[0], np.eye(4)), str(tmp_path / "single.nii.gz"))
    assert_cmr_error(read_cine, tmp_path / "single.nii.gz", "wrong dimensions")
    write_nifti(tmp_path / "few.nii.gz", frames[:5])
    assert_cmr_error(read_cine, tmp_path / "few.nii.gz", "too few frames")
    write_nifti(tmp_path / "empty.nii.gz", np.full_like(frames, 7.0))
    assert_cmr_error(read_cine, tmp_path / "empty.nii.gz", "empty")
    bad = frames.copy()
    bad[3, 10, 10] = np.nan
    write_nifti(tmp_path / "nan.nii.gz", bad)
    assert_cmr_error(read_cine, tmp_path / "nan.nii.gz", "NaN")
    write_nifti(tmp_path / "tiny.nii.gz", frames[:, :20, :20])
    assert_cmr_error(read_cine, tmp_path / "tiny.nii.gz", "too small")
    np.save(tmp_path / "flat.npy", frames[0])
    assert_cmr_error(read_cine, tmp_path / "flat.npy", "wrong dimensions")


def test_mask_refusals(tmp_path):
    frames, labels = blob_cine(frames=20)
    _, box = read_cine(write_nifti(tmp_path / "cine.nii.gz", frames), return_box=True)
    write_nifti(tmp_path / "small.nii.gz", labels[:, :100])
    assert_cmr_error(lambda p: read_mask(p, box), tmp_path / "small.nii.gz", "does not match|but its cine")
    write_nifti(tmp_path / "float.nii.gz", labels.astype(np.float32) + 0.5)
    assert_cmr_error(lambda p: read_mask(p, box), tmp_path / "float.nii.gz", "integer labels")
    write_nifti(tmp_path / "big.nii.gz", labels * 40)
    assert_cmr_error(lambda p: read_mask(p, box), tmp_path / "big.nii.gz", "integer labels")
