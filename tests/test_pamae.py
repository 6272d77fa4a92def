"""Stage 1: the PA-MAE model, the encoder API, the training script and the metrics script."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ecgflowcmr.config import load_config
from ecgflowcmr.data.phase import phase_from_rpeaks
from ecgflowcmr.ecg.dataset import ECGPhaseDataset, phase_labels
from ecgflowcmr.ecg.encoder import CycleOutput, ECGEncoder, load_ecg_encoder
from ecgflowcmr.ecg.pamae import PAMAE, pamae_losses, random_mask, sincos_to_phase

from .conftest import write_prepared_tables

ROOT = Path(__file__).resolve().parents[1]
L, FS, P = 5000, 500, 625
# built on the dataclass defaults, not on configs/demo.yaml, so that tuning the demo changes no test
TINY = ["ecg.width=32", "ecg.depth=1", "ecg.heads=2", "ecg.decoder_depth=1", "ecg.batch_size=4",
        "ecg.warmup_steps=2", "ecg.lr=2e-3", "ecg.val_every=1", "ecg.cycle_mode=median", "device=cpu"]


def synthetic_ecg(bpm: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(12, 5000) mV ECG with P, QRS and T waves (per-lead amplitudes) and its exact R-peaks."""
    rng = np.random.default_rng(seed)
    rr = 60.0 / bpm * FS
    peaks = np.arange(rng.uniform(20, rr), L, rr).round().astype(int)
    t = np.arange(L)[None, :]
    qrs_amp = rng.uniform(0.5, 1.5, (12, 1)) * rng.choice([-1, 1], (12, 1))
    t_amp = rng.uniform(0.1, 0.4, (12, 1))
    ecg = np.zeros((12, L))
    qt = 0.4 * math.sqrt(rr / FS) * FS
    for r in peaks:
        ecg += qrs_amp * np.exp(-0.5 * ((t - r) / 5.0) ** 2)
        ecg += t_amp * np.exp(-0.5 * ((t - r - 0.8 * qt) / 25.0) ** 2)
        ecg += 0.1 * np.exp(-0.5 * ((t - r + 0.15 * FS) / 12.0) ** 2)
    ecg += 0.02 * rng.normal(size=ecg.shape)
    return ecg.astype(np.float32), peaks


