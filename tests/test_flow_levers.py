"""The flow's ECG levers: the ECG-predicted anchor (flow/anchor.py) and the motion-weighted loss."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ecgflowcmr.config import ConfigError, load_config
from ecgflowcmr.flow.anchor import AnchorHead
from ecgflowcmr.flow.generator import ECGToCine
from ecgflowcmr.flow.transport import TemplateAnchor, flow_matching_loss, interpolate, motion_weighted_mse
from tests.flow_fakes import build_run, tiny_config, use_bridges

ROOT = Path(__file__).resolve().parents[1]


def test_motion_weighted_mse_splits_error_into_time_mean_and_motion():
    # error = static s (constant over time) + motion m (zero time mean): MSE = s^2 + mean(m^2)
    static, motion = 0.5, torch.tensor([1.0, -1.0, 2.0, -2.0])       # mean(m^2) = 2.5
    err = (static + motion).view(1, 1, 4, 1, 1).expand(2, 3, 4, 2, 2)
    target = torch.zeros_like(err)
    assert torch.allclose(motion_weighted_mse(err, target), torch.full((2,), 0.25 + 2.5))
    assert torch.allclose(motion_weighted_mse(err, target, motion_weight=3.0), torch.full((2,), 0.25 + 4 * 2.5))
    # a purely static error is not weighted at all
    assert torch.allclose(motion_weighted_mse(torch.full_like(err, static), target, 3.0), torch.full((2,), 0.25))


def test_ecg_anchor_mean_replaces_the_template_and_oracle_velocity_has_zero_loss():
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(3, 4, 6, 2, 2, generator=g)
    noise = torch.randn(3, 4, 6, 2, 2, generator=g)
    mean = torch.randn(3, 4, 6, 2, 2, generator=g)
    anchor = TemplateAnchor(torch.zeros(4, 1, 2, 2), alpha=0.5)
    assert torch.allclose(anchor.sample(noise, mean), mean + 0.5 * noise)
    z0 = mean + 0.5 * noise
    t = torch.tensor([0.1, 0.5, 0.9])

    def oracle(z_t, t_, **_):          # the straight path's velocity, read off z_t alone
        return (z1 - z_t) / (1 - t_).view(-1, 1, 1, 1, 1)

    loss = flow_matching_loss(oracle, z1, anchor, t, noise, anchor_mean=mean, motion_weight=2.0)
    assert loss.item() == pytest.approx(0.0, abs=1e-10)

    def from_ecg_anchor(z_t, t_, **_):   # the velocity of the ECG-anchored path: z1 - (mean + alpha eps)
        return z1 - z0

    assert flow_matching_loss(from_ecg_anchor, z1, anchor, t, noise, anchor_mean=mean).item() == \
        pytest.approx(0.0, abs=1e-10)
    # without anchor_mean the path starts at the template: that velocity is off by (template - mean)
    expected = (mean - anchor.template.unsqueeze(0)).pow(2).flatten(1).mean(1).mean()
    assert flow_matching_loss(from_ecg_anchor, z1, anchor, t, noise).item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.allclose(interpolate(z0, z1, t), (1 - t).view(-1, 1, 1, 1, 1) * z0 + t.view(-1, 1, 1, 1, 1) * z1)


def test_anchor_head_starts_at_the_template_and_learns_an_ecg_determined_latent():
    torch.manual_seed(0)
    c, frames, h, w, e = 2, 8, 3, 3, 6
    template = torch.randn(c, 1, h, w)
    head = AnchorHead(template, ecg_dim=e, num_frames=frames, hidden=32, kernel=3)
    tokens, pooled = torch.randn(16, frames, e), torch.randn(16, e)
    assert torch.equal(head(tokens, pooled), template.unsqueeze(0).expand(16, c, frames, h, w))
    # a latent that is the template plus a linear readout of each frame's token
    readout = torch.randn(e, c * h * w) * 0.3
    z1 = template.unsqueeze(0) + (tokens @ readout).view(16, frames, c, h, w).transpose(1, 2)
    opt = torch.optim.Adam(head.parameters(), lr=2e-2)
    start = motion_weighted_mse(head(tokens, pooled), z1).mean().item()
    for _ in range(120):
        loss = motion_weighted_mse(head(tokens, pooled), z1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05 * start
    clone = AnchorHead.from_arch(head.arch)
    clone.load_state_dict(head.state_dict())
    assert torch.equal(clone(tokens, pooled), head(tokens, pooled))


@pytest.mark.parametrize("overrides, key", [
    (["flow.anchor=mean"], "flow.anchor"),
    (["flow.anchor=ecg", "flow.use_template=false"], "flow.anchor"),
    (["flow.anchor=ecg", "flow.ecg_finetune=true"], "flow.anchor"),
    (["flow.motion_weight=-1"], "flow.motion_weight"),
    (["flow.anchor_hidden=0"], "flow.anchor_hidden"),
    (["flow.anchor_steps=-1"], "flow.anchor_steps"),
    (["flow.anchor_lr=0"], "flow.anchor_lr"),
    (["flow.balance_power=-0.5"], "flow.balance_power"),
])
def test_bad_lever_settings_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key):
        load_config(ROOT / "configs" / "demo.yaml", overrides)


@pytest.fixture()
def fake_bridges(monkeypatch):
    use_bridges(monkeypatch, real_ecg=False, real_vae=False)


@pytest.mark.parametrize("residual", [False, True])
def test_ecg_anchor_end_to_end_fit_train_resume_and_generate(tmp_path, fake_bridges, residual):
    from ecgflowcmr.flow.trainer import train

    run = build_run(tmp_path / "run", n=12, real_ecg=False, real_vae=False)
    cfg = tiny_config(run, "flow.epochs=2", "flow.anchor=ecg", "flow.anchor_steps=30", "flow.anchor_hidden=16",
                      "flow.motion_weight=4", f"flow.anchor_residual={str(residual).lower()}")
    train(cfg, stop_after_epochs=1)
    log = [json.loads(line) for line in (run / "flow" / "log.jsonl").read_text().splitlines()]
    fits = [r for r in log if "anchor_val_mse" in r]
    assert len(fits) == 1 and fits[0]["anchor_steps"] == 30
    # before fitting, the head is the template: its val MSE is the template's, computed by hand
    tpl = torch.load(run / "latents" / "template.pt", weights_only=True)
    norm = lambda z: (z - tpl["mean"].view(1, -1, 1, 1, 1)) / tpl["std"].view(1, -1, 1, 1, 1)  # noqa: E731
    val = norm(torch.from_numpy(np.load(run / "latents" / "val.npy")))
    by_hand = (val - norm(tpl["template"][None])).pow(2).flatten(1).mean(1).mean()
    assert fits[0]["anchor_val_mse_template"] == pytest.approx(by_hand.item(), rel=1e-5)
    ckpt = torch.load(run / "flow" / "last.pt", weights_only=True)
    saved = {k: v.clone() for k, v in ckpt["anchor_head"]["state_dict"].items()}
    # early stopping keeps the best head on the val split: never worse than where it started
    assert fits[0]["anchor_val_mse"] <= fits[0]["anchor_val_mse_template"]
    assert 0 <= fits[0]["anchor_best_step"] <= 30
    assert (saved["static.weight"].abs().sum() > 0) == (fits[0]["anchor_best_step"] > 0)
    assert ckpt["flow"]["anchor"] == "ecg" and ckpt["flow"]["motion_weight"] == 4.0
    assert ckpt["flow"]["residual_input"] is residual

    if not residual:                             # resume once: the head is loaded, never re-fitted
        train(cfg)
    log = [json.loads(line) for line in (run / "flow" / "log.jsonl").read_text().splitlines()]
    assert sum("anchor_val_mse" in r for r in log) == 1
    ckpt = torch.load(run / "flow" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == (1 if residual else 2)
    assert all(torch.equal(saved[k], v) for k, v in ckpt["anchor_head"]["state_dict"].items())

    pipe = ECGToCine.from_checkpoint(run / "flow" / "last.pt")
    assert pipe.anchor_head is not None and pipe.anchor.residual_input is residual
    ecg = torch.randn(2, 12, 5000) * 0.1
    out = pipe.generate(ecg, seeds=[1, 2], steps=2)
    regressed = pipe.regress(ecg)
    assert out.cine.shape == regressed.cine.shape == (2, 1, 50, 96, 96)
    # the regressor is deterministic and is where the flow starts at zero noise
    cycle = pipe.encode(ecg)
    mean = pipe.anchor_mean(cycle.tokens, cycle.pooled)
    assert torch.allclose(pipe.initial(torch.zeros_like(mean), mean), mean)
    assert torch.equal(pipe.regress(ecg).latents, regressed.latents)




def test_ecg_anchored_generation_starts_at_the_heads_output_plus_alpha_noise():
    """With a velocity of zero (a fresh DiT: zero-initialised output) the flow stays where it
    starts, so the generated latents ARE z0: head(ECG) + alpha * eps for the seeds' eps, mapped
    back to the VAE scale; not the template plus noise."""
    from ecgflowcmr.flow.dit import FlowDiT
    from ecgflowcmr.flow.generator import seeded_noise_batch
    from ecgflowcmr.flow.transport import LatentNorm
    from tests.flow_fakes import FAKE_DIM, FakeECGEncoder, FakeVAE

    torch.manual_seed(0)
    vae = FakeVAE(4)
    tpl = {"template": torch.randn(4, 1, 4, 4), "mean": torch.randn(4), "std": torch.rand(4) + 0.5,
           "vae_hash": vae.state_hash()}                                   # 4 x 4 latents: a fast DiT
    norm = LatentNorm.from_template(tpl)
    head = AnchorHead(norm.normalize(tpl["template"][None])[0], ecg_dim=FAKE_DIM, num_frames=50, hidden=8, kernel=3)
    with torch.no_grad():                       # a head that has learnt something: not the template
        for layer in (head.static, head.frame_mlp[-1]):
            layer.weight.normal_(std=0.3)
            layer.bias.normal_(std=0.3)
    dit = FlowDiT(latent_size=4, ecg_dim=FAKE_DIM, hidden=16, depth=1, heads=2, patch_size=2)
    alpha = 0.5
    ecg = torch.randn(2, 12, 5000) * 0.1
    for residual in (False, True):
        pipe = ECGToCine(dit, FakeECGEncoder(), vae, tpl, norm, alpha, True, torch.device("cpu"), amp=False,
                         anchor_head=head, residual_input=residual)
        cycle = pipe.encode(ecg)
        with torch.no_grad():
            mean = head(cycle.tokens, cycle.pooled)                            # (2, 4, 50, 4, 4)
        eps = seeded_noise_batch([7, 8], pipe.latent_shape)
        for sampler, guidance in (("euler", 1.0), ("heun", 2.0)):
            out = pipe.generate(ecg, seeds=[7, 8], sampler=sampler, steps=2, guidance=guidance, cycle=cycle)
            torch.testing.assert_close(out.latents, norm.denormalize(mean + alpha * eps), atol=1e-5, rtol=1e-5)
        template_start = norm.denormalize(norm.normalize(tpl["template"][None]) + alpha * eps)
        assert (out.latents - template_start).abs().max() > 0.1


def test_snapshots_hold_the_ema_weights_at_the_requested_steps_and_a_template_run_cannot_regress(
        tmp_path, fake_bridges):
    from ecgflowcmr.flow.trainer import train

    run = build_run(tmp_path / "run", n=12, real_ecg=False, real_vae=False)
    train(tiny_config(run, "flow.epochs=2", "flow.snapshot_steps=[1,3]"))       # 2 steps per epoch
    snaps = sorted((run / "flow" / "snapshots").glob("*.pt"))
    assert [p.name for p in snaps] == ["step_000001.pt", "step_000003.pt"]
    first, last = (torch.load(p, weights_only=True) for p in snaps)
    assert (first["step"], last["step"]) == (1, 3)
    final = torch.load(run / "flow" / "last.pt", weights_only=True)
    assert final["step"] == 4
    assert any(not torch.equal(last["ema"][k], final["ema"][k]) for k in final["ema"])   # a step later: moved
    assert ECGToCine.from_checkpoint(snaps[0]).info["step"] == 1
    with pytest.raises(ValueError, match="flow.anchor=ecg"):     # the template anchor has no head to decode
        ECGToCine.from_checkpoint(run / "flow" / "last.pt").regress(torch.randn(1, 12, 5000) * 0.1)


def test_residual_input_moves_the_network_into_the_anchors_frame():
    """The network sees z_t - head(ECG); the target velocity is unchanged. An oracle that knows only
    the residual r1 = z1 - mean (not the subject's anchor) has zero loss in that frame only."""
    g = torch.Generator().manual_seed(1)
    z1, noise, mean = (torch.randn(2, 4, 6, 2, 2, generator=g) for _ in range(3))
    t = torch.tensor([0.3, 0.7])
    r1 = z1 - mean

    def residual_oracle(r_t, t_, **_):
        return (r1 - r_t) / (1 - t_).view(-1, 1, 1, 1, 1)

    residual = TemplateAnchor(torch.zeros(4, 1, 2, 2), alpha=1.0, residual_input=True)
    absolute = TemplateAnchor(torch.zeros(4, 1, 2, 2), alpha=1.0)
    assert flow_matching_loss(residual_oracle, z1, residual, t, noise, anchor_mean=mean).item() < 1e-10
    assert flow_matching_loss(residual_oracle, z1, absolute, t, noise, anchor_mean=mean).item() > 0.1
    # the template anchor is never shifted
    assert torch.equal(residual.model_input(z1, None), z1)


def test_a_checkpoint_that_predates_a_lever_key_resumes_as_its_default():
    from ecgflowcmr.config import config_diffs
    from ecgflowcmr.flow.trainer import RESUME_ALSO
    from ecgflowcmr.utils.stage import RESUMABLE_KEYS

    def _config_diffs(old, new):
        return config_diffs(old, new, "flow", RESUMABLE_KEYS, RESUME_ALSO)

    new = load_config("configs/demo.yaml", ["flow.anchor=template", "flow.alpha=1.0", "flow.motion_weight=0"]).to_dict()
    old = json.loads(json.dumps(new))
    for key in ("anchor", "anchor_residual", "motion_weight"):   # written before these keys existed
        del old["flow"][key]
    assert _config_diffs(old, new) == []
    changed = load_config("configs/demo.yaml", ["flow.anchor=template", "flow.alpha=1.0",
                                                "flow.motion_weight=3"]).to_dict()
    assert _config_diffs(old, changed) == ["flow.motion_weight: 0.0 -> 3.0"]
