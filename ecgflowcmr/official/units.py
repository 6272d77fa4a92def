"""Which ECG scaling the published stage-1 weights expect.

The official code feeds the stored ECG values to the encoder as they are, and the units of the
released training data are not published. BatchNorm in eval mode subtracts and divides by fixed
running statistics, so the encoder only behaves as trained at the training scale. The stage-1
checkpoint carries its decoder, which was trained to reconstruct the input in those units; this
check feeds the user's ECGs (read in mV) at each plausible scaling and reports, per scaling:

* ``rec_error``: the decoder's reconstruction MSE divided by the per-lead variance of the input
  (1 = no better than a flat line at each lead's mean; the training scale gives the lowest);
* ``sensitivity`` / ``ppv`` / ``offset_ms``: whether the predicted phase wraps (0 at R-peaks in
  the official labels) land on the R-peaks found by ``data.phase.detect_rpeaks`` (+-50 ms, the
  median distance of the matches).

Scalings: ``mV`` (x 1), ``uV`` (x 1000), ``adc`` (x 200: UK Biobank's XML counts at 5 uV/LSB).
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

from ..contract import ECG_FS as FS
from ..ecg.cycles import find_wraps
from ..ecg.metrics import TOLERANCE_S, match_peaks
from ..ecg.official import OfficialPAMAE, phase_on_samples

SCALINGS = {"mV": 1.0, "uV": 1000.0, "adc": 200.0}


def parse_scale(text: str) -> float:
    """``mV`` / ``uV`` / ``adc`` or a positive number -> the factor applied to ECGs in mV."""
    if text in SCALINGS:
        return SCALINGS[text]
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"ECG scaling '{text}': use mV, uV, adc or a positive number") from None
    if value <= 0:
        raise ValueError(f"ECG scaling '{text}' must be > 0")
    return value


def reference_rpeaks(ecgs: np.ndarray) -> list[np.ndarray | None]:
    """R-peaks of each record (``detect_rpeaks``), None where no plausible rhythm is found."""
    from ..data.phase import RPeakError, detect_rpeaks

    peaks = []
    for ecg in ecgs:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                peaks.append(detect_rpeaks(ecg, FS))
        except (RPeakError, ValueError):
            peaks.append(None)
    return peaks


@torch.no_grad()
def check_units(model: OfficialPAMAE, ecgs: np.ndarray, scalings: dict[str, float] | None = None,
                device: str | torch.device = "cpu", batch: int = 8) -> list[dict]:
    """``ecgs (N, 12, L)`` in mV through ``model`` (eval mode, ``input_scale`` 1) at each scaling:
    one row per scaling (``name``, ``factor``, ``rec_error``, ``sensitivity``, ``ppv``, ``f1``,
    ``offset_ms``, ``records``)."""
    if model.encoder.input_scale != 1.0:
        raise ValueError("check_units needs the model with input_scale 1 (it applies each scaling itself)")
    model = model.to(device).eval()
    ecgs = np.asarray(ecgs, dtype=np.float32)
    refs = reference_rpeaks(ecgs)
    length = ecgs.shape[-1]
    rows = []
    for name, factor in (scalings or SCALINGS).items():
        errors, tp, n_ref, n_pred, offsets = [], 0, 0, 0, []
        for lo in range(0, len(ecgs), batch):
            x = torch.from_numpy(ecgs[lo:lo + batch] * factor).to(device)
            feats, sincos = model.encoder.raw(x)
            rec = model.decoder(feats).float()
            centred = x - x.mean(dim=-1, keepdim=True)
            errors += ((rec - x).pow(2).mean(dim=(1, 2)) / centred.pow(2).mean(dim=(1, 2)).clamp_min(1e-12)).tolist()
            wraps = find_wraps(phase_on_samples(sincos, length)).as_lists()
            for pred, ref in zip(wraps, refs[lo:lo + batch]):
                if ref is None:
                    continue
                t, r, p = match_peaks(np.asarray(pred), ref, length)
                tp, n_ref, n_pred = tp + t, n_ref + r, n_pred + p
                if len(pred):
                    dist = np.abs(np.asarray(pred)[None] - ref[:, None]).min(axis=1)
                    offsets += (dist[dist <= TOLERANCE_S * FS] / FS * 1000).tolist()
        sens = tp / n_ref if n_ref else float("nan")
        ppv = tp / n_pred if n_pred else 0.0
        f1 = 2 * sens * ppv / (sens + ppv) if sens + ppv > 0 else 0.0
        rows.append({"name": name, "factor": factor, "rec_error": float(np.mean(errors)), "sensitivity": sens,
                     "ppv": ppv, "f1": f1, "offset_ms": float(np.median(offsets)) if offsets else float("nan"),
                     "records": len(ecgs)})
    return rows


def recommend(rows: list[dict]) -> tuple[dict, str]:
    """The scaling with the lowest reconstruction error, and a sentence saying how sure that is."""
    best = min(rows, key=lambda r: r["rec_error"])
    by_f1 = max(rows, key=lambda r: (r["f1"], -r["rec_error"]))
    others = sorted(r["rec_error"] for r in rows if r is not best)
    margin = others[0] / best["rec_error"] if others and best["rec_error"] > 0 else float("inf")
    note = (f"{best['name']} (x{best['factor']:g}) reconstructs best ({margin:.1f}x lower error than the next)")
    if by_f1 is not best and by_f1["f1"] > best["f1"]:
        note += f"; the phase wraps match the R-peaks better at {by_f1['name']}: check the input files"
    return best, note


def format_table(rows: list[dict]) -> str:
    lines = ["scaling  factor  rec_error  R-peak sens   ppv   offset_ms",
             *(f"{r['name']:<8} {r['factor']:>6g}  {r['rec_error']:9.4f}  {r['sensitivity']:11.3f} {r['ppv']:5.3f}"
               f"  {r['offset_ms']:9.1f}" for r in rows)]
    return "\n".join(lines)
