"""Complete R-to-R cycles from a predicted cardiac phase, and ROI-Align on the phase axis.

The phase convention is the one of ``ecgflowcmr.data.phase``: 0 at each R-peak, rising linearly to
2*pi at the next R-peak. An R-peak is therefore a *wrap* of the phase from about 2*pi back to 0, and
one complete cycle is the stretch between two consecutive wraps. (The official PA-MAE code took
``atan2`` in (-pi, pi] and cut where that wrapped, i.e. mid-beat to mid-beat; here the cut is where
the phase itself wraps, whatever range the input phase is given in.)

Everything is batched: ``(B, L)`` tensors, padding masks, no Python loop over records or samples.

Wrap detection (robust to a noisy prediction)
    1. unwrap: psi = phase[0] mod 2pi + cumsum(wrap_to_pi(diff(phase)));
    2. make it monotone: the mean of its running maximum from the left and running minimum from
       the right, so a prediction that dithers around a wrap (6.2, 0.05, 6.25, 0.1, ...) crosses
       each multiple of 2*pi once (hysteresis), in the middle of the dithering, not at its edge;
    3. a wrap is a crossing of 2*pi*k; its time is the sub-sample linear interpolation of the
       crossing (so a phase that is exactly 0 at sample r gives the wrap at r exactly);
    4. wraps within ``edge_s`` (default 0.1 s) of either end of the record are dropped: there the
       model sees only one side of the beat and the labels it learnt from were extrapolated, and a
       spurious wrap there would make a short first/last "cycle";
    5. wraps closer than ``min_rr_s`` (default 0.25 s, 240 bpm) to the previous detected wrap are
       dropped.

Cycle choice (``mode``)
    ``median``:   the complete cycle of median R-R (the lower middle one for an even count; first on ties).
    ``ensemble``: all complete cycles whose length is within +-30% of the median R-R (the median
                  cycle always among them), each resampled on the phase axis, averaged.
    ``window``:   no phase: a fixed window of ``window_s`` seconds (1 s) at the centre of the record
                  (the ablation "without PA-MAE").
``start`` / ``end`` are the R-peaks (rounded wrap times) of the median cycle in both phase modes.

Fallback: a record with fewer than one complete cycle (fewer than two wraps: very slow rhythm, a
short input, a flat or failed phase prediction) takes the ``window`` tokens and is flagged
``fallback=True``; its start / end are the window bounds.

Resampling (ROI-Align on the phase axis): token m of a cycle sits at phase 2*pi*m/T (T = 50) within
it; its time is found by inverting the monotone unwrapped phase (``searchsorted`` + linear
interpolation), and the features are linearly interpolated there. Features live on a coarser grid
(stride 8: position p covers samples 8p..8p+7, centre 8p+3.5). All interpolation weights go into one
``(B, T, P)`` matrix, so the tokens are a single ``bmm`` with the features, differentiable with
respect to the features; the cycle positions themselves carry no gradient.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

TWO_PI = 2.0 * math.pi
MODES = ("median", "ensemble", "window")
ENSEMBLE_TOLERANCE = 0.3     # ensemble keeps cycles with |RR - median RR| <= 30% of the median
EDGE_S = 0.1                 # no wrap (R-peak) within this many seconds of the record ends
MIN_RR_S = 0.25              # wraps closer than this to the previous one are dropped (240 bpm)


@dataclass
class Wraps:
    """Detected phase wraps (R-peaks). ``times`` (B, K) float sample times, NaN where padded;
    ``valid`` (B, K) bool; ``psi`` (B, L) the monotone unwrapped phase they were found on."""

    times: torch.Tensor
    valid: torch.Tensor
    psi: torch.Tensor

    def as_lists(self) -> list[list[int]]:
        """Rounded wrap sample indices per record (for metrics and plots, not the hot path)."""
        out = []
        for row, ok in zip(self.times.cpu(), self.valid.cpu()):
            out.append([int(round(float(t))) for t in row[ok]])
        return out


@dataclass
class CycleSelection:
    """Where the tokens come from. ``times`` (B, J, T): sample time of token m of cycle j;
    ``weights`` (B, J): weight of cycle j in the average (rows sum to 1); ``start`` / ``end`` (B,)
    int64 sample indices of the chosen cycle; ``fallback`` (B,) bool; ``wraps``: the detected
    R-peaks (None in window mode)."""

    times: torch.Tensor
    weights: torch.Tensor
    start: torch.Tensor
    end: torch.Tensor
    fallback: torch.Tensor
    wraps: Wraps | None = None


def _check_phase(phase: torch.Tensor) -> None:
    if not isinstance(phase, torch.Tensor) or phase.ndim != 2:
        shape = tuple(phase.shape) if isinstance(phase, torch.Tensor) else type(phase).__name__
        raise ValueError(f"phase must be a (B, L) tensor of angles in radians, got {shape}")
    if phase.shape[1] < 2:
        raise ValueError(f"phase needs at least 2 samples per record, got shape {tuple(phase.shape)}")


def unwrap_monotone(phase: torch.Tensor) -> torch.Tensor:
    """(B, L) phase (any 2*pi range) -> (B, L) non-decreasing unwrapped phase.

    The raw unwrapped phase psi (starting in [0, 2pi)) is squeezed between its running maximum
    (which crosses a level at the *first* time psi does) and its running minimum from the right
    (the *last* time); their mean is non-decreasing and crosses each level once, in the middle of a
    noisy crossing rather than at its early edge.
    """
    _check_phase(phase)
    phase = phase.detach().to(torch.float64)
    step = torch.remainder(phase.diff(dim=1) + math.pi, TWO_PI) - math.pi     # wrap to [-pi, pi)
    psi = torch.cat([torch.remainder(phase[:, :1], TWO_PI), step], dim=1).cumsum(dim=1)
    upper = psi.cummax(dim=1).values
    lower = psi.flip(1).cummin(dim=1).values.flip(1)
    return 0.5 * (upper + lower)


def _compact(event: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack ``values`` where ``event`` (B, L) is True to the left: (B, K) float (NaN pad), (B, K) bool."""
    count = event.sum(dim=1)
    k = max(int(count.max()) if count.numel() else 0, 1)
    slot = torch.where(event, event.long().cumsum(dim=1) - 1, torch.full_like(count[:, None], k))
    packed = torch.full((event.shape[0], k + 1), float("nan"), dtype=values.dtype, device=values.device)
    packed.scatter_(1, slot, values)                # column k collects the non-events; dropped below
    valid = torch.arange(k, device=event.device)[None] < count[:, None]
    return packed[:, :k], valid


