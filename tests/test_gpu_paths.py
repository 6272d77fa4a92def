"""The CUDA paths, kept honest on CPU: bf16 autocast where CUDA runs it (``torch.autocast("cpu",
bfloat16)`` stands in for ``utils.device.autocast``'s CUDA branch) with dtype checks, SDPA calls
split below the kernel's sequence limit, datasets that reach DataLoader workers as file names,
sample files written off the generation loop."""
from __future__ import annotations

import contextlib
import pickle
import threading

import numpy as np
import pandas as pd
import pytest
import torch

from ecgflowcmr.config import load_config
from ecgflowcmr.data.datasets import Prepared, PreparedDataset
from ecgflowcmr.ecg.dataset import ECGPhaseDataset
from ecgflowcmr.flow import generator as generator_module
from ecgflowcmr.flow import trainer as flow_trainer
from ecgflowcmr.flow.dit import FlowDiT
from ecgflowcmr.flow.generator import ECGToCine
from ecgflowcmr.flow.infer import BackgroundWriter
from ecgflowcmr.flow.transport import LatentNorm, TemplateAnchor, flow_matching_loss
from ecgflowcmr.utils import attention
from ecgflowcmr.vae import VAE3D
from ecgflowcmr.vae import trainer as vae_trainer

from .conftest import write_fake_prepared
from .flow_fakes import FakeECGEncoder


def _cpu_bf16(device, enabled=True):
    return torch.autocast("cpu", dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


@pytest.fixture
def cpu_bf16(monkeypatch):
    """Make the given modules' ``autocast(device, enabled)`` do on CPU what it does on CUDA."""
    def apply(*modules):
        for module in modules:
            monkeypatch.setattr(module, "autocast", _cpu_bf16)
    return apply


def _record_dtypes(module: torch.nn.Module, kind=torch.nn.Conv3d) -> list:
    seen = []
    for m in module.modules():
        if isinstance(m, kind):
            m.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    return seen


# ----------------------------------------------------------------------------------------------
# bf16
# ----------------------------------------------------------------------------------------------


def test_generation_encodes_and_decodes_in_bf16_and_returns_fp32(cpu_bf16):
    cpu_bf16(generator_module)
    torch.manual_seed(0)
    encoder = FakeECGEncoder()
    vae = VAE3D(latent_channels=4, base_channels=4, channel_mult=[1], temporal_levels=0, attention=False).eval()
    tpl = {"template": torch.randn(4, 1, 12, 12), "mean": torch.zeros(4), "std": torch.ones(4),
           "vae_hash": vae.state_hash()}
    dit = FlowDiT(ecg_dim=16, hidden=16, depth=1, heads=2, patch_size=2)
    pipe = ECGToCine(dit, encoder, vae, tpl, LatentNorm.from_template(tpl), 1.0, True, torch.device("cpu"))
    enc_dtypes, vae_dtypes, dit_dtypes = (_record_dtypes(encoder, torch.nn.Conv1d), _record_dtypes(vae),
                                          _record_dtypes(dit, torch.nn.Linear))
    ecg = torch.randn(2, 12, 5000)
    out = pipe.generate(ecg, [1, 2], "euler", steps=2, guidance=2.0)
    assert set(enc_dtypes) == set(vae_dtypes) == set(dit_dtypes) == {torch.bfloat16}
    assert out.cine.dtype == out.latents.dtype == torch.float32
    assert pipe.encode(ecg).tokens.dtype == torch.float32
    pipe.amp = False                                       # the same pipeline in fp32: bf16-close
    reference = pipe.generate(ecg, [1, 2], "euler", steps=2, guidance=2.0)
    assert torch.float32 in vae_dtypes[-2:]
    assert 0 < (out.cine - reference.cine).abs().max() < 0.1


def test_flow_step_in_bf16_keeps_fp32_weights_and_gradients_and_checkpointing_agrees():
    torch.manual_seed(0)
    dit = FlowDiT(ecg_dim=8, hidden=16, depth=2, heads=2, patch_size=2, num_frames=10)
    with torch.no_grad():                                  # leave adaLN-Zero so every branch is live
        for p in dit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    z1, tokens = torch.randn(2, 4, 10, 12, 12), torch.randn(2, 50, 8)
    anchor = TemplateAnchor(torch.zeros(4, 1, 12, 12), alpha=1.0)
    t, noise, drop = torch.rand(2), torch.randn(2, 4, 10, 12, 12), torch.tensor([False, True])
    linear_dtypes = _record_dtypes(dit, torch.nn.Linear)
    grads = []
    for checkpoint in (False, True):
        dit.grad_checkpoint = checkpoint
        dit.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = flow_matching_loss(dit, z1, anchor, t, noise, drop=drop, ecg_tokens=tokens,
                                      ecg_pooled=tokens.mean(1))
        loss.backward()
        assert loss.dtype == torch.float32
        assert all(p.dtype == torch.float32 and (p.grad is None or p.grad.dtype == torch.float32)
                   for p in dit.parameters())
        grads.append(torch.cat([p.grad.flatten() for p in dit.parameters() if p.grad is not None]))
    assert set(linear_dtypes) == {torch.bfloat16}
    torch.testing.assert_close(grads[1], grads[0])         # recomputation repeats the bf16 forward


def test_vae_step_in_bf16_updates_fp32_weights(cpu_bf16, tmp_path):
    cpu_bf16(vae_trainer)
    cfg = load_config(None, ["device=cpu", "vae.base_channels=4", "vae.channel_mult=[1,1,2,2]",
                             "vae.temporal_levels=2", "vae.clip_frames=4", "vae.disc_channels=4",
                             "vae.disc_layers=2", "vae.disc_start=0", f"run_dir={tmp_path}"])
    torch.manual_seed(0)
    trainer = vae_trainer.VAETrainer(cfg, torch.device("cpu"), total_steps=4)
    vae_dtypes, disc_dtypes = _record_dtypes(trainer.model), _record_dtypes(trainer.disc)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    stats = trainer.train_step(torch.rand(2, 1, 50, 96, 96) * 2 - 1)
    assert set(vae_dtypes) == set(disc_dtypes) == {torch.bfloat16}
    assert all(np.isfinite(v) for v in stats.values()) and stats["d_loss"] > 0
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, trainer.model.parameters()))


