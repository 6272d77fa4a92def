"""The ECG-conditioned video DiT: shapes, adaLN-Zero init, factorised attention, cross-attention
without per-position copies of the ECG keys, the null condition."""
from __future__ import annotations

import pytest
import torch

from ecgflowcmr.config import load_config
from ecgflowcmr.flow import dit as dit_module
from ecgflowcmr.flow.dit import FlowDiT, build_dit, sincos_3d


def _inputs(b=2, e=8, c=4):
    return torch.randn(b, c, 50, 12, 12), torch.rand(b), torch.randn(b, 50, e), torch.randn(b, e)


def _perturb(model, scale=0.05, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


@pytest.mark.parametrize("patch", [1, 2])
def test_shapes_zero_init_and_patchify_round_trip(patch):
    model = FlowDiT(ecg_dim=8, hidden=32, depth=2, heads=4, patch_size=patch)
    z, t, tok, pooled = _inputs()
    out = model(z, t, tok, pooled)
    assert out.shape == z.shape
    assert torch.count_nonzero(out) == 0                 # final layer zero-initialised
    assert torch.equal(model.unpatchify(model.patchify(z)), z)
    assert model.patchify(z).shape == (2, 50, (12 // patch) ** 2, 4 * patch * patch)


def test_every_block_starts_as_identity_and_learns_from_all_inputs():
    model = FlowDiT(ecg_dim=8, hidden=32, depth=2, heads=4, patch_size=2)
    for block in model.blocks:
        assert torch.count_nonzero(block.adaLN_modulation[-1].weight) == 0
    _perturb(model)
    z, t, tok, pooled = _inputs()
    out = model(z, t, tok, pooled)
    out.pow(2).mean().backward()
    for name, p in model.named_parameters():
        if not name.startswith("null_"):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    with torch.no_grad():                                # the output depends on z, t and the ECG
        assert not torch.allclose(out, model(z, t.flip(0) * 0.5, tok, pooled), atol=1e-5)
        assert not torch.allclose(out, model(z, t, tok.flip(1), pooled), atol=1e-5)
        assert not torch.allclose(out, model(z + 1, t, tok, pooled), atol=1e-5)


def test_null_condition_replaces_only_dropped_rows():
    model = _perturb(FlowDiT(ecg_dim=8, hidden=32, depth=1, heads=2, patch_size=2)).eval()
    z, t, tok, pooled = _inputs(b=3)
    drop = torch.tensor([False, True, False])
    with torch.no_grad():
        mixed = model(z, t, tok, pooled, drop)
        tok_null = tok.clone()
        pooled_null = pooled.clone()
        tok_null[1], pooled_null[1] = model.null_tokens, model.null_pooled
        assert torch.allclose(mixed, model(z, t, tok_null, pooled_null), atol=1e-6)
        assert torch.allclose(mixed[[0, 2]], model(z[[0, 2]], t[[0, 2]], tok[[0, 2]], pooled[[0, 2]]), atol=1e-5)
    (model(z, t, tok, pooled, torch.ones(3, dtype=torch.bool)).sum()).backward()
    assert model.null_tokens.grad.abs().sum() > 0


def test_attention_is_factorised_and_cross_attention_does_not_copy_ecg_keys(monkeypatch):
    """Record every SDPA call: spatial (B*T, h, L, d), temporal (B*L, h, T, d), and cross with
    queries (B, h, T*L, d) against keys (B, h, 50, d): the ECG keys exist once per video."""
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        calls.append((tuple(q.shape), tuple(k.shape)))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(dit_module.F, "scaled_dot_product_attention", spy)
    b, heads, hidden, patch = 2, 4, 32, 2
    model = FlowDiT(ecg_dim=8, hidden=hidden, depth=1, heads=heads, patch_size=patch)
    z, t, tok, pooled = _inputs(b=b)
    model(z, t, tok, pooled)
    L, T, d = (12 // patch) ** 2, 50, hidden // heads
    assert calls == [((b * T, heads, L, d), (b * T, heads, L, d)),
                     ((b * L, heads, T, d), (b * L, heads, T, d)),
                     ((b, heads, T * L, d), (b, heads, 50, d))]


def test_cross_attention_context_projection_sees_one_copy_per_video():
    model = FlowDiT(ecg_dim=8, hidden=32, depth=1, heads=2, patch_size=1)
    seen = []
    model.blocks[0].attn_cross.kv.register_forward_hook(lambda m, inp, out: seen.append(tuple(inp[0].shape)))
    z, t, tok, pooled = _inputs(b=3)
    model(z, t, tok, pooled)
    assert seen == [(3, 50, 32)]                         # not (3 * 144, 50, 32)


def test_positional_embedding_is_fixed_sincos_over_t_h_w():
    pe = sincos_3d(32, 50, 6, 6)
    assert pe.shape == (50, 36, 32)
    flat = pe.reshape(-1, 32)
    assert torch.unique(flat, dim=0).shape[0] == 50 * 36  # every (t, h, w) position distinct
    model = FlowDiT(ecg_dim=8, hidden=32, depth=1, heads=2, patch_size=2)
    assert "pos_embed" not in model.state_dict()         # fixed, not learned / not saved


def test_config_sizes_build_including_ukb_on_meta_device():
    demo = load_config("configs/demo.yaml")
    model = build_dit(demo.flow, (4, 50, 12, 12), ecg_dim=demo.ecg.width)
    assert model.arch["hidden"] == demo.flow.hidden
    ukb = load_config("configs/ukb.yaml")
    with torch.device("meta"):
        big = build_dit(ukb.flow, (4, 50, 12, 12), ecg_dim=ukb.ecg.width)
        out = big(*[x.to("meta") for x in _inputs(b=1, e=ukb.ecg.width)])
    assert out.shape == (1, 4, 50, 12, 12)
    assert (ukb.flow.hidden, ukb.flow.depth, ukb.flow.heads) == (512, 8, 8)
    n = sum(p.numel() for p in big.parameters())
    assert 40e6 < n < 120e6, n


def test_activation_checkpointing_same_gradients_fewer_saved_tensors():
    from ecgflowcmr.gpu_plan import SavedBytes

    cfg = load_config(None, ["flow.hidden=32", "flow.depth=3", "flow.heads=4", "flow.patch_size=2",
                             "flow.grad_checkpoint=true"])
    checkpointed = _perturb(build_dit(cfg.flow, (4, 50, 12, 12), ecg_dim=8))
    assert checkpointed.grad_checkpoint and "grad_checkpoint" not in checkpointed.arch
    plain = FlowDiT(**checkpointed.arch)
    plain.load_state_dict(checkpointed.state_dict())
    assert not plain.grad_checkpoint
    z, t, tok, pooled = _inputs()
    grads, saved = [], []
    for model in (plain, checkpointed):
        params = list(model.parameters())
        with SavedBytes(params) as hook:
            loss = model(z, t, tok, pooled).pow(2).mean()
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in params if p.grad is not None]))
        saved.append(hook.total)
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)
    assert saved[1] < saved[0] / 2                        # only block inputs stay saved
    with torch.no_grad():                                 # inference never recomputes
        torch.testing.assert_close(checkpointed(z, t, tok, pooled), plain(z, t, tok, pooled))