def find_wraps(phase: torch.Tensor, fs: float = 500.0, min_rr_s: float = MIN_RR_S,
               edge_s: float = EDGE_S) -> Wraps:
    """R-peaks as the phase wraps of each record (see the module docstring)."""
    psi = unwrap_monotone(phase)
    turns = torch.floor(psi / TWO_PI)
    event = torch.zeros_like(psi, dtype=torch.bool)
    event[:, 1:] = turns[:, 1:] > turns[:, :-1]
    edge = int(round(edge_s * fs))
    if edge > 0:
        event[:, : edge + 1] = False
        event[:, psi.shape[1] - edge:] = False
    # sub-sample crossing time of 2*pi*k between samples t-1 and t
    level = TWO_PI * turns
    prev = torch.cat([psi[:, :1], psi[:, :-1]], dim=1)
    rise = (psi - prev).clamp_min(1e-12)
    t = torch.arange(psi.shape[1], device=psi.device, dtype=psi.dtype)[None]
    crossing = (t - 1 + (level - prev) / rise).clamp_min(0)
    times, valid = _compact(event, crossing)
    if times.shape[1] > 1 and min_rr_s > 0:         # drop wraps too close to the previous one
        gap = times[:, 1:] - times[:, :-1]
        keep = valid.clone()
        keep[:, 1:] &= ~(gap < min_rr_s * fs)       # NaN gaps compare False: padding stays invalid
        times, valid = _compact(keep, torch.where(keep, times, torch.zeros_like(times)))
    return Wraps(times=times, valid=valid, psi=psi)