def write_synthetic_prepared(root: Path, n: int = 12, seed: int = 0) -> Path:
    """A prepared dataset (exact on-disk format) of synthetic ECGs with known R-peaks."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    ecgs, rpeaks = [], np.full((n, 32), -1, dtype=np.int32)
    for i in range(n):
        ecg, peaks = synthetic_ecg(float(rng.uniform(45, 140)), seed=seed * 1000 + i)
        ecgs.append(ecg)
        rpeaks[i, : len(peaks)] = peaks
    np.save(root / "ecg.npy", np.stack(ecgs))
    np.save(root / "cine.npy", np.zeros((n, 50, 96, 96), dtype=np.uint8))
    np.save(root / "rpeaks.npy", rpeaks)
    return write_prepared_tables(root, n)


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory) -> Path:
    return write_synthetic_prepared(tmp_path_factory.mktemp("synth") / "data")


@pytest.fixture(scope="module")
def trained_run(synth_data, tmp_path_factory) -> tuple[Path, object]:
    """A tiny stage-1 run (3 epochs of 2 optimiser steps) through the real training entry point."""
    from ecgflowcmr.ecg.train import train

    run_dir = tmp_path_factory.mktemp("run")
    cfg = load_config(None, TINY + [f"run_dir={run_dir}", f"data.root={synth_data}", "ecg.epochs=3"])
    train(cfg)
    return run_dir, cfg


# ---------------------------------------------------------------------------------------------
# model pieces
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.75, 0.9])
def test_masking_ratio_is_honoured_per_record(ratio):
    mask = random_mask(8, P, ratio, generator=torch.Generator().manual_seed(0))
    assert mask.shape == (8, P) and mask.dtype == torch.bool
    assert mask.sum(dim=1).tolist() == [round(ratio * P)] * 8
    assert not torch.equal(mask[0], mask[1]) or ratio == 0.0      # different positions per record


def test_masked_positions_carry_the_mask_token():
    torch.manual_seed(0)
    model = PAMAE(width=32, depth=1, heads=2, decoder_depth=1, mask_ratio=0.5).eval()
    ecg = torch.randn(2, 12, L)
    out = model(ecg, generator=torch.Generator().manual_seed(3))
    assert out["mask"].sum(dim=1).tolist() == [round(0.5 * P)] * 2
    assert out["recon"].shape == (2, 12, L) and out["target"].shape == (2, 12, L)
    assert out["sincos"].shape == (2, P, 2)
    # the encoder input at masked positions is the mask token whatever the ECG there
    enc = model.encoder
    tokens = enc.embed(ecg)
    masked = torch.where(out["mask"][..., None], enc.mask_token, tokens)
    noisy = torch.where(out["mask"][..., None], tokens + 5.0, tokens)
    assert torch.allclose(enc.contextualise(tokens, out["mask"]), enc.contextualise(noisy, out["mask"]))
    assert torch.allclose(enc.contextualise(tokens, out["mask"]), enc.contextualise(masked))


def test_phase_labels_average_sin_cos_over_each_position():
    peaks = np.arange(100, L, 430)
    phase = phase_from_rpeaks(peaks, L)
    labels = phase_labels(phase)
    assert labels.shape == (P, 2) and labels.dtype == np.float32
    centre = phase[3::8] + np.pi / 430       # sample 3.5 of each position, phase slope 2pi/430
    np.testing.assert_allclose(labels[:, 0], np.sin(centre), atol=2e-3)
    np.testing.assert_allclose(labels[:, 1], np.cos(centre), atol=2e-3)
    back = sincos_to_phase(torch.from_numpy(labels)[None], L)[0].numpy()
    err = np.abs(np.remainder(back - phase + np.pi, 2 * np.pi) - np.pi)
    assert err.mean() < 0.01


def test_encoder_api_shapes_and_gradients():
    cfg = load_config(None, TINY)
    enc = ECGEncoder.from_config(cfg.ecg)
    ecg = torch.from_numpy(np.stack([synthetic_ecg(60, 0)[0], synthetic_ecg(120, 1)[0]]))
    out = enc(ecg)
    assert isinstance(out, CycleOutput)
    assert out.tokens.shape == (2, 50, enc.dim) and out.pooled.shape == (2, enc.dim)
    assert (out.phase.shape == (2, L) and float(out.phase.detach().min()) >= 0
            and float(out.phase.detach().max()) < 2 * math.pi)
    assert out.start.dtype == torch.int64 and out.end.dtype == torch.int64 and out.fallback.dtype == torch.bool
    assert (out.end > out.start).all()
    out.tokens.sum().backward()                    # differentiable wrt the encoder (stage 3 fine-tunes)
    assert enc.stem.net[0].weight.grad is not None and enc.stem.net[0].weight.grad.abs().sum() > 0
    assert len(enc.state_hash()) == 16
    window = enc(ecg, cycle_mode="window")
    assert window.start.tolist() == [2250, 2250] and not window.fallback.any()


def test_bad_input_shapes_give_clear_errors():
    enc = ECGEncoder(width=32, depth=1, heads=2)
    with pytest.raises(ValueError, match=r"ecg\[None\]"):
        enc(torch.zeros(12, L))
    with pytest.raises(ValueError, match=r"\(B, 12, 5000\)"):
        enc(torch.zeros(1, 12, 4000))
    with pytest.raises(ValueError, match=r"\(B, 12, 5000\)"):
        enc(torch.zeros(1, 8, L))
    with pytest.raises(TypeError, match="float"):
        enc(torch.zeros(1, 12, L, dtype=torch.int16))
    with pytest.raises(ValueError, match="cycle_mode"):
        ECGEncoder(width=32, depth=1, heads=2, cycle_mode="atan2")


def test_short_training_lowers_both_losses(synth_data):
    torch.manual_seed(0)
    data = ECGPhaseDataset(synth_data, "train")
    items = [data[i] for i in range(len(data))]
    ecg = torch.stack([it["ecg"] for it in items])
    label = torch.stack([it["phase"] for it in items])
    model = PAMAE(width=32, depth=1, heads=2, decoder_depth=1)
    model.encoder.normalizer.fit(ecg.numpy())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def losses():
        with torch.no_grad():
            out = model(ecg, generator=torch.Generator().manual_seed(0))
            return {k: float(v) for k, v in pamae_losses(out, label, 1.0).items()}

    before = losses()
    for _ in range(20):
        idx = torch.randperm(len(ecg))[:4]
        loss = pamae_losses(model(ecg[idx]), label[idx], 1.0)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = losses()
    assert after["rec"] < 0.92 * before["rec"], (before, after)
    assert after["phase"] < 0.5 * before["phase"], (before, after)


# ---------------------------------------------------------------------------------------------
# the training script: outputs, checkpoint reload, exact resume, refusal without data
# ---------------------------------------------------------------------------------------------

def test_training_writes_outputs_and_checkpoint_reloads(trained_run, synth_data):
    run_dir, cfg = trained_run
    ecg_dir = run_dir / "ecg"
    for name in ("best.pt", "last.pt", "config.yaml", "train.log", "log.jsonl",
                 "figures/reconstruction.png", "figures/phase.png"):
        assert (ecg_dir / name).is_file(), name
    ckpt = torch.load(ecg_dir / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 3 and ckpt["step"] == 6
    history = [json.loads(line) for line in (ecg_dir / "log.jsonl").read_text().splitlines()]
    assert len(history) == 3 and all("val_phase_mae" in h for h in history)

    enc = load_ecg_encoder(ecg_dir / "last.pt", "cpu")
    assert not enc.training and enc.cycle_mode == "median"
    assert enc.state_hash() == ckpt["extra"]["encoder_hash"]
    model = PAMAE.from_config(cfg.ecg)
    model.load_state_dict(ckpt["model"])
    model.eval()
    ecg = torch.from_numpy(np.array(np.load(synth_data / "ecg.npy")[:3]))
    with torch.no_grad():
        out = enc(ecg)
        feats = model.encoder.features(ecg)
        again = load_ecg_encoder(ecg_dir / "last.pt", "cpu")(ecg)
    torch.testing.assert_close(sincos_to_phase(model.encoder.phase_sincos(feats), L), out.phase)
    torch.testing.assert_close(out.tokens, again.tokens)
    assert torch.equal(out.start, again.start)
    assert load_ecg_encoder(ecg_dir / "last.pt", "cpu", cycle_mode="ensemble").cycle_mode == "ensemble"


def test_rerun_of_a_finished_run_does_nothing(trained_run):
    from ecgflowcmr.ecg.train import train

    run_dir, cfg = trained_run
    before = (run_dir / "ecg" / "last.pt").stat().st_mtime_ns
    train(cfg)
    assert (run_dir / "ecg" / "last.pt").stat().st_mtime_ns == before


@pytest.mark.parametrize("one_state", [False, True])
def test_resume_is_exact(synth_data, tmp_path, one_state):
    """4 steps straight (2 epochs of 2) == 3 steps (stopped inside epoch 2) + resume for 1 more.
    The mask generator is saved per rank (a list); ``one_state``: a checkpoint of the older
    single-state format resumes exactly too."""
    from ecgflowcmr.ecg.train import train

    common = TINY + [f"data.root={synth_data}", "ecg.epochs=2", "ecg.val_every=5"]
    straight = load_config(None, common + [f"run_dir={tmp_path / 'a'}"])
    train(straight)
    part = load_config(None, common + [f"run_dir={tmp_path / 'b'}", "ecg.max_steps=3"])
    train(part)
    partial = torch.load(tmp_path / "b" / "ecg" / "last.pt", weights_only=True)
    assert partial["extra"]["epoch_step"] == 1
    assert isinstance(partial["extra"]["mask_rng"], list) and len(partial["extra"]["mask_rng"]) == 1
    if one_state:
        partial["extra"]["mask_rng"] = partial["extra"]["mask_rng"][0]
        torch.save(partial, tmp_path / "b" / "ecg" / "last.pt")
    rest = load_config(None, common + [f"run_dir={tmp_path / 'b'}"])
    train(rest, resume=True)
    a = torch.load(tmp_path / "a" / "ecg" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "ecg" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 4
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=0, msg=key)


def test_resume_of_a_different_config_is_refused(trained_run):
    from ecgflowcmr.config import ConfigError
    from ecgflowcmr.ecg.train import train

    run_dir, cfg = trained_run
    other = load_config(None, TINY + [f"run_dir={run_dir}", f"data.root={cfg.data.root}", "ecg.width=64"])
    with pytest.raises(ConfigError, match="ecg.width"):
        train(other)


def test_refuses_without_prepared_dataset(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "train_ecg.py"), "--config",
                             str(ROOT / "configs" / "demo.yaml"), f"run_dir={tmp_path}", "device=cpu"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode != 0
    assert "prepare_data.py" in result.stderr and "meta.json" in result.stderr


def test_metrics_script_prints_a_table(trained_run, synth_data):
    run_dir, _ = trained_run
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ecg_metrics.py"), "--checkpoint",
                             str(run_dir / "ecg" / "best.pt"), "--data", str(synth_data), "--split", "test",
                             "--wfdb", str(ROOT / "examples" / "ecg"), "--time-batch", "2"],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "| phase_mae |" in result.stdout and "PTB-XL" in result.stdout
    assert "encoder forward" in result.stdout
