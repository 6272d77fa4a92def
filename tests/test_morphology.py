"""The ECG morphology code (ecg/morphology.py): median beats at stage 1's R-peaks, PCA-whitened, appended
to the pooled condition of the DiT and the anchor head."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ecgflowcmr.config import ConfigError, load_config
from ecgflowcmr.data.beats import feature_count, median_beat_features, median_beats
from ecgflowcmr.ecg.morphology import MorphologyCode, MorphologyEncoder, beat_features
from ecgflowcmr.flow.generator import ECGToCine
from tests.flow_fakes import FAKE_DIM, FAKE_RPEAKS, FakeECGEncoder, build_run, tiny_config, use_bridges

ROOT = Path(__file__).resolve().parents[1]


def test_a_batch_of_median_beats_equals_each_record_read_alone():
    rng = np.random.default_rng(0)
    ecg = rng.normal(size=(4, 12, 5000))
    peaks = [np.array([]), np.array([900.4]), np.sort(rng.choice(np.arange(200, 4700), 6, replace=False)),
             np.array([10, 2000, 2400, 2800, 3200, 4990])]   # the first and last lack a whole window
    batch = median_beats(torch.from_numpy(ecg), peaks).numpy()
    assert batch.shape == (4, feature_count()) == (4, 481)
    for i in range(4):
        np.testing.assert_allclose(batch[i], median_beat_features(ecg[i], np.rint(peaks[i])), atol=1e-12)
    assert not batch[0].any()                                   # no beat, no rate
    assert batch[1, -1] == 0 and batch[1, :-1].any()            # one beat, no rate
    assert batch[3, -1] == pytest.approx(60 * 500 / 400)        # R-R 1990, 400, 400, 400, 1790: median 400


def test_the_code_whitens_the_training_rows_along_their_principal_axes():
    rng = np.random.default_rng(1)
    n, f, k = 300, 20, 4
    x = rng.normal(size=(n, 6)) @ rng.normal(size=(6, f)) * rng.uniform(0.5, 5, f) + rng.normal(size=f) * 10
    code = MorphologyCode.fit(x, k)
    scores = code(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(scores.mean(0), 0, atol=1e-9)
    np.testing.assert_allclose(scores.T @ scores / n, np.eye(k), atol=1e-9)   # unit variance, uncorrelated
    z = (x - x.mean(0)) / x.std(0)
    vals, vecs = np.linalg.eigh(z.T @ z / n)                     # the principal axes, largest first
    for j in range(k):
        axis = vecs[:, -1 - j]
        assert abs(abs(np.corrcoef(scores[:, j], z @ axis)[0, 1]) - 1) < 1e-9
    assert (code.basis.abs().argmax(0) == code.basis.argmax(0)).all()       # sign fixed: largest entry > 0
    again = MorphologyCode.from_state({k_: v.clone() for k_, v in code.state_dict().items()})
    assert torch.equal(again(torch.from_numpy(x)), code(torch.from_numpy(x)))
    with pytest.raises(ValueError, match="more training ECGs than dims"):
        MorphologyCode.fit(x[:4], 4)


def _latent_problem(seed: int, signal: float):
    """ECG-like features ``x (300, 40)``; latents ``y (300, 500)``: a 2-dim function of ``x`` (its weight
    ``signal``) beside 8 strong directions and noise that ``x`` does not predict."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(300, 40)) * rng.uniform(0.5, 3, 40) + 5
    truth = (x - x.mean(0)) @ rng.normal(size=(40, 2)) / 10
    y = (signal * truth @ rng.normal(size=(2, 500)) + rng.normal(size=(300, 8)) @ rng.normal(size=(8, 500)) * 2
         + rng.normal(size=(300, 500)))
    return x, y, truth


