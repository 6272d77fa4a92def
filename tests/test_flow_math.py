"""Flow matching and samplers against closed forms (stage 3/4 maths, no training)."""
from __future__ import annotations

import pytest
import torch

from ecgflowcmr.flow.dit import FlowDiT
from ecgflowcmr.flow.generator import ECGToCine, sample_seed, seeded_noise_batch
from ecgflowcmr.flow.samplers import guided_velocity, integrate, nfe_per_step
from ecgflowcmr.flow.transport import (
    LatentNorm,
    TemplateAnchor,
    cfg_drop_mask,
    flow_matching_loss,
    interpolate,
    sample_t,
    target_velocity,
    template_hash,
    validation_t_grid,
)
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


def _oracle(z1: torch.Tensor):
    """The exact velocity towards ``z1`` from anywhere on the straight path: (z1 - z_t) / (1 - t)."""
    return lambda z_t, t: (z1 - z_t) / (1 - t).view(-1, 1, 1, 1, 1)


def test_oracle_velocity_has_zero_loss_and_a_reversed_velocity_the_known_one():
    """The oracle uses z_t and t, so the loss is zero only if z_t lies on the anchor -> data path."""
    gen = torch.Generator().manual_seed(0)
    anchor = TemplateAnchor(torch.randn(4, 1, 12, 12, generator=gen), alpha=0.7)
    z1, noise = torch.randn(SHAPE, generator=gen), torch.randn(SHAPE, generator=gen)
    t = torch.tensor([0.2, 0.9])
    assert float(flow_matching_loss(_oracle(z1), z1, anchor, t, noise)) < 1e-10
    # the oracle of the reversed path (data -> anchor) is off by (z1 - z0) / (1 - t) per element
    z0 = anchor.sample(noise)
    reversed_oracle = lambda z_t, t_: (z0 - z_t) / (1 - t_).view(-1, 1, 1, 1, 1)   # noqa: E731
    per_sample = flow_matching_loss(reversed_oracle, z1, anchor, t, noise, reduce=False)
    expected = ((z1 - z0) ** 2).flatten(1).mean(1) / (1 - t) ** 2
    assert torch.allclose(per_sample, expected, rtol=1e-4)
    assert float(per_sample.min()) > 1.0                       # clearly non-zero


def test_euler_with_the_oracle_stays_on_the_path_and_lands_on_the_data():
    z0, z1 = torch.randn(2, 4, 5, 3, 3), torch.randn(2, 4, 5, 3, 3)    # elementwise: a small latent will do
    for steps in (1, 4, 7):
        assert torch.allclose(integrate(_oracle(z1), z0, steps, "euler"), z1, atol=1e-5)
        # stopped half way it sits at the midpoint of the straight path
        half = integrate(_oracle(z1), z0, 2 * steps, "euler", t1=0.5)
        assert torch.allclose(half, 0.5 * (z0 + z1), atol=1e-5)


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
    """A model that reads z1 from the ECG condition is the oracle: zero conditional loss. With the
    null condition it predicts -z_t / (1 - t), off by -z1 / (1 - t): the known excess."""
    from ecgflowcmr.flow.trainer import VAL_T_POINTS, validation_loss

    gen = torch.Generator().manual_seed(0)
    z1s = [torch.randn(2, 3, 4, 4, generator=gen) for _ in range(5)]
    items = [{"row": i, "z1": z1, "tokens": torch.randn(5, 6, generator=gen), "pooled": z1.flatten()}
             for i, z1 in enumerate(z1s)]
    anchor = TemplateAnchor(torch.randn(2, 1, 4, 4, generator=gen), alpha=1.0)
    drops = []

    def ignores_ecg(z_t, t, ecg_tokens, ecg_pooled, drop=None):
        drops.append(drop)
        return -z_t

    def uses_ecg(z_t, t, ecg_tokens, ecg_pooled, drop=None):
        z1 = ecg_pooled.view(z_t.shape)
        if drop is not None:
            z1 = torch.where(drop.view(-1, 1, 1, 1, 1), torch.zeros_like(z1), z1)
        return (z1 - z_t) / (1 - t).view(-1, 1, 1, 1, 1)

    kw = dict(dataset=items, anchor=anchor, device=torch.device("cpu"), batch_size=2, seed=0, amp=False)
    assert validation_loss(ignores_ecg, **kw, unconditional=True) == validation_loss(ignores_ecg, **kw)
    assert all(d is None for d in drops[len(drops) // 2:])
    assert all(bool(d.all()) and d.shape == (len(d),) for d in drops[:len(drops) // 2])
    assert validation_loss(uses_ecg, **kw) < 1e-10
    t = validation_t_grid(VAL_T_POINTS).double()
    expected = float(torch.stack([(z ** 2).mean() for z in z1s]).double().mean() * (1 / (1 - t) ** 2).mean())
    assert validation_loss(uses_ecg, **kw, unconditional=True) == pytest.approx(expected, rel=1e-4)


def test_validation_on_a_fixed_subsample_of_val_subjects():
    """``flow.val_subjects``: the same evenly spread rows every time, and the loss over exactly them."""
    from ecgflowcmr.flow.trainer import validation_loss, validation_rows

    assert validation_rows(10, 3) == [0, 4, 9]
    assert validation_rows(10, 0) == validation_rows(10, 10) == validation_rows(10, 99) == list(range(10))
    assert len(validation_rows(4200, 512)) == 512
    gen = torch.Generator().manual_seed(0)
    items = [{"row": i, "z1": torch.randn(2, 3, 4, 4, generator=gen), "tokens": torch.zeros(5, 6),
              "pooled": torch.zeros(6)} for i in range(9)]
    anchor = TemplateAnchor(torch.zeros(2, 1, 4, 4), alpha=1.0)

    def model(z_t, t, ecg_tokens, ecg_pooled, drop=None):
        return -z_t

    kw = dict(anchor=anchor, device=torch.device("cpu"), batch_size=2, seed=0, amp=False)
    subset = validation_loss(model, items, subjects=3, **kw)
    rows = validation_rows(len(items), 3)                 # [0, 4, 8]
    per_row = [validation_loss(model, [items[r]], **kw) for r in rows]
    assert subset == pytest.approx(sum(per_row) / len(per_row), rel=1e-6)
    assert subset != pytest.approx(validation_loss(model, items, **kw), rel=1e-3)
