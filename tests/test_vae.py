"""Stage 2: the 3D-VAE, its PatchGAN, training loop (resume, GAN switch), latents and template."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from ecgflowcmr.config import load_config
from ecgflowcmr.data.datasets import Prepared
from ecgflowcmr.vae import VAE3D, PatchDiscriminator3D, load_vae
from ecgflowcmr.vae.latents import compute_template, extract_all
from ecgflowcmr.vae.losses import MissingWeightsError, build_lpips
from tests.conftest import ROOT, write_fake_prepared

# A tiny but complete configuration: every code path (3D convs, circular time padding, attention,
# GAN, clips) at a cost of well under a second per step on two CPU cores.
TINY = ["device=cpu", "vae.base_channels=4", "vae.channel_mult=[1,1,2,2]", "vae.temporal_levels=2",
        "vae.batch_size=2", "vae.clip_frames=4", "vae.disc_channels=4", "vae.disc_layers=2",
        "vae.warmup_steps=2", "vae.log_every=1", "vae.lr=1e-3", "vae.disc_lr=1e-3", "vae.disc_weight=0.5",
        "vae.val_every=1"]


def tiny_cfg(tmp_path: Path, data: Path, *extra: str):
    return load_config(ROOT / "configs" / "demo.yaml",
                       TINY + [f"run_dir={tmp_path / 'run'}", f"data.root={data}", *extra])


def read_steps(run: Path) -> dict[int, dict]:
    """Last record of each step in steps.jsonl."""
    out = {}
    for line in (run / "vae" / "steps.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec
    return out


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


def test_shapes_demo_config():
    cfg = load_config(ROOT / "configs" / "demo.yaml")
    vae = VAE3D.from_config(cfg.vae).eval()
    x = torch.rand(1, 1, 50, 96, 96) * 2 - 1
    with torch.no_grad():
        posterior = vae.encode(x)
        assert posterior.mean.shape == (1, cfg.vae.latent_channels, 50, 12, 12)
        assert posterior.logvar.shape == posterior.mean.shape
        assert posterior.sample(torch.Generator().manual_seed(0)).shape == posterior.mean.shape
        assert posterior.kl().shape == (1,)
        assert vae.decode(posterior.mode()).shape == (1, 1, 50, 96, 96)


def test_shapes_ukb_config_on_meta_device():
    """Paper sizes (base 64, 2 res blocks, 3x3x3 convs everywhere), one training graph, no memory."""
    cfg = load_config(ROOT / "configs" / "ukb.yaml")
    with torch.device("meta"):
        vae = VAE3D.from_config(cfg.vae)
        disc = PatchDiscriminator3D.from_config(cfg.vae)
        x = torch.empty(1, 1, 50, 96, 96)
        posterior = vae.encode(x)
        assert posterior.mean.shape == (1, 4, 50, 12, 12)
        x_hat = vae.decode(posterior.sample())
        assert x_hat.shape == (1, 1, 50, 96, 96)
        assert disc(x_hat).shape[:3] == (1, 1, 50)
        ((x_hat - x).abs().mean() + posterior.kl().mean()).backward()
    assert all(p.grad is not None for p in vae.parameters())


@pytest.mark.parametrize("patch_size,channel_mult", [(1, [1, 2, 2, 2]), (2, [1, 2, 2]), (4, [1, 2])])
def test_fewer_levels_patchify_and_still_compress_8x(patch_size, channel_mult):
    vae = VAE3D(latent_channels=4, base_channels=4, channel_mult=channel_mult, temporal_levels=2).eval()
    assert vae.spatial_factor == 8 and vae.patch_size == patch_size
    assert vae.time_kernel[-2:] == [3, 3] and vae.time_kernel[:-2] == [1] * (len(channel_mult) - 2)
    x = torch.rand(2, 1, 6, 48, 48) * 2 - 1
    with torch.no_grad():
        z = vae.encode(x).mode()
        assert z.shape == (2, 4, 6, 6, 6)
        assert vae.decode(z).shape == x.shape


def test_space_to_depth_round_trip():
    from ecgflowcmr.vae.model import depth_to_space, space_to_depth

    x = torch.randn(2, 1, 3, 8, 8)
    assert space_to_depth(x, 2).shape == (2, 4, 3, 4, 4)
    torch.testing.assert_close(depth_to_space(space_to_depth(x, 4), 4), x)


def test_circular_time_padding_is_shift_equivariant():
    """The cine is one cycle: rolling the input in time rolls the latent (circular padding,
    attention without positions)."""
    torch.manual_seed(0)
    vae = VAE3D(latent_channels=2, base_channels=4, channel_mult=[1, 1, 2, 2], temporal_levels=4).eval()
    x = torch.rand(1, 1, 8, 32, 32) * 2 - 1
    with torch.no_grad():
        z = vae.encode(x).mode()
        z_rolled = vae.encode(torch.roll(x, 3, dims=2)).mode()
    torch.testing.assert_close(torch.roll(z, 3, dims=2), z_rolled, atol=1e-5, rtol=1e-4)


def test_round_trip_and_tiny_overfit_reduces_l1():
    torch.manual_seed(0)
    vae = VAE3D(latent_channels=4, base_channels=8, channel_mult=[1, 1, 2, 2], temporal_levels=2)
    t = torch.linspace(0, 2 * np.pi, 8)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    radius = 0.4 + 0.15 * torch.cos(t)[:, None, None]
    x = (torch.sigmoid((radius - (xx ** 2 + yy ** 2).sqrt()) * 20) * 1.6 - 0.8)[None, None]  # (1,1,8,32,32)
    x_hat, posterior = vae(x, sample=False)
    assert x_hat.shape == x.shape and posterior.mode().shape == (1, 4, 8, 4, 4)
    opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
    first = None
    for _ in range(40):
        x_hat, posterior = vae(x, generator=torch.Generator().manual_seed(0))
        l1 = (x_hat - x).abs().mean()
        loss = l1 + 1e-6 * posterior.kl().mean() / x[0].numel()
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = float(l1.detach()) if first is None else first
    vae.eval()
    with torch.no_grad():
        final = float((vae.decode(vae.encode(x).mode()) - x).abs().mean())
    assert final < 0.5 * first, (first, final)


def test_load_vae_rebuilds_from_checkpoint(tmp_path):
    from ecgflowcmr.utils.checkpoint import atomic_save

    cfg = load_config(ROOT / "configs" / "demo.yaml", TINY)
    vae = VAE3D.from_config(cfg.vae)
    atomic_save({"model": vae.state_dict(), "config": cfg.to_dict()}, tmp_path / "best.pt")
    loaded = load_vae(tmp_path / "best.pt", "cpu")
    assert not loaded.training
    assert loaded.state_hash() == vae.state_hash()
    torch.load(tmp_path / "best.pt", weights_only=True)


# ----------------------------------------------------------------------------------------------
# Training loop
# ----------------------------------------------------------------------------------------------


def test_discriminator_switches_on_at_disc_start(tmp_path, fake_prepared):
    from ecgflowcmr.vae.trainer import VAETrainer

    cfg = tiny_cfg(tmp_path, fake_prepared, "vae.disc_start=2")
    trainer = VAETrainer(cfg, torch.device("cpu"), total_steps=4)
    cine = torch.rand(2, 1, 50, 96, 96) * 2 - 1
    disc_before = {k: v.clone() for k, v in trainer.disc.state_dict().items()}
    stats = []
    for _ in range(2):
        stats.append(trainer.train_step(cine))
    for s in stats:
        assert s["g_loss"] == 0.0 and s["d_loss"] == 0.0 and s["d_weight"] == 0.0
    for k, v in trainer.disc.state_dict().items():      # D untouched before disc_start
        assert torch.equal(v, disc_before[k]), k
    for _ in range(2):
        stats.append(trainer.train_step(cine))
    for s in stats[2:]:
        assert s["g_loss"] != 0.0 and s["d_loss"] != 0.0 and s["d_weight"] > 0.0
    assert any(not torch.equal(v, disc_before[k]) for k, v in trainer.disc.state_dict().items())


def test_generator_step_leaves_discriminator_alone_and_clipping_is_per_network(tmp_path, fake_prepared,
                                                                              monkeypatch):
    from ecgflowcmr.vae import trainer as trainer_mod

    cfg = tiny_cfg(tmp_path, fake_prepared, "vae.disc_start=0")
    trainer = trainer_mod.VAETrainer(cfg, torch.device("cpu"), total_steps=2)
    clipped = []
    original_clip = trainer_mod.clip_grad
    monkeypatch.setattr(trainer_mod, "clip_grad",
                        lambda params, max_norm, **kw: clipped.append({id(p) for p in params}) or original_clip(
                            [p for p in trainer.model.parameters() if id(p) in clipped[-1]]
                            + [p for p in trainer.disc.parameters() if id(p) in clipped[-1]], max_norm, **kw))
    disc_grads_after_g = []
    original_zero = trainer.opt_d.zero_grad

    def record_then_zero(*args, **kwargs):   # called by the D step right after the G step
        disc_grads_after_g.append([p.grad for p in trainer.disc.parameters()])
        return original_zero(*args, **kwargs)

    trainer.opt_d.zero_grad = record_then_zero
    trainer.train_step(torch.rand(2, 1, 50, 96, 96) * 2 - 1)
    assert all(g is None for g in disc_grads_after_g[0])          # no D gradient from the G loss
    assert clipped[0] == {id(p) for p in trainer.model.parameters()}
    assert clipped[1] == {id(p) for p in trainer.disc.parameters()}
    assert all(p.requires_grad for p in trainer.disc.parameters())


def test_resume_gives_the_same_next_losses(tmp_path, monkeypatch):
    from ecgflowcmr.vae import trainer as trainer_mod

    data = write_fake_prepared(tmp_path / "data", n=10)      # 6 train videos -> 3 steps / epoch
    common = ["vae.epochs=2", "vae.disc_start=2", "vae.ckpt_every=1"]
    # uninterrupted
    ref_cfg = load_config(ROOT / "configs" / "demo.yaml",
                          TINY + common + [f"run_dir={tmp_path / 'ref'}", f"data.root={data}"])
    trainer_mod.train(ref_cfg, extract=False)
    ref = read_steps(tmp_path / "ref")
    assert sorted(ref) == [1, 2, 3, 4, 5, 6]
    # interrupted in the middle of epoch 2 (after step 4), then resumed by re-running
    cfg = load_config(ROOT / "configs" / "demo.yaml",
                      TINY + common + [f"run_dir={tmp_path / 'run'}", f"data.root={data}"])
    original = trainer_mod.VAETrainer.train_step

    def crash_at_step_5(self, cine, step=None):
        if step == 4:
            raise KeyboardInterrupt("simulated interruption")
        return original(self, cine, step)

    monkeypatch.setattr(trainer_mod.VAETrainer, "train_step", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        trainer_mod.train(cfg, extract=False)
    ckpt = torch.load(tmp_path / "run" / "vae" / "last.pt", weights_only=True)
    assert ckpt["step"] == 4 and ckpt["epoch"] == 1 and ckpt["extra"]["epoch_step"] == 1
    assert ckpt["disc"] is not None and ckpt["disc_optimizer"] is not None
    monkeypatch.setattr(trainer_mod.VAETrainer, "train_step", original)
    trainer_mod.train(cfg, resume=True, extract=False)
    got = read_steps(tmp_path / "run")
    for step in (5, 6):
        for key in ("loss", "rec", "kl", "g_loss", "d_loss", "d_weight"):
            assert got[step][key] == pytest.approx(ref[step][key], rel=1e-5, abs=1e-7), (step, key)
    a = torch.load(tmp_path / "ref" / "vae" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "run" / "vae" / "last.pt", weights_only=True)
    for name in ("model", "disc"):
        for k in a[name]:
            torch.testing.assert_close(a[name][k], b[name][k], rtol=1e-5, atol=1e-6)


def test_training_run_writes_checkpoints_figures_latents(tmp_path, fake_prepared):
    import train_disentangle_vae3d as script

    run = tmp_path / "run"
    args = ["--config", str(ROOT / "configs" / "demo.yaml"), *TINY, "vae.epochs=1", "vae.disc_start=100",
            f"run_dir={run}", f"data.root={fake_prepared}"]
    script.main(args)
    for name in ("best.pt", "last.pt", "config.yaml", "log.jsonl", "train.log"):
        assert (run / "vae" / name).is_file(), name
    assert list((run / "vae" / "figures").glob("frames_epoch*.png"))
    assert list((run / "vae" / "figures").glob("curve_epoch*.png"))
    best = torch.load(run / "vae" / "best.pt", weights_only=True)
    assert "optimizer" not in best and best["config"]["vae"]["base_channels"] == 4
    prepared = Prepared(fake_prepared)
    vae = load_vae(run / "vae" / "best.pt")
    for split in ("train", "val", "test"):
        lat = np.load(run / "latents" / f"{split}.npy", mmap_mode="r")
        n = len(prepared.split_indices(split))
        assert lat.shape == (n, 4, 50, 12, 12) and lat.dtype == np.float32
        index = pd.read_csv(run / "latents" / f"{split}_index.csv", dtype={"subject_id": str})
        assert index["index"].tolist() == prepared.split_indices(split).tolist()
        assert index["subject_id"].tolist() == prepared.subject_ids(prepared.split_indices(split))
    tmpl = torch.load(run / "latents" / "template.pt", weights_only=True)
    assert tmpl["vae_hash"] == vae.state_hash()
    # the first test latent is the posterior mode of the first test cine
    from ecgflowcmr.data.datasets import cine_from_uint8

    i = int(prepared.split_indices("test")[0])
    x = cine_from_uint8(torch.from_numpy(np.array(prepared.cine[i])))[None, None]
    with torch.no_grad():
        z = vae.encode(x).mode()[0].numpy()
    np.testing.assert_allclose(np.load(run / "latents" / "test.npy")[0], z, rtol=1e-4, atol=1e-5)
    # re-running is a no-op for training and extraction; --extract-only works alone
    script.main(args)
    script.main(args + ["--extract-only"])


def test_refuses_without_prepared_dataset(tmp_path, capsys):
    import train_disentangle_vae3d as script

    with pytest.raises(SystemExit) as err:
        script.main(["--config", str(ROOT / "configs" / "demo.yaml"), f"run_dir={tmp_path}",
                     f"data.root={tmp_path / 'nowhere'}"])
    assert err.value.code != 0
    assert "prepare_data.py" in capsys.readouterr().err


def test_missing_lpips_weights_fail_with_the_message(tmp_path, fake_prepared):
    from ecgflowcmr.vae.trainer import VAETrainer

    empty = tmp_path / "weights"
    empty.mkdir()
    cfg = tiny_cfg(tmp_path, fake_prepared, "vae.perceptual_weight=1.0", f"eval.weights_dir={empty}")
    with pytest.raises(MissingWeightsError) as err:
        VAETrainer(cfg, torch.device("cpu"), total_steps=1)
    msg = str(err.value)
    assert "alexnet-owt-7be5be79.pth" in msg
    assert "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth" in msg
    assert str(empty) in msg and "perceptual_weight" in msg


def test_lpips_loads_trunk_and_heads_strictly(tmp_path, monkeypatch):
    """The AlexNet file's ``features.*`` land in lpips' slices (with a stand-in file of the right
    layout; the real one cannot be downloaded here) and the packaged linear heads are loaded."""
    import types

    import torchvision

    from ecgflowcmr.metrics import weights as weights_mod

    alex = torchvision.models.alexnet(weights=None).state_dict()
    path = tmp_path / "alexnet-owt-7be5be79.pth"
    torch.save(alex, path)
    monkeypatch.setattr(weights_mod, "resolve", lambda key, folder="": types.SimpleNamespace(path=path))
    model = build_lpips(tmp_path)
    torch.testing.assert_close(getattr(model.net.slice1, "0").weight, alex["features.0.weight"])
    torch.testing.assert_close(getattr(model.net.slice5, "10").weight, alex["features.10.weight"])
    assert all(not p.requires_grad for p in model.parameters())
    x = torch.rand(2, 1, 3, 32, 32) * 2 - 1
    from ecgflowcmr.vae.losses import framewise_lpips

    assert float(framewise_lpips(model, x, x)) == pytest.approx(0.0, abs=1e-6)
    assert float(framewise_lpips(model, x, -x, frames=2, generator=torch.Generator().manual_seed(0))) > 0


# ----------------------------------------------------------------------------------------------
# Latents and template
# ----------------------------------------------------------------------------------------------


def _tiny_vae(seed: int = 0) -> VAE3D:
    torch.manual_seed(seed)
    return VAE3D(latent_channels=3, base_channels=4, channel_mult=[1, 1, 1, 1], temporal_levels=0,
                 attention=False).eval()


def test_template_equals_mean_of_cached_train_latents(tmp_path, fake_prepared):
    vae = _tiny_vae()
    template = extract_all(vae, fake_prepared, tmp_path / "latents", torch.device("cpu"), batch_size=3,
                           progress=False)
    train = np.load(tmp_path / "latents" / "train.npy").astype(np.float64)
    assert template["template"].shape == (3, 1, 12, 12)
    np.testing.assert_allclose(template["template"].numpy(), train.mean(axis=(0, 2))[:, None], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(template["mean"].numpy(), train.mean(axis=(0, 2, 3, 4)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(template["std"].numpy(), train.std(axis=(0, 2, 3, 4)), rtol=1e-4, atol=1e-6)
    assert template["n_subjects"] == len(train) and template["vae_hash"] == vae.state_hash()
    saved = torch.load(tmp_path / "latents" / "template.pt", weights_only=True)
    torch.testing.assert_close(saved["template"], template["template"])
    # streamed in small chunks: same numbers
    chunked = compute_template(tmp_path / "latents" / "train.npy", vae.state_hash(), chunk=2)
    torch.testing.assert_close(chunked["template"], template["template"])


def interrupted_extraction(vae, data, out_dir, batch_size: int, fail_at_call: int = 3) -> None:
    """``extract_all`` killed in its ``fail_at_call``-th encoder call (the VAE is left as it was)."""
    original, calls = vae.encode, {"n": 0}

    def failing_encode(x):
        calls["n"] += 1
        if calls["n"] == fail_at_call:
            raise RuntimeError("simulated interruption")
        return original(x)

    vae.encode = failing_encode
    with pytest.raises(RuntimeError, match="simulated"):
        extract_all(vae, data, out_dir, torch.device("cpu"), batch_size=batch_size, progress=False)
    vae.encode = original


def test_extraction_resumes_without_duplicating_or_losing_rows(tmp_path):
    data = write_fake_prepared(tmp_path / "data", n=14)      # 10 train videos
    vae = _tiny_vae()
    device = torch.device("cpu")
    extract_all(vae, data, tmp_path / "ref", device, batch_size=3, progress=False)
    reference = np.load(tmp_path / "ref" / "train.npy")

    calls = {"rows": 0}
    original = vae.encode
    interrupted_extraction(vae, data, tmp_path / "run", batch_size=3)
    marker = json.loads((tmp_path / "run" / "train.progress.json").read_text())
    assert np.load(tmp_path / "run" / "train.done.npy").sum() == 6 and not marker["complete"]
    assert not (tmp_path / "run" / "template.pt").exists()

    def counting_encode(x):
        calls["rows"] += x.shape[0]
        return original(x)

    vae.encode = counting_encode
    extract_all(vae, data, tmp_path / "run", device, batch_size=3, progress=False)
    n_all = sum(len(Prepared(data).split_indices(s)) for s in ("train", "val", "test"))
    assert calls["rows"] == n_all - 6                         # nothing encoded twice
    np.testing.assert_array_equal(np.load(tmp_path / "run" / "train.npy"), reference)  # nothing lost
    for split in ("train", "val", "test"):
        assert json.loads((tmp_path / "run" / f"{split}.progress.json").read_text())["complete"]
    # a finished extraction is skipped; other weights start afresh
    calls["rows"] = 0
    extract_all(vae, data, tmp_path / "run", device, batch_size=3, progress=False)
    assert calls["rows"] == 0
    other = _tiny_vae(seed=1)
    extract_all(other, data, tmp_path / "run", device, batch_size=3, progress=False)
    assert torch.load(tmp_path / "run" / "template.pt", weights_only=True)["vae_hash"] == other.state_hash()
    for split in ("train", "val", "test"):                    # and the latents are the new weights' own
        np.testing.assert_allclose(np.load(tmp_path / "run" / f"{split}.npy")[:1],
                                   encoded_rows(other, data, split, [0]), rtol=1e-4, atol=1e-5)


def encoded_rows(vae, data: Path, split: str, rows: list[int]) -> np.ndarray:
    """The posterior modes of the cines of ``split`` at ``rows``, encoded here: ``(len(rows), C, 50, h, w)``."""
    from ecgflowcmr.data.datasets import cine_from_uint8

    prepared = Prepared(data)
    index = prepared.split_indices(split)[rows]
    x = cine_from_uint8(torch.from_numpy(np.stack([np.asarray(prepared.cine[int(i)]) for i in index]))).unsqueeze(1)
    with torch.no_grad():
        return vae.encode(x).mode().numpy()


def test_a_resume_with_another_vae_gives_that_vaes_latents(tmp_path):
    """Rows written by VAE A before an interruption are not kept when VAE B resumes: every row
    and the template are B's (as a fresh extraction with B would give)."""
    data = write_fake_prepared(tmp_path / "data", n=6, masks=False)        # 2 train, 2 val, 2 test
    first, second = _tiny_vae(seed=0), _tiny_vae(seed=1)
    out = tmp_path / "latents"
    interrupted_extraction(first, data, out, batch_size=1, fail_at_call=2)  # train row 0 by A
    assert np.load(out / "train.done.npy").tolist() == [True, False]
    stale = np.load(out / "train.npy")[0].copy()
    template = extract_all(second, data, out, torch.device("cpu"), batch_size=2, progress=False)
    for split in ("train", "val", "test"):
        np.testing.assert_allclose(np.load(out / f"{split}.npy"), encoded_rows(second, data, split, [0, 1]),
                                   rtol=1e-4, atol=1e-5)
    assert np.abs(np.load(out / "train.npy")[0] - stale).max() > 1e-3      # A's row is gone
    train = np.load(out / "train.npy").astype(np.float64)
    np.testing.assert_allclose(template["template"].numpy(), train.mean(axis=(0, 2))[:, None], rtol=1e-5, atol=1e-6)
    assert template["vae_hash"] == second.state_hash()


def test_two_process_ddp_keeps_vae_and_discriminator_in_sync(tmp_path, fake_prepared):
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           str(ROOT / "tests" / "vae_ddp_worker.py"), str(ROOT / "configs" / "demo.yaml"), str(out),
           *TINY, "vae.disc_start=1", "vae.clip_frames=0", f"data.root={fake_prepared}",
           f"run_dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["world"] == 2 and result["gan"] == [False, True]
    assert result["d_loss"][0] == 0.0 and result["d_loss"][1] != 0.0
    assert result["vae_max_diff"] == 0.0 and result["disc_max_diff"] == 0.0   # gradients all-reduced
    assert result["rec_per_rank"][0] != result["rec_per_rank"][1]              # the ranks saw different data