def _r2(target: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Per column of ``target``, the share of its variance a least-squares fit on ``z`` explains."""
    a = np.c_[z, np.ones(len(z))]
    return 1 - (target - a @ np.linalg.lstsq(a, target, rcond=None)[0]).var(0) / target.var(0)


def test_the_latent_code_finds_the_directions_the_ecg_predicts():
    from ecgflowcmr.ecg.morphology import fit_latent_code

    x, y, truth = _latent_problem(0, signal=1.0)
    code, oof, fit = fit_latent_code(x, y, 2)
    scores = code(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(scores.mean(0), 0, atol=1e-9)
    np.testing.assert_allclose(scores.std(0), 1, atol=1e-9)
    assert (_r2(truth, scores) > 0.95).all() and (_r2(truth, oof) > 0.95).all()   # 0.996, 0.99
    # the PCA code of the same features spends its 2 numbers on their largest axes, not on the heart's
    assert (_r2(truth, MorphologyCode.fit(x, 2)(torch.from_numpy(x)).numpy()) < 0.2).all()     # 0.05 0.14
    assert oof.shape == (300, 2) and 0.8 < min(fit["oof_code_sd"]) <= max(fit["oof_code_sd"]) < 1.1
    assert fit["oof_error"] < fit["total_error"] and sum(fit["lambda_counts"].values()) == 64
    again = MorphologyCode.from_state({k: v.clone() for k, v in code.state_dict().items()})
    assert torch.equal(again(torch.from_numpy(x)), code(torch.from_numpy(x)))
    with pytest.raises(ValueError, match="more training ECGs than dims"):
        fit_latent_code(x[:9], y[:9], 2)


def test_out_of_fold_codes_do_not_know_latents_the_ecg_does_not_predict():
    """Latents independent of the ECG: a training row's in-sample code has seen its latent (ridge fits
    noise), its out-of-fold code has not. A flow trained on in-sample codes would learn a heart the code
    pins down; on a new subject the code would pin nothing."""
    from ecgflowcmr.ecg.morphology import fit_latent_code

    x, y, _ = _latent_problem(1, signal=0.0)
    code, oof, _ = fit_latent_code(x, y, 4)
    yc = y - y.mean(0)
    pcs = yc @ np.linalg.svd(yc, full_matrices=False)[2][:64].T
    in_sample, out = _r2(pcs, code(torch.from_numpy(x)).numpy()), _r2(pcs, oof)   # per latent PC
    assert in_sample.max() > 2 * out.max() and out.max() < 0.08      # 0.20 vs 0.036 (4 of 300 rows: 0.013)


def _beats_at(peaks, beat: np.ndarray, length: int = 5000) -> np.ndarray:
    """``(12, length)``: ``beat (12, 400)`` placed with its sample 125 on every R-peak whose window
    (-250..+550 ms) lies in the record."""
    ecg = np.zeros((12, length))
    for r in peaks:
        if r + 275 <= length:
            ecg[:, r - 125:r + 275] += beat
    return ecg


def test_the_encoder_appends_the_code_of_the_beat_at_its_own_rpeaks():
    rng = np.random.default_rng(2)
    beats = rng.normal(size=(30, 12, 400)).cumsum(-1) * 0.05      # 30 smooth, different beats
    ecg = np.stack([_beats_at(FAKE_RPEAKS, b) for b in beats]).astype(np.float32)
    torch.manual_seed(0)
    encoder = FakeECGEncoder()
    feats = beat_features(encoder, torch.from_numpy(ecg)).numpy()
    # every beat is the same within a record: its median beat is that beat, binned into 20 ms, minus its first 20 ms
    expected = beats.reshape(30, 12, 40, 10).mean(-1) - beats[..., :10].mean(-1, keepdims=True)
    np.testing.assert_allclose(feats[:, :-1].reshape(30, 12, 40), expected, atol=1e-5)
    np.testing.assert_allclose(feats[:, -1], 60.0)
    code = MorphologyCode.fit(feats, 5)
    wrapped = MorphologyEncoder(encoder, code)
    assert (wrapped.dim, wrapped.pooled_dim) == (FAKE_DIM, FAKE_DIM + 5)
    out, plain = wrapped(torch.from_numpy(ecg)), encoder(torch.from_numpy(ecg))
    assert torch.equal(out.tokens, plain.tokens)
    assert torch.equal(out.pooled[:, :FAKE_DIM], plain.pooled)
    torch.testing.assert_close(out.pooled[:, FAKE_DIM:], code(torch.from_numpy(feats)))


def test_an_encoder_without_rpeaks_is_refused_by_name():
    class Window(FakeECGEncoder):
        def forward(self, ecg):
            out = super().forward(ecg)
            out.wraps = None
            return out

    with pytest.raises(ValueError, match="cycle_mode"):
        beat_features(Window(), torch.zeros(1, 12, 5000))


@pytest.mark.parametrize("overrides", [
    ["flow.morphology_dims=-1"],
    ["flow.morphology_dims=8", "flow.anchor=template", "flow.ecg_finetune=true"],
    ["flow.morphology_dims=8", "ecg.cycle_mode=window"],
    ["flow.anchor_fit=lstsq"],
    ["flow.anchor_fit=ridge", "flow.anchor=template"],
    ["flow.morphology_in=dit"],
    ["flow.morphology_dims=8", "flow.morphology_in=anchor", "flow.anchor=template"],
    ["flow.morphology_dims=8", "flow.morphology_noise=-0.5"],
    ["flow.morphology_noise=0.5"],
    ["flow.morphology_code=latent"],
    ["flow.morphology_dims=8", "flow.morphology_code=supervised"],
    ["flow.morphology_dims=8", "flow.morphology_in=anchor", "flow.anchor=ecg", "flow.morphology_noise=0.5"],
])
def test_bad_morphology_settings_name_the_key(overrides):
    with pytest.raises(ConfigError, match="flow.morphology_(dims|in|noise|code)|flow.anchor_fit"):
        load_config(ROOT / "configs" / "demo.yaml", overrides)


def test_the_code_noise_touches_the_code_columns_alone():
    from ecgflowcmr.flow.trainer import noisy_code

    pooled = torch.arange(20000 * 5, dtype=torch.float32).view(20000, 5)
    out = noisy_code(pooled, 2, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(out[:, :3], pooled[:, :3])
    noise = (out[:, 3:] - pooled[:, 3:]).double()
    assert noise.mean(0).abs().max() < 0.02 and (noise.std(0) - 0.5).abs().max() < 0.01
    assert abs(float(torch.corrcoef(noise.T)[0, 1])) < 0.03


@pytest.mark.parametrize("anchor_fit, morphology_in, noise, kind", [
    ("sgd", "both", 0.0, "pca"), ("ridge", "both", 0.0, "pca"), ("ridge", "anchor", 0.0, "pca"),
    ("sgd", "both", 0.5, "pca"), ("sgd", "both", 0.0, "latent"), ("ridge", "both", 0.0, "latent_motion")])
def test_training_and_generation_condition_on_the_same_code(tmp_path, monkeypatch, anchor_fit, morphology_in, noise,
                                                           kind):
    from ecgflowcmr.flow import trainer as flow_trainer
    from ecgflowcmr.flow.trainer import LatentSplit, train

    use_bridges(monkeypatch, real_ecg=False, real_vae=False)
    seen = {"anchor": [], "dit": []}      # the pooled condition each reads in training steps (validation: no grad)
    anchor_mean, loss = flow_trainer._anchor_mean, flow_trainer.flow_matching_loss

    def spy(key, pooled):
        if torch.is_grad_enabled():
            seen[key].append(pooled)
    monkeypatch.setattr(flow_trainer, "_anchor_mean",
                        lambda head, cond: spy("anchor", cond["ecg_pooled"]) or anchor_mean(head, cond))
    monkeypatch.setattr(flow_trainer, "flow_matching_loss",
                        lambda *a, **kw: spy("dit", kw["ecg_pooled"]) or loss(*a, **kw))
    fitted = []
    fit_latent_code = flow_trainer.fit_latent_code
    monkeypatch.setattr(flow_trainer, "fit_latent_code", lambda *a, **kw: fitted.append(fit_latent_code(*a, **kw))
                        or fitted[-1])
    run = build_run(tmp_path / "run", n=16, real_ecg=False, real_vae=False)
    cfg = tiny_config(run, "flow.epochs=1", "flow.anchor=ecg", "flow.anchor_steps=5", "flow.anchor_hidden=8",
                      "flow.morphology_dims=3", f"flow.anchor_fit={anchor_fit}", f"flow.morphology_code={kind}",
                      f"flow.morphology_in={morphology_in}", f"flow.morphology_noise={noise}")
    train(cfg)
    ckpt = torch.load(run / "flow" / "last.pt", weights_only=True)
    dit_reads = FAKE_DIM + 3 if morphology_in == "both" else FAKE_DIM      # "anchor": the DiT reads stage 1 alone
    assert ckpt["flow"]["morphology_dims"] == 3 and ckpt["dit_arch"]["pooled_dim"] == dit_reads
    assert ckpt["flow"]["morphology_noise"] == noise
    # the DiT's training condition is the anchor's (clean) one, plus noise on the code's columns when asked
    assert len(seen["dit"]) == len(seen["anchor"]) >= 1
    delta = torch.cat(seen["dit"]) - torch.cat(seen["anchor"])
    assert torch.equal(delta[:, :FAKE_DIM], torch.zeros_like(delta[:, :FAKE_DIM]))
    if noise:
        assert 0.3 < float(delta[:, FAKE_DIM:].std()) < 0.7
    else:
        assert torch.equal(delta, torch.zeros_like(delta))
    assert ckpt["anchor_head"]["arch"]["pooled_dim"] == FAKE_DIM + 3
    assert (ckpt["anchor_head"]["arch"].get("kind") == "ridge") == (anchor_fit == "ridge")
    ecg = torch.from_numpy(np.load(run / "data" / "ecg.npy"))
    pipe = ECGToCine.from_checkpoint(run / "flow" / "last.pt")
    assert isinstance(pipe.encoder, MorphologyEncoder) and pipe.encoder.code.dims == 3
    # the code is fitted on the training split's ECGs alone: there its scores are white
    split = LatentSplit(run / "latents", "train")
    scores = pipe.encoder.code(beat_features(pipe.encoder.encoder, ecg[split.prepared_index])).numpy()
    np.testing.assert_allclose(scores.T @ scores / len(scores), np.eye(3), atol=1e-4)
    # what generation conditions on is what the cached training condition was, row for row
    cache = next((run / "flow" / "ecg_cache").glob("*_morph*")) / "train"
    cached = np.load(cache / "meta.npz")["pooled"]
    encoded = pipe.encode(ecg[split.prepared_index]).pooled.numpy()
    assert cached.shape == encoded.shape == (len(split), FAKE_DIM + 3)
    np.testing.assert_allclose(encoded, cached, atol=1e-5)
    assert ckpt["flow"]["morphology_code"] == kind and len(fitted) == (kind != "pca")
    if kind != "pca":    # training steps read each row's out-of-fold code, not the full fit's
        oof = fitted[0][1]
        read = torch.cat(seen["dit"])[:, FAKE_DIM:].numpy()
        to_oof = np.abs(read[:, None] - oof[None]).max(-1).min(1)           # distance to the nearest row
        to_full = np.abs(read[:, None] - cached[None, :, FAKE_DIM:]).max(-1).min(1)
        assert to_oof.max() < 1e-5 and to_full.min() > 1e-3
    out = pipe.generate(ecg[:2], seeds=[1, 2], steps=2)
    assert out.cine.shape == (2, 1, 50, 96, 96)
    assert type(pipe.anchor_head).__name__ == ("RidgeAnchor" if anchor_fit == "ridge" else "AnchorHead")
    assert pipe.regress(ecg[:2]).cine.shape == (2, 1, 50, 96, 96)


def test_ridge_leave_one_out_error_is_the_refit_without_the_row():
    from ecgflowcmr.flow.anchor import ridge_loo_mse

    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(12, 3)), rng.normal(size=(12, 2))
    u, s, _ = torch.linalg.svd(torch.from_numpy(x), full_matrices=False)
    penalty = 2.5
    errors = np.zeros(2)
    for i in range(12):
        keep = np.arange(12) != i
        w = np.linalg.solve(x[keep].T @ x[keep] + penalty * np.eye(3), x[keep].T @ y[keep])
        errors += (y[i] - x[i] @ w) ** 2 / 12
    np.testing.assert_allclose(ridge_loo_mse(u, s, torch.from_numpy(y), penalty).numpy(), errors, rtol=1e-10)


def test_the_ridge_anchor_picks_a_strength_per_latent_value_by_leave_one_out():
    from ecgflowcmr.flow.anchor import RidgeAnchor, anchor_from_arch
    from ecgflowcmr.metrics.linear import Standardiser, fit_ridge

    rng = np.random.default_rng(3)
    shape, n, p = (2, 3, 2, 2), 80, 5                  # 24 latent values
    x = rng.normal(size=(n + 30, p)) * rng.uniform(0.5, 3, p) + 2.0
    y = x @ rng.normal(size=(p, 24)) + 1.0
    y[:, 12:] = 5.0 * rng.normal(size=(n + 30, 12))    # half the values the input does not predict
    t = lambda a: torch.from_numpy(a).float()          # noqa: E731
    mse = lambda a, b: (a - b).pow(2).flatten(1).mean(1)   # noqa: E731
    lambdas = (1e-3, 1.0, 1e3)
    head = RidgeAnchor(shape, p)
    fit = head.fit(t(x[:n]), t(y[:n]).view(-1, *shape), t(x[n:]), t(y[n:]).view(-1, *shape), lambdas, mse)
    assert fit["anchor_lambda_counts"][1e-3] == 12      # every predictable value: the least L2
    assert fit["anchor_lambda_counts"][1e3] >= 10       # nearly every unpredictable one: the most
    pred = head(None, t(x[n:])).view(30, -1).numpy()
    np.testing.assert_allclose(pred[:, :12], y[n:, :12], atol=0.02)
    assert fit["anchor_val"] < fit["anchor_val_mean_video"]
    # each value is metrics.linear's ridge on standardised inputs at the strength chosen for it
    st = Standardiser(x[:n])
    for j in (0, 13, 23):
        col = pred[:, j]
        candidates = [fit_ridge(st(x[:n]), y[:n, j], lam)(st(x[n:])) for lam in lambdas]
        assert min(np.abs(col - c).max() for c in candidates) < 1e-3
    clone = anchor_from_arch(head.arch)
    clone.load_state_dict(head.state_dict())
    assert torch.equal(clone(None, t(x[n:])), head(None, t(x[n:])))


def test_the_dit_reads_the_pooled_condition_up_to_its_width():
    from ecgflowcmr.flow.dit import FlowDiT

    torch.manual_seed(0)
    dit = FlowDiT(latent_channels=2, num_frames=4, latent_size=4, ecg_dim=6, ecg_tokens=4, hidden=16, depth=1,
                  heads=2, patch_size=2, pooled_dim=6)
    torch.nn.init.normal_(dit.final.linear.weight)                  # a non-zero output to compare
    for block in [*dit.blocks, dit.final]:
        torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.1)
    z, t, tokens, pooled = torch.randn(2, 2, 4, 4, 4), torch.rand(2), torch.randn(2, 4, 6), torch.randn(2, 6)
    wider = torch.cat([pooled, torch.randn(2, 3)], dim=-1)         # a code appended for the anchor alone
    torch.testing.assert_close(dit(z, t, tokens, wider), dit(z, t, tokens, pooled), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="width 5"):
        dit(z, t, tokens, pooled[:, :5])
