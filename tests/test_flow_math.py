"""Flow matching and samplers against closed forms (stage 3/4 maths, no training)."""
from __future__ import annotations

import pytest
import torch

from ecgflowcmr.flow.dit import FlowDiT
from ecgflowcmr.flow.generator import ECGToCine, sample_seed, seeded_noise_batch
from ecgflowcmr.flow.samplers import guided_velocity, integrate, nfe_per_step
from ecgflowcmr.flow.transport import (LatentNorm, TemplateAnchor, cfg_drop_mask, flow_matching_loss,
                                       interpolate, sample_t, target_velocity, template_hash,
                                       validation_t_grid)
from tests.flow_fakes import FakeVAE

SHAPE = (2, 4, 50, 12, 12)


def test_euler_integrates_constant_velocity_exactly():
    z0, v = torch.randn(SHAPE), torch.randn(SHAPE)
    for steps in (1, 2, 7):
        z1 = integrate(lambda z, t: v, z0, steps, "euler")
        assert torch.allclose(z1, z0 + v, atol=1e-5)


@pytest.mark.parametrize("method", ["heun", "midpoint"])
def test_second_order_samplers_exact_for_linear_in_t_field(method):
    z0, a, b = torch.randn(SHAPE), torch.randn(SHAPE), torch.randn(SHAPE)
    field = lambda z, t: a + b * t.view(-1, 1, 1, 1, 1)        # noqa: E731  z(1) = z0 + a + b / 2
    for steps in (1, 3):
        z1 = integrate(field, z0, steps, method)
        assert torch.allclose(z1, z0 + a + b / 2, atol=1e-5)


def test_euler_on_linear_field_has_the_known_left_riemann_error():
    z0, a, b = torch.randn(SHAPE), torch.randn(SHAPE), torch.randn(SHAPE)
    field = lambda z, t: a + b * t.view(-1, 1, 1, 1, 1)        # noqa: E731
    n = 4                                                       # sum_i (i/n) / n = (n-1) / (2n)
    assert torch.allclose(integrate(field, z0, n, "euler"), z0 + a + b * (n - 1) / (2 * n), atol=1e-5)
    assert nfe_per_step("euler") == 1 and nfe_per_step("heun") == 2


def test_straight_path_endpoints_and_target():
    z0, z1 = torch.randn(SHAPE), torch.randn(SHAPE)
    assert torch.allclose(interpolate(z0, z1, torch.zeros(2)), z0)
    assert torch.allclose(interpolate(z0, z1, torch.ones(2)), z1)
    mid = interpolate(z0, z1, torch.tensor([0.25, 0.75]))
    assert torch.allclose(mid[0], 0.75 * z0[0] + 0.25 * z1[0], atol=1e-6)
    # the exact velocity integrates the path exactly with one Euler step, and has zero loss
    anchor = TemplateAnchor(torch.zeros(4, 1, 12, 12), alpha=1.0)
    assert torch.allclose(integrate(lambda z, t: target_velocity(z0, z1), z0, 1), z1, atol=1e-6)
    loss = flow_matching_loss(lambda z, t: z1 - anchor.sample(z0), z1, anchor, torch.rand(2), z0)
    assert float(loss) < 1e-10


def test_template_anchor_and_ablation():
    template = torch.randn(4, 1, 12, 12)
    noise = torch.randn(SHAPE)
    z0 = TemplateAnchor(template, alpha=0.5).sample(noise)
    assert torch.allclose(z0, template[None] + 0.5 * noise)
    assert torch.allclose(TemplateAnchor(template, alpha=0.0).sample(noise), template[None].expand(SHAPE))
    assert torch.equal(TemplateAnchor(template, alpha=0.5, use_template=False).sample(noise), noise)


def test_latent_norm_round_trip_and_template_hash():
    tpl = {"template": torch.randn(4, 1, 12, 12), "mean": torch.randn(4), "std": torch.rand(4) + 0.5,
           "vae_hash": "abc"}
    norm = LatentNorm.from_template(tpl)
    z = torch.randn(SHAPE) * 3 + 1
    assert torch.allclose(norm.denormalize(norm.normalize(z)), z, atol=1e-5)
    zn = norm.normalize(tpl["mean"].view(1, 4, 1, 1, 1).expand(SHAPE))
    assert zn.abs().max() < 1e-6
    other = dict(tpl, template=tpl["template"] + 1e-3)
    assert template_hash(tpl) == template_hash(dict(tpl)) != template_hash(other)


def test_t_sampling_and_drop_mask():
    for mode in ("uniform", "logit_normal"):
        t = sample_t(10000, mode, generator=torch.Generator().manual_seed(0))
        assert t.min() >= 0 and t.max() < 1 and abs(float(t.mean()) - 0.5) < 0.02
    t_u = sample_t(10000, "uniform", generator=torch.Generator().manual_seed(0))
    t_l = sample_t(10000, "logit_normal", generator=torch.Generator().manual_seed(0))
    assert t_l.std() < t_u.std()                   # logit-normal concentrates mid-path
    with pytest.raises(ValueError):
        sample_t(3, "cosine")
    assert not cfg_drop_mask(5, 0.0).any()
    frac = cfg_drop_mask(20000, 0.1, generator=torch.Generator().manual_seed(0)).float().mean()
    assert abs(float(frac) - 0.1) < 0.01
    grid = validation_t_grid(8)
    assert torch.allclose(grid, (torch.arange(8) + 0.5) / 8)


