"""Stage-1 ECG augmentation: each step against what it must do, and labels that follow the signal."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ecgflowcmr.data.ecg_io import read_ecg
from ecgflowcmr.data.phase import detect_rpeaks, heart_rate, phase_from_rpeaks
from ecgflowcmr.ecg.augment import HR_RANGE_BPM, PROBABILITIES, augment_batch, augment_ecg, time_stretch
from ecgflowcmr.ecg.dataset import phase_labels
from ecgflowcmr.ecg.metrics import match_peaks
from tests.conftest import EXAMPLE_ECG_DIR, PTBXL_RECORDS

ONLY = {name: 0.0 for name in PROBABILITIES}


def spikes(peaks, length=5000, leads=12, width=4.0):
    """(leads, L) Gaussian spikes of ``width`` samples (sd) at ``peaks``, lead k scaled by k + 1."""
    t = np.arange(length)
    row = np.exp(-0.5 * ((t[None, :] - np.asarray(peaks)[:, None]) / width) ** 2).sum(axis=0)
    return np.arange(1, leads + 1)[:, None] * row[None, :]


def apex_at(signal, peaks, radius=8):
    return all(abs(int(np.argmax(signal[max(p - radius, 0):p + radius + 1])) - min(p, radius)) <= 1
               for p in peaks if radius <= p < len(signal) - radius)


@pytest.mark.parametrize("factor", [0.45, 0.8, 1.0, 1.6, 2.2])
def test_time_stretch_moves_peaks_with_the_signal(factor):
    rr = np.array([400, 420, 380, 410, 390, 400, 430, 370, 400, 405, 395])    # irregular, ~75 bpm
    peaks = 250 + np.concatenate([[0], np.cumsum(rr)])
    ecg = spikes(peaks)
    out, moved = time_stretch(ecg, peaks, factor, position=0.37)
    assert out.shape == ecg.shape
    assert apex_at(out[0], moved)                                # every returned peak is a spike top
    # and every spike top is a returned peak (nothing lost or invented)
    tops = np.flatnonzero((out[0, 1:-1] > out[0, :-2]) & (out[0, 1:-1] >= out[0, 2:]) & (out[0, 1:-1] > 0.5)) + 1
    np.testing.assert_allclose(tops, moved, atol=1)
    # each R-R interval is the input's times the factor (a cyclic run of the input intervals)
    out_rr = np.diff(moved)
    assert any(np.all(np.abs(np.tile(rr, 8)[k:k + len(out_rr)] * factor - out_rr) <= 1.5)
               for k in range(len(rr))), out_rr
    # the QRS keeps its width: the spike's half-height width is unchanged
    mid = moved[len(moved) // 2]
    width = np.count_nonzero(out[0, mid - 30:mid + 31] > 0.5 * out[0, mid])
    assert abs(width - np.count_nonzero(ecg[0, peaks[5] - 30:peaks[5] + 31] > 0.5 * ecg[0, peaks[5]])) <= 1
    np.testing.assert_allclose(out[5], 6 * out[0], rtol=1e-9, atol=1e-12)  # one warp for all leads


def test_time_stretch_refuses_bad_input():
    with pytest.raises(ValueError, match=">= 2 R-peaks"):
        time_stretch(np.zeros((12, 5000)), np.array([100]), 1.2)
    with pytest.raises(ValueError, match="one record"):
        augment_ecg(np.zeros(5000), np.array([100, 500]), np.random.default_rng(0))


def test_heart_rate_range_and_labels_on_a_real_record():
    ecg = read_ecg(EXAMPLE_ECG_DIR / f"{PTBXL_RECORDS[1]}.hea")
    peaks = detect_rpeaks(ecg)
    rng = np.random.default_rng(3)
    rates = []
    for _ in range(4):
        out, moved = augment_ecg(ecg, peaks, rng, probabilities=dict(ONLY, stretch=1.0))
        rates.append(heart_rate(moved))
        # the R-peak detector finds the moved peaks in the stretched lead II
        tp, n_ref, n_pred = match_peaks(detect_rpeaks(out[1]), moved, 5000, tolerance_s=0.01)
        assert tp == n_ref and n_pred <= n_ref + 1, (tp, n_ref, n_pred)
    assert min(rates) >= HR_RANGE_BPM[0] - 2 and max(rates) <= HR_RANGE_BPM[1] + 2
    assert max(rates) - min(rates) > 20                        # the rate really is drawn


def test_each_step_does_what_it_says():
    rng = np.random.default_rng(0)
    peaks = np.arange(200, 5000, 450)
    ecg = spikes(peaks) * 0.1

    out, moved = augment_ecg(ecg, peaks, rng, probabilities=dict(ONLY, amplitude=1.0))
    ratio = out[ecg > 0.05] / ecg[ecg > 0.05]
    assert 0.5 <= ratio[0] <= 2.0 and np.allclose(ratio, ratio[0], rtol=1e-5)
    np.testing.assert_array_equal(moved, peaks)

    out, _ = augment_ecg(ecg, peaks, rng, probabilities=dict(ONLY, polarity=1.0))
    flipped = [k for k in range(12) if np.allclose(out[k], -ecg[k], atol=1e-6) and ecg[k].any()]
    same = [k for k in range(12) if np.allclose(out[k], ecg[k], atol=1e-6)]
    assert len(flipped) == 1 and len(same) == 11

    out, _ = augment_ecg(ecg, peaks, rng, probabilities=dict(ONLY, missing=1.0))
    zero = np.flatnonzero(~out.any(axis=1))
    assert 1 <= len(zero) <= 10
    kept = np.setdiff1d(np.arange(12), zero)
    np.testing.assert_allclose(out[kept], ecg[kept], atol=1e-6)

    out, _ = augment_ecg(ecg, peaks, rng, probabilities=dict(ONLY, powerline=1.0))
    spectrum = np.abs(np.fft.rfft(out[0] - ecg[0]))
    assert np.fft.rfftfreq(5000, 1 / 500)[np.argmax(spectrum)] in (50.0, 60.0)

    out, _ = augment_ecg(ecg, peaks, rng, probabilities=dict(ONLY, wander=1.0))
    wander = out - ecg
    assert np.abs(wander).max() > 0.01
    # slow: a sinusoid of <= 0.5 Hz and <= 0.8 mV bends by at most 0.8 (2 pi 0.5 / 500)^2 per sample^2
    assert np.abs(np.diff(wander, n=2, axis=1)).max() < 4e-5

    out, _ = augment_ecg(ecg, peaks, rng, probabilities=dict(ONLY, muscle=1.0))
    noise_sd = (out - ecg).std(axis=1)
    assert np.all((noise_sd > 0.004) & (noise_sd < 0.055))


class CountingRng:
    """A numpy Generator that remembers what each ``integers`` call returned."""

    def __init__(self, seed: int):
        self.rng, self.drawn = np.random.default_rng(seed), []

    def __getattr__(self, name):
        return getattr(self.rng, name)

    def integers(self, *args, **kwargs):
        value = self.rng.integers(*args, **kwargs)
        self.drawn.append(value)
        return value


def test_missing_leads_zero_exactly_the_drawn_number_of_distinct_leads():
    """The step draws a count in 1..10 and zeroes that many different leads: never fewer (a lead
    drawn twice), never the last two."""
    ecg = spikes(np.arange(200, 5000, 450)) * 0.1             # every lead non-zero
    counts = set()
    for seed in range(40):
        rng = CountingRng(seed)
        out, _ = augment_ecg(ecg, np.arange(200, 5000, 450), rng, probabilities=dict(ONLY, missing=1.0))
        asked = int(rng.drawn[0])                               # the step's first draw is its count
        zeroed = np.flatnonzero(~out.any(axis=1))
        assert len(zeroed) == asked, (seed, asked, zeroed)
        counts.add(asked)
    assert counts == set(range(1, 11))                          # the 40 records asked for every count


def test_batch_labels_follow_the_moved_peaks_and_are_reproducible():
    rows = np.full((3, 64), -1, dtype=np.int64)
    records = []
    for b, rr in enumerate([350, 500, 700]):
        peaks = np.arange(150 + 40 * b, 5000, rr)
        rows[b, :len(peaks)] = peaks
        records.append(spikes(peaks))
    ecg = torch.from_numpy(np.stack(records).astype(np.float32))
    out, labels, clean = augment_batch(ecg, torch.from_numpy(rows), np.random.default_rng(7),
                                       dict(ONLY, stretch=1.0, muscle=1.0))
    again, labels_again, _ = augment_batch(ecg, torch.from_numpy(rows), np.random.default_rng(7),
                                           dict(ONLY, stretch=1.0, muscle=1.0))
    assert torch.equal(out, again) and torch.equal(labels, labels_again)
    noise_sd = (out - clean).std(dim=-1)                     # clean: stretched, without the noise
    assert bool(((noise_sd > 0.004) & (noise_sd < 0.055)).all())
    out = clean
    assert out.shape == (3, 12, 5000) and out.dtype == torch.float32 and labels.shape == (3, 625, 2)
    for b in range(3):
        # the labels are those of the spike tops of the augmented signal
        sig = out[b, 0].numpy()
        tops = np.flatnonzero((sig[1:-1] > sig[:-2]) & (sig[1:-1] >= sig[2:]) & (sig[1:-1] > 0.5)) + 1
        expected = phase_labels(phase_from_rpeaks(tops, 5000))
        assert np.abs(labels[b].numpy() - expected).max() < 0.03
    assert not torch.equal(out, ecg)


def test_pamae_reconstructs_the_given_target():
    from ecgflowcmr.ecg.pamae import PAMAE

    model = PAMAE(width=32, depth=1, heads=2, decoder_depth=1).eval()
    noisy = torch.randn(2, 12, 5000) * 0.1
    clean = noisy * 0.5
    with torch.no_grad():
        out = model(noisy, target=clean, generator=torch.Generator().manual_seed(0))
        plain = model(noisy, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out["target"], model.encoder.normalizer(clean))
    torch.testing.assert_close(plain["target"], model.encoder.normalizer(noisy))
    torch.testing.assert_close(out["recon"], plain["recon"])           # the input alone drives the model