def _phase_to_time(psi: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Invert the monotone ``psi`` (B, L): sample time where psi reaches ``target`` (B, M)."""
    length = psi.shape[1]
    idx = torch.searchsorted(psi.contiguous(), target.contiguous()).clamp(1, length - 1)
    lo = psi.gather(1, idx - 1)
    hi = psi.gather(1, idx)
    frac = ((target - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1)
    return (idx - 1).to(psi.dtype) + frac


def window_times(batch: int, length: int, num_tokens: int, fs: float = 500.0, window_s: float = 1.0,
                 device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Centre window: token times (B, 1, T), start (B,), end (B,) (end exclusive)."""
    width = min(int(round(window_s * fs)), length)
    start = (length - width) // 2
    times = start + width * torch.arange(num_tokens, device=device, dtype=torch.float64) / num_tokens
    times = times.expand(batch, 1, num_tokens).clone()
    start_t = torch.full((batch,), start, dtype=torch.int64, device=device)
    return times, start_t, start_t + width


def select_cycles(phase: torch.Tensor | None, mode: str = "median", num_tokens: int = 50,
                  fs: float = 500.0, min_rr_s: float = MIN_RR_S, window_s: float = 1.0,
                  length: int | None = None, batch: int | None = None, edge_s: float = EDGE_S) -> CycleSelection:
    """Choose the cycle(s) of each record and the times of their ``num_tokens`` phase positions.

    ``phase`` (B, L) in radians (ignored, may be None, in ``window`` mode: then give length/batch).
    """
    if mode not in MODES:
        raise ValueError(f"cycle mode must be one of {MODES}, got {mode!r}")
    if mode == "window" and phase is None:
        if length is None or batch is None:
            raise ValueError("window mode without a phase needs length= and batch=")
        times, start, end = window_times(batch, length, num_tokens, fs, window_s)
        weights = torch.ones(batch, 1, dtype=torch.float64)
        return CycleSelection(times, weights, start, end, torch.zeros(batch, dtype=torch.bool))
    _check_phase(phase)
    batch, length = phase.shape
    device = phase.device
    win_times, win_start, win_end = window_times(batch, length, num_tokens, fs, window_s, device)
    if mode == "window":
        return CycleSelection(win_times, torch.ones(batch, 1, dtype=torch.float64, device=device),
                              win_start, win_end, torch.zeros(batch, dtype=torch.bool, device=device))

    wraps = find_wraps(phase, fs, min_rr_s, edge_s)
    psi = wraps.psi
    if wraps.times.shape[1] < 2:        # nobody has a complete cycle
        return CycleSelection(win_times, torch.ones(batch, 1, dtype=torch.float64, device=device),
                              win_start, win_end, torch.ones(batch, dtype=torch.bool, device=device), wraps)
    starts, ends = wraps.times[:, :-1], wraps.times[:, 1:]
    complete = wraps.valid[:, :-1] & wraps.valid[:, 1:]                      # (B, J)
    # lengths compared at 1/100 sample, so float noise does not break ties between equal cycles
    rr = torch.where(complete, torch.round((ends - starts) * 100) / 100, torch.full_like(starts, float("nan")))
    median_rr = torch.nanmedian(rr, dim=1).values                             # NaN if no cycle
    # nanmedian is a real cycle length (the lower middle one for an even count): the median cycle
    # itself; the ensemble tolerance is around the true median (mean of the two middle ones)
    true_median_rr = torch.nanquantile(rr, 0.5, dim=1)
    distance = torch.where(complete, (rr - median_rr[:, None]).abs(), torch.full_like(rr, float("inf")))
    chosen = distance.argmin(dim=1)                                           # (B,)
    fallback = ~complete.any(dim=1)

    if mode == "median":
        weights = torch.nn.functional.one_hot(chosen, rr.shape[1]).to(torch.float64)
    else:  # ensemble
        keep = complete & ((rr - true_median_rr[:, None]).abs() <= ENSEMBLE_TOLERANCE * true_median_rr[:, None])
        keep |= torch.nn.functional.one_hot(chosen, rr.shape[1]).bool() & complete
        weights = keep.to(torch.float64)
        weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(1)
    # token m of cycle j sits where psi reaches psi(start_j) + m/T * (psi(end_j) - psi(start_j));
    # psi at a wrap is a multiple of 2*pi, recovered by rounding (robust to float error)
    level_s = TWO_PI * torch.round(_interp_rows(psi, starts.nan_to_num(0)) / TWO_PI)
    level_e = TWO_PI * torch.round(_interp_rows(psi, ends.nan_to_num(0)) / TWO_PI)
    level_e = torch.maximum(level_e, level_s + TWO_PI)
    frac = torch.arange(num_tokens, device=device, dtype=psi.dtype) / num_tokens
    target = level_s[..., None] + (level_e - level_s)[..., None] * frac              # (B, J, T)
    times = _phase_to_time(psi, target.reshape(batch, -1)).reshape(target.shape)
    # the first token is the wrap itself (exact, not re-derived through psi)
    times[..., 0] = starts.nan_to_num(0)

    # fallback rows: the centre window
    times = torch.where(fallback[:, None, None], _pad_like(win_times, times), times)
    first = torch.nn.functional.one_hot(torch.zeros_like(chosen), rr.shape[1]).to(torch.float64)
    weights = torch.where(fallback[:, None], first, weights)
    pick = chosen[:, None]
    start = torch.round(starts.gather(1, pick).squeeze(1).nan_to_num(0)).long()
    end = torch.round(ends.gather(1, pick).squeeze(1).nan_to_num(0)).long()
    start = torch.where(fallback, win_start, start)
    end = torch.where(fallback, win_end, end)
    return CycleSelection(times, weights, start, end, fallback, wraps)


def _interp_rows(values: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
    """Linear interpolation of ``values`` (B, L) at float sample ``times`` (B, M)."""
    length = values.shape[1]
    t = times.clamp(0, length - 1)
    i0 = t.floor().long().clamp(0, length - 1)
    i1 = (i0 + 1).clamp(max=length - 1)
    w = (t - i0.to(t.dtype)).to(values.dtype)
    return values.gather(1, i0) * (1 - w) + values.gather(1, i1) * w


def _pad_like(win: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
    """(B, 1, T) window times -> (B, J, T), the window in slot 0 (other slots get weight 0)."""
    out = torch.zeros_like(times)
    out[:, :1] = win.to(times.dtype)
    return out


def interpolation_matrix(times: torch.Tensor, weights: torch.Tensor, num_positions: int,
                         stride: float) -> torch.Tensor:
    """(B, J, T) sample times and (B, J) cycle weights -> (B, T, P) linear-interpolation weights.

    Feature position p is centred on sample ``p * stride + (stride - 1) / 2``; times outside the
    first / last centre take the edge feature.
    """
    batch, cycles, tokens = times.shape
    coord = ((times - (stride - 1) / 2) / stride).clamp(0, num_positions - 1)
    i0 = coord.floor().long().clamp(0, num_positions - 1)
    i1 = (i0 + 1).clamp(max=num_positions - 1)
    w1 = coord - i0.to(coord.dtype)
    cw = weights[..., None]
    index = torch.cat([i0, i1], dim=1).permute(0, 2, 1)                              # (B, T, 2J)
    src = torch.cat([(1 - w1) * cw, w1 * cw], dim=1).permute(0, 2, 1)
    matrix = torch.zeros(batch, tokens, num_positions, dtype=times.dtype, device=times.device)
    return matrix.scatter_add_(2, index, src)


def roi_align(features: torch.Tensor, selection: CycleSelection, stride: float) -> torch.Tensor:
    """(B, P, D) features on a grid of ``stride`` samples -> (B, T, D) tokens of the selection."""
    if features.ndim != 3 or features.shape[0] != selection.times.shape[0]:
        raise ValueError(f"features must be (B, P, D) with B={selection.times.shape[0]}, "
                         f"got {tuple(features.shape)}")
    matrix = interpolation_matrix(selection.times.to(features.device), selection.weights.to(features.device),
                                  features.shape[1], stride)
    return torch.bmm(matrix.to(features.dtype), features)


@dataclass
class CycleOutput:
    """What an ECG encoder returns: the cycle's tokens and where the cycle lies in the record."""
    tokens: torch.Tensor      # (B, T, D)
    pooled: torch.Tensor      # (B, D)
    phase: torch.Tensor       # (B, L) in [0, 2pi)
    start: torch.Tensor       # (B,) int64
    end: torch.Tensor         # (B,) int64
    fallback: torch.Tensor    # (B,) bool
    wraps: Wraps | None = None  # detected R-peaks (phase modes only), for metrics and plots
