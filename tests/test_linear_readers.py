"""Linear ECG readers (ecgflowcmr.metrics.linear): features, fits and scores on hand-checkable cases."""
import numpy as np
import pytest

from ecgflowcmr.metrics import linear as L


def test_auc_by_hand():
    assert L.auc([0.9, 0.8, 0.1, 0.2], [1, 1, 0, 0]) == 1.0
    assert L.auc([0.1, 0.2, 0.9, 0.8], [1, 1, 0, 0]) == 0.0
    # cases 3, 1; controls 2, 1: pairs (3>2, 3>1, 1<2, 1=1) -> (1 + 1 + 0 + 0.5) / 4
    assert L.auc([3, 1, 2, 1], [1, 1, 0, 0]) == pytest.approx(0.625)
    assert np.isnan(L.auc([1, 2], [1, 1]))


def test_median_beat_features_recovers_the_beat_and_rate():
    fs, t = 500, 5000
    ecg = np.zeros((12, t))
    rpeaks = np.arange(300, t - 300, 500)          # 60 bpm
    for r in rpeaks:
        ecg[:, r - 5:r + 5] = 1.0                  # a 20 ms "QRS" at each R
    ecg[:, rpeaks[3] - 5:rpeaks[3] + 5] = 9.0      # one outlier beat: the median ignores it
    f = L.median_beat_features(ecg, rpeaks, fs)
    assert f.shape == (12 * 40 + 1,)
    assert f[-1] == pytest.approx(60.0)
    beat = f[:-1].reshape(12, 40)
    # the R-peak sits 250 ms into the window: bin 12 (240-260 ms) holds the QRS; -250 ms baseline is 0
    assert np.allclose(beat[:, 12], 1.0) and np.allclose(np.delete(beat, 12, axis=1), 0.0)


def test_ridge_recovers_a_linear_rule():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5))
    y = x @ np.array([1.0, -2.0, 0.0, 0.5, 0.0]) + 3.0
    pred = L.fit_ridge(x, y, 1e-6)(x)
    assert np.allclose(pred, y, atol=1e-3)
    # dual form (more features than rows) gives the same fit as the primal one
    xw = rng.normal(size=(10, 30))
    yw = rng.normal(size=10)
    dual = L.fit_ridge(xw, yw, 0.5)(xw)
    xc = xw - xw.mean(0)
    w = np.linalg.solve(xc.T @ xc + 0.5 * 10 * np.eye(30), xc.T @ (yw - yw.mean()))
    assert np.allclose(dual, xc @ w + yw.mean())


def test_logistic_separates_and_shrinks():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 3))
    y = (x[:, 0] + 0.3 * rng.normal(size=300) > 1.0).astype(float)
    p = L.fit_logistic(x, y, 1e-3)(x)
    assert L.auc(p, y) > 0.95
    # a huge penalty leaves only the intercept: every probability is the base rate
    flat = L.fit_logistic(x, y, 1e6)(x)
    assert np.allclose(flat, y.mean(), atol=1e-3)


def test_cv_select_prefers_little_shrinkage_for_a_clean_signal():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(150, 4))
    y = x[:, 0] * 2 + 0.1 * rng.normal(size=150)
    lam, scores = L.cv_select(x, y, L.fit_ridge, L.pearson, lambdas=(0.01, 100.0))
    assert lam == 0.01 and scores[0.01] > 0.99


def test_bootstrap_ci_brackets_the_value():
    rng = np.random.default_rng(3)
    a = rng.normal(size=100)
    b = a + rng.normal(size=100)
    lo, hi = L.bootstrap_ci(L.pearson, a, b, n_boot=300)
    assert lo < L.pearson(a, b) < hi


@pytest.mark.parametrize("rho", [0.4, 0.6, 0.8])
def test_a_calibrated_sampler_correlates_at_r_squared(rho):
    """y = pred + e with corr(pred, y) = rho: one draw from N(pred, var(e)) correlates with y at rho^2, the
    mean of k draws at rho^2 / sqrt(rho^2 + (1 - rho^2) / k) (Gaussian closed forms)."""
    rng = np.random.default_rng(12345)        # not the draws' own seed (0): their noise must be independent
    n = 20000
    pred = rho * rng.standard_normal(n)
    y = pred + np.sqrt(1 - rho ** 2) * rng.standard_normal(n)
    low = y < -1.0
    one, four = L.calibrated_draws(pred, y, low, 1, draws=20), L.calibrated_draws(pred, y, low, 4, draws=20)
    assert one["r"] == pytest.approx(rho ** 2, abs=0.01)
    assert four["r"] == pytest.approx(rho ** 2 / np.sqrt(rho ** 2 + (1 - rho ** 2) / 4), abs=0.01)
    assert one["residual_sd"] == pytest.approx(np.sqrt(1 - rho ** 2), abs=0.01)
    assert 0.5 < one["auc"] < four["auc"] < L.auc(-pred, low)