def test_token_cache_runs_the_encoder_in_bf16_and_stores_fp32(cpu_bf16, tmp_path):
    cpu_bf16(flow_trainer)
    data = write_fake_prepared(tmp_path / "data", n=6)
    prepared = Prepared(data)
    torch.manual_seed(0)
    encoder = FakeECGEncoder()
    dtypes = _record_dtypes(encoder, torch.nn.Conv1d)
    rows = prepared.split_indices("all")
    for amp, folder in ((True, tmp_path / "bf16"), (False, tmp_path / "fp32")):
        flow_trainer.ConditionCache.build(folder, encoder, prepared.ecg, rows, torch.device("cpu"), 4, amp=amp)
    assert dtypes[:2] == [torch.bfloat16] * 2 and dtypes[2:] == [torch.float32] * 2
    bf16, fp32 = flow_trainer.ConditionCache(tmp_path / "bf16"), flow_trainer.ConditionCache(tmp_path / "fp32")
    assert bf16.tokens.dtype == np.float32 and bf16.tokens.shape == (6, 50, 16)
    assert 0 < np.abs(bf16.tokens - fp32.tokens).max() < 0.05 * np.abs(fp32.tokens).max()


# ----------------------------------------------------------------------------------------------
# SDPA sequence limit
# ----------------------------------------------------------------------------------------------


def test_attention_splits_calls_past_the_sequence_limit(monkeypatch):
    q, k, v = (torch.randn(7, 2, 5, 4) for _ in range(3))
    whole = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    calls = []
    original = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, k, v: calls.append(q.shape[0]) or original(q, k, v))
    torch.testing.assert_close(attention.sdpa(q, k, v, max_sequences=3), whole)
    assert calls == [3, 3, 1]
    calls.clear()
    monkeypatch.setattr(attention, "MAX_SEQUENCES", 100)   # the DiT's temporal attention: B*L sequences
    dit = FlowDiT(ecg_dim=8, hidden=16, depth=1, heads=2, patch_size=2)
    dit(torch.randn(3, 4, 50, 12, 12), torch.rand(3), torch.randn(3, 50, 8), torch.randn(3, 8))
    assert max(calls) <= 100 and 3 * 36 in [sum(calls[i:i + 2]) for i in range(len(calls))]


# ----------------------------------------------------------------------------------------------
# DataLoader workers under spawn / forkserver
# ----------------------------------------------------------------------------------------------