def _perturbed_dit(seed: int = 0) -> FlowDiT:
    torch.manual_seed(seed)
    dit = FlowDiT(ecg_dim=8, hidden=32, depth=1, heads=2, patch_size=2)
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return dit.eval()


def test_guidance_one_is_the_conditional_prediction_and_batched_once():
    dit = _perturbed_dit()
    z, t = torch.randn(SHAPE), torch.rand(2)
    tokens, pooled = torch.randn(2, 50, 8), torch.randn(2, 8)
    calls = []

    def model(z_, t_, tok, pool, drop):
        calls.append(z_.shape[0])
        return dit(z_, t_, tok, pool, drop)

    with torch.no_grad():
        cond = dit(z, t, tokens, pooled)
        uncond = dit(z, t, tokens, pooled, torch.ones(2, dtype=torch.bool))
        assert torch.allclose(guided_velocity(model, tokens, pooled, 1.0)(z, t), cond, atol=1e-6)
        assert calls == [2]
        g = guided_velocity(model, tokens, pooled, 2.5)(z, t)
        assert calls[-1] == 4                      # cond + uncond in ONE forward of batch 2B
        assert torch.allclose(g, uncond + 2.5 * (cond - uncond), atol=1e-5)
        assert not torch.allclose(cond, uncond, atol=1e-4)


def test_alpha_zero_and_zero_velocity_gives_the_decoded_template():
    dit = FlowDiT(ecg_dim=8, hidden=16, depth=1, heads=2, patch_size=2)       # zero-initialised output
    vae = FakeVAE(4)
    tpl = {"template": torch.randn(4, 1, 12, 12), "mean": torch.randn(4), "std": torch.rand(4) + 0.5,
           "vae_hash": vae.state_hash()}
    encoder_out_tokens, pooled = torch.randn(2, 50, 8), torch.randn(2, 8)
    pipe = ECGToCine(dit, None, vae, tpl, LatentNorm.from_template(tpl), alpha=0.0, use_template=True,
                     device=torch.device("cpu"))
    noise = seeded_noise_batch([1, 2], pipe.latent_shape)
    for sampler, guidance in (("euler", 2.0), ("heun", 1.0)):
        z = pipe.sample_latents(encoder_out_tokens, pooled, noise, sampler, steps=2, guidance=guidance)
        cine, latents = pipe.decode(z)
        expected_latents = tpl["template"][None].expand(2, 4, 50, 12, 12)
        assert torch.allclose(latents, expected_latents, atol=1e-5)
        assert torch.allclose(cine, vae.decode(expected_latents).clamp(-1, 1), atol=1e-5)
        assert torch.allclose(cine[:1], pipe.template_video(), atol=1e-5)    # the template-only baseline


def test_seeds_are_per_subject_and_sample():
    assert sample_seed(0, "S1", 0) == sample_seed(0, "S1", 0)
    seeds = {sample_seed(0, "S1", 0), sample_seed(0, "S1", 1), sample_seed(0, "S2", 0), sample_seed(1, "S1", 0)}
    assert len(seeds) == 4
    a = seeded_noise_batch([5, 6], (4, 2, 3, 3))
    b = seeded_noise_batch([6], (4, 2, 3, 3))
    assert torch.equal(a[1], b[0])                 # a sample's noise does not depend on its batch


def test_null_ecg_validation_loss_measures_how_much_the_model_uses_the_ecg():
    from ecgflowcmr.flow.trainer import validation_loss

    gen = torch.Generator().manual_seed(0)
    items = [{"row": i, "z1": torch.randn(2, 3, 4, 4, generator=gen), "tokens": torch.randn(5, 6, generator=gen),
              "pooled": torch.randn(6, generator=gen)} for i in range(5)]
    anchor = TemplateAnchor(torch.zeros(2, 1, 4, 4), alpha=1.0)
    drops = []

    def ignores_ecg(z_t, t, ecg_tokens, ecg_pooled, drop=None):
        drops.append(drop)
        return -z_t

    def uses_ecg(z_t, t, ecg_tokens, ecg_pooled, drop=None):
        scale = ecg_pooled.mean(1) if drop is None else torch.where(drop, 0.0, ecg_pooled.mean(1))
        return -z_t + scale.view(-1, 1, 1, 1, 1)

    kw = dict(dataset=items, anchor=anchor, device=torch.device("cpu"), batch_size=2, seed=0, amp=False)
    assert validation_loss(ignores_ecg, **kw, unconditional=True) == validation_loss(ignores_ecg, **kw)
    assert all(d is None for d in drops[len(drops) // 2:])
    assert all(bool(d.all()) and d.shape == (len(d),) for d in drops[:len(drops) // 2])
    assert validation_loss(uses_ecg, **kw, unconditional=True) != pytest.approx(validation_loss(uses_ecg, **kw))
