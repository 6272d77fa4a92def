"""Cycle detection from a phase and ROI-Align on the phase axis (ecgflowcmr.ecg.cycles)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ecgflowcmr.data.phase import phase_from_rpeaks
from ecgflowcmr.ecg.cycles import find_wraps, roi_align, select_cycles

L = 5000
FS = 500
HEART_RATES = list(range(40, 151, 10))


def rpeaks_at(bpm: float, first: int, jitter: float = 0.0, seed: int = 0) -> np.ndarray:
    """R-peaks at ``bpm`` starting at sample ``first``, R-R varied by +-jitter (fraction)."""
    rng = np.random.default_rng(seed)
    peaks, t = [], float(first)
    while t < L:
        peaks.append(int(round(t)))
        t += 60.0 / bpm * FS * (1 + jitter * rng.uniform(-1, 1))
    return np.asarray(peaks)


def batch_of_phases(jitter: float = 0.0):
    peaks = [rpeaks_at(bpm, first=37 + 11 * i, jitter=jitter, seed=i) for i, bpm in enumerate(HEART_RATES)]
    phase = torch.tensor(np.stack([phase_from_rpeaks(p, L) for p in peaks]))
    return peaks, phase


@pytest.mark.parametrize("mode", ["median", "ensemble"])
@pytest.mark.parametrize("jitter", [0.0, 0.1])
def test_cycle_starts_and_ends_on_r_peaks_40_to_150_bpm(mode, jitter):
    peaks, phase = batch_of_phases(jitter)
    sel = select_cycles(phase, mode)                     # the whole batch at once
    assert not sel.fallback.any()
    for b, p in enumerate(peaks):
        start, end = int(sel.start[b]), int(sel.end[b])
        assert start in p, f"{HEART_RATES[b]} bpm: cycle starts at {start}, not an R-peak (mid-beat cut)"
        k = int(np.flatnonzero(p == start)[0])
        assert k + 1 < len(p) and end == p[k + 1], f"{HEART_RATES[b]} bpm: end {end} is not the next R-peak"
        rr = np.diff(p)
        assert abs((end - start) - np.median(rr)) == np.min(np.abs(rr - np.median(rr)))


def test_wraps_are_exactly_the_r_peaks():
    peaks, phase = batch_of_phases(0.1)
    wraps = find_wraps(phase)
    for b, p in enumerate(peaks):
        found = np.asarray(wraps.as_lists()[b])
        expected = p[(p > 50) & (p < L - 50)]        # none within 0.1 s of the record ends
        np.testing.assert_array_equal(found, expected)


def test_atan2_range_gives_the_same_cycles():
    """A phase in (-pi, pi] (as atan2 returns it) must still be cut at the 2pi -> 0 wraps."""
    peaks, phase = batch_of_phases()
    atan2_phase = torch.atan2(torch.sin(phase), torch.cos(phase))
    a, b = select_cycles(phase, "median"), select_cycles(atan2_phase, "median")
    assert torch.equal(a.start, b.start) and torch.equal(a.end, b.end)


def test_noisy_phase_is_robust():
    """Gaussian noise of 0.08 rad per sample (up to 10 samples of timing noise at 40 bpm; it
    dithers the phase around each wrap) adds no R-peak and moves none by more than 5 samples
    (10 ms), at any heart rate from 40 to 150 bpm; at the record edges, where only one side of a
    wrap is seen, by no more than 20 samples."""
    peaks, phase = batch_of_phases(0.05)
    gen = torch.Generator().manual_seed(0)
    noisy = phase + 0.08 * torch.randn(phase.shape, generator=gen, dtype=phase.dtype)
    wraps = find_wraps(noisy)
    clean = find_wraps(phase)            # the R-peaks plus any wrap the label extrapolates into the record
    sel = select_cycles(noisy, "median")
    for b, p in enumerate(peaks):
        found = np.asarray(wraps.as_lists()[b])
        ref = np.asarray(clean.as_lists()[b])
        inside = lambda x: x[(x > 60) & (x < L - 60)]       # noise may move a wrap across the 0.1 s edge
        found, ref = inside(found), inside(ref)
        assert len(found) == len(ref), (HEART_RATES[b], found, ref)
        interior = (ref > np.diff(p).max()) & (ref < L - np.diff(p).max())
        assert np.max(np.abs(found - ref)[interior]) <= 5
        assert np.max(np.abs(found - ref)) <= 20
        assert np.min(np.abs(p - int(sel.start[b]))) <= 5


def test_min_rr_drops_spurious_wraps():
    """A prediction that races through a whole extra turn 60 ms after an R-peak makes a second wrap
    there; it is closer than the minimum R-R (250 ms) to the true one and dropped."""
    peaks = np.arange(100, L, 500)
    phase = torch.tensor(phase_from_rpeaks(peaks, L))[None].clone()
    phase[0, 1105:1130] = torch.linspace(0.3, 2 * math.pi - 0.05, 25, dtype=phase.dtype)
    raw = find_wraps(phase, min_rr_s=0)
    assert len(raw.as_lists()[0]) == len(peaks) + 1          # the spurious wrap is there ...
    found = np.asarray(find_wraps(phase).as_lists()[0])
    np.testing.assert_array_equal(found, peaks)              # ... and removed by the minimum R-R


def test_roi_align_shapes_and_exact_ramp():
    """Features that are a linear ramp of time give tokens that are the ramp at the token times."""
    peaks, phase = batch_of_phases(0.1)
    b, stride, positions = phase.shape[0], 8, L // 8
    centres = torch.arange(positions, dtype=torch.float64) * stride + (stride - 1) / 2
    features = torch.stack([2.0 * centres - 7.0, -0.5 * centres], dim=-1).expand(b, positions, 2)
    sel = select_cycles(phase, "median")
    tokens = roi_align(features, sel, stride)
    assert tokens.shape == (b, 50, 2)
    for i in range(b):
        start, end = int(sel.start[i]), int(sel.end[i])
        t = start + (end - start) * np.arange(50) / 50          # phase is linear within the cycle
        np.testing.assert_allclose(tokens[i, :, 0].numpy(), 2.0 * t - 7.0, atol=1e-6)
        np.testing.assert_allclose(tokens[i, :, 1].numpy(), -0.5 * t, atol=1e-6)


def test_ensemble_aligns_cycles_on_the_phase_axis():
    """A feature that is a function of the phase gives the same tokens for any cycle: the ensemble
    average equals the median cycle, and token m sits at phase 2*pi*m/50."""
    peaks, phase = batch_of_phases(0.1)
    stride = 8
    centres = torch.arange(L // stride) * stride + (stride - 1) / 2
    phase_at_centres = torch.tensor(np.stack([np.interp(centres.numpy(), np.arange(L),
                                                        np.unwrap(p.numpy())) for p in phase]))
    features = torch.stack([torch.sin(phase_at_centres), torch.cos(phase_at_centres)], dim=-1)
    med = roi_align(features, select_cycles(phase, "median"), stride)
    ens = roi_align(features, select_cycles(phase, "ensemble"), stride)
    target = 2 * math.pi * torch.arange(50, dtype=torch.float64) / 50
    expected = torch.stack([torch.sin(target), torch.cos(target)], dim=-1).expand_as(med)
    tol = 2 * math.pi / (60.0 / 150 * FS) * stride      # a feature grid step, in phase, at 150 bpm
    assert (med - expected).abs().max() < tol
    assert (ens - expected).abs().max() < tol


def test_tokens_are_differentiable_wrt_features():
    peaks, phase = batch_of_phases()
    features = torch.randn(phase.shape[0], L // 8, 4, dtype=torch.float64, requires_grad=True)
    tokens = roi_align(features, select_cycles(phase, "ensemble"), 8)
    tokens.sum().backward()
    assert features.grad is not None and features.grad.abs().sum() > 0


def test_fallback_slow_rhythm_short_record():
    """0.9 s of a 40 bpm rhythm holds at most one R-peak: no complete cycle -> flagged fallback."""
    length = 450
    phase = torch.tensor(phase_from_rpeaks(np.array([200, 200 + 750]), length))[None]
    sel = select_cycles(phase, "median")
    assert sel.fallback.tolist() == [True]
    assert (int(sel.start[0]), int(sel.end[0])) == (0, 450)     # the whole (shorter than 1 s) record
    tokens = roi_align(torch.randn(1, length // 8, 3), sel, 8)
    assert tokens.shape == (1, 50, 3) and torch.isfinite(tokens).all()


def test_fallback_flat_phase_mixed_batch():
    """A flat (failed) phase falls back to the centre 1 s window; the other rows are unaffected."""
    good = torch.tensor(phase_from_rpeaks(rpeaks_at(70, 100), L))
    phase = torch.stack([torch.zeros(L, dtype=torch.float64), good])
    sel = select_cycles(phase, "median")
    assert sel.fallback.tolist() == [True, False]
    assert (int(sel.start[0]), int(sel.end[0])) == (2250, 2750)
    assert int(sel.start[1]) in rpeaks_at(70, 100)
    np.testing.assert_allclose(sel.times[0, 0].numpy(), 2250 + 500 * np.arange(50) / 50)


def test_window_mode_ignores_the_phase():
    peaks, phase = batch_of_phases()
    sel = select_cycles(phase, "window")
    assert not sel.fallback.any()
    assert sel.start.unique().tolist() == [2250] and sel.end.unique().tolist() == [2750]
    sel2 = select_cycles(None, "window", length=L, batch=3)
    assert sel2.times.shape == (3, 1, 50)


def test_bad_inputs_give_clear_errors():
    with pytest.raises(ValueError, match=r"\(B, L\)"):
        select_cycles(torch.zeros(L), "median")
    with pytest.raises(ValueError, match="cycle mode"):
        select_cycles(torch.zeros(1, L), "mid-beat")


def test_ensemble_averages_every_complete_cycle_within_30_percent_of_the_median_rr():
    """Features that are a ramp of time differ from beat to beat, so the tokens tell which cycles
    were averaged. R-R 800, 850, 750, 800, 1200 samples: median 800, the 1200 one is out (> 30 %)."""
    peaks = np.array([250, 1050, 1900, 2650, 3450, 4650])
    phase = torch.tensor(phase_from_rpeaks(peaks, L))[None]
    sel = select_cycles(phase, "ensemble")
    np.testing.assert_allclose(sel.weights[0].numpy(), [0.25, 0.25, 0.25, 0.25, 0.0])
    assert (int(sel.start[0]), int(sel.end[0])) == (250, 1050)       # the first cycle at the median R-R
    stride, positions = 8, L // 8
    centres = torch.arange(positions, dtype=torch.float64) * stride + (stride - 1) / 2
    tokens = roi_align((2.0 * centres - 7.0)[None, :, None], sel, stride)[0, :, 0]
    starts, rr = peaks[:4], np.diff(peaks)[:4]
    times = (starts[:, None] + rr[:, None] * np.arange(50) / 50).mean(axis=0)
    np.testing.assert_allclose(tokens.numpy(), 2.0 * times - 7.0, atol=1e-6)


def test_ensemble_keeps_every_complete_cycle_of_a_regular_rhythm():
    """With R-R jitter of +-10 %, every complete cycle is within 30 % of the median: 40 bpm keeps
    all 5 or so, 150 bpm all 24 or so (the cycles between the R-peaks inside the 0.1 s edges)."""
    peaks, phase = batch_of_phases(0.1)
    sel = select_cycles(phase, "ensemble")
    for b, p in enumerate(peaks):
        inside = p[(p > 50) & (p < L - 50)]
        kept = sel.weights[b] > 0
        assert int(kept.sum()) == len(inside) - 1, HEART_RATES[b]
        np.testing.assert_allclose(sel.weights[b][kept].numpy(), 1.0 / (len(inside) - 1))


def test_ensemble_tolerance_is_around_the_true_median_of_an_even_count():
    """R-R 700, 900, 700, 1000: the median is 800 (not the lower middle 700), so the 1000 cycle is
    25 % off and kept; the median cycle is still a real one (the first 700)."""
    peaks = np.array([300, 1000, 1900, 2600, 3600])
    phase = torch.tensor(phase_from_rpeaks(peaks, 3700))[None]
    sel = select_cycles(phase, "ensemble")
    np.testing.assert_allclose(sel.weights[0].numpy(), [0.25, 0.25, 0.25, 0.25])
    assert (int(sel.start[0]), int(sel.end[0])) == (300, 1000)
    assert (int(select_cycles(phase, "median").start[0])) == 300