def test_datasets_pickle_as_file_names_and_reopen_their_memmaps(tmp_path):
    data = write_fake_prepared(tmp_path / "data", n=12)
    latents = tmp_path / "latents"
    latents.mkdir()
    n_train = len(Prepared(data).split_indices("train"))
    np.save(latents / "train.npy", np.random.default_rng(0).normal(size=(n_train, 4, 50, 12, 12)).astype(np.float32))
    pd.DataFrame({"row": np.arange(n_train), "index": Prepared(data).split_indices("train"),
                  "subject_id": [f"s{i}" for i in range(n_train)]}).to_csv(latents / "train_index.csv", index=False)
    split = flow_trainer.LatentSplit(latents, "train")
    norm = LatentNorm(torch.zeros(4), torch.ones(4))
    prepared = Prepared(data)
    datasets = [PreparedDataset(data, "train"), ECGPhaseDataset(data, "train"),
                flow_trainer.FlowDataset(split, norm, ecg_array=prepared.ecg)]
    for dataset in datasets:
        blob = pickle.dumps(dataset)
        assert len(blob) < 50_000                           # the arrays are megabytes
        copy = pickle.loads(blob)
        for a, b in zip(dataset[1].values(), copy[1].values()):
            assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    reopened = pickle.loads(pickle.dumps(datasets[2]))
    assert isinstance(reopened.ecg_array, np.memmap) and isinstance(reopened.split.z, np.memmap)
    assert str(pickle.loads(pickle.dumps(prepared)).cine.filename) == str(prepared.cine.filename)


# ----------------------------------------------------------------------------------------------
# Sample files off the critical path
# ----------------------------------------------------------------------------------------------


def test_background_writer_runs_in_order_without_blocking_and_reports_errors():
    release, order = threading.Event(), []
    writer = BackgroundWriter(depth=2)
    writer.submit(lambda: release.wait(10) and order.append("slow"))
    writer.submit(lambda: order.append("next"))            # returns while the first call still runs
    assert order == []
    release.set()
    writer.close()
    assert order == ["slow", "next"]

    def fail():
        raise OSError("disk full")

    writer = BackgroundWriter()
    writer.submit(fail)
    writer.submit(lambda: order.append("after an error"))
    with pytest.raises(OSError, match="disk full"):
        writer.close()
    assert order == ["slow", "next"]                       # nothing written after a failed batch


def test_pamae_training_runs_its_forward_in_bf16(cpu_bf16, monkeypatch, tmp_path):
    from ecgflowcmr.ecg import train as ecg_train

    from .test_pamae import TINY, write_synthetic_prepared

    cpu_bf16(ecg_train)
    seen, real_losses = [], ecg_train.pamae_losses

    def losses(out, label, weight):
        result = real_losses(out, label, weight)
        seen.append((out["recon"].dtype, out["sincos"].dtype, result["loss"].dtype))
        return result

    monkeypatch.setattr(ecg_train, "pamae_losses", losses)
    monkeypatch.setattr(ecg_train, "_figures", lambda *a, **k: None)     # matplotlib: seconds, not tested here
    data = write_synthetic_prepared(tmp_path / "data", n=8)
    cfg = load_config(None, TINY + [f"run_dir={tmp_path / 'run'}", f"data.root={data}", "ecg.max_steps=1",
                                   "ecg.val_every=100"])
    ecg_train.train(cfg)
    assert seen and set(seen) == {(torch.bfloat16, torch.bfloat16, torch.float32)}
    state = torch.load(tmp_path / "run" / "ecg" / "last.pt", weights_only=True)["model"]
    assert all(v.dtype == torch.float32 and bool(torch.isfinite(v).all())
               for v in state.values() if v.is_floating_point())


def test_flow_stage_trains_and_validates_in_bf16_with_fp32_weights(cpu_bf16, monkeypatch, tmp_path):
    from .flow_fakes import build_run, tiny_config, use_bridges

    use_bridges(monkeypatch, real_ecg=False, real_vae=False)
    cpu_bf16(flow_trainer)
    dtypes, real_build = [], flow_trainer.build_dit

    def build_dit(*args, **kwargs):
        dit = real_build(*args, **kwargs)
        dtypes.append(_record_dtypes(dit, torch.nn.Linear))
        return dit

    monkeypatch.setattr(flow_trainer, "build_dit", build_dit)
    run = build_run(tmp_path / "run", n=6, real_ecg=False, real_vae=False)
    summary = flow_trainer.train(tiny_config(run, "flow.max_steps=1", "flow.sample_every=0"))
    assert set(dtypes[0]) == {torch.bfloat16}                  # training step (EMA copy: validation)
    assert np.isfinite(summary["first_train_loss"]) and np.isfinite(summary["history"][-1]["val_loss"])
    ckpt = torch.load(run / "flow" / "last.pt", weights_only=True)
    for key in ("model", "ema"):
        assert all(v.dtype == torch.float32 for v in ckpt[key].values() if v.is_floating_point()), key
