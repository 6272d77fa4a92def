"""The paired ECG-cine phantom: a benchmark with known answers, written in the real file formats.

Version 1 (this module; ``v2.py`` is the UK Biobank-like version 2 built on its pieces).
``python -m ecgflowcmr.phantom --out DIR --n N --seed S [--workers W] [--version 2]`` (``build.py``)
writes::

    DIR/ecg/<id>.xml       UK Biobank CardioSoft XML: 10 s, 12 leads, 500 Hz, integer samples with
                           <Resolution> 5 uV/LSB under <StripData>; median beats under
                           <RestingECGMeasurements>/<MedianSamples>
    DIR/cmr/<id>.nii.gz    four-chamber cine, UK Biobank long-axis layout (H, W, 1, T) = (128, 128, 1, 50),
                           int16 MRI-like intensities, affine in mm (pixel spacing 1.7-1.95 mm)
    DIR/masks/<id>.nii.gz  per-frame labels, same layout, uint8: 0 bg, 1 LV, 2 RV, 3 LA, 4 RA, 5 myocardium
    DIR/truth/<id>.json    everything known about the subject (parameters, delineation, curves)
    DIR/manifest.csv       one row per subject: paths (relative to DIR) and ground truth
    DIR/ecg_only/...       with ``--ecg-only M``: M more subjects (ids from PH100000) in the same layout,
                           whose manifest names the cine ``oracle_cmr_path``: an ECG-only pool with
                           the true cines kept aside (the oracle of synthetic pretraining)

How a subject is made (all randomness from ``SeedSequence([seed, index, 1])``, so a subject depends
on (seed, index) only, whatever the number of workers):

1. Class (normal / dilated / hypertrophic, 2:1:1 in every aligned block of four subjects) and
   parameters: heart rate, HRV, PR, QRS width, QTc, QRS axis and voltages, T-wave direction and
   shape, ventricular size, wall thickness, ejection fraction, filling pattern; plus anatomy that
   no ECG reveals (orientation, position, scale, RV and atrial sizes, tricuspid offset, tissue
   contrast, texture, coil shading, noise level, pixel spacing).
2. ECG: a dipole (vectorcardiogram) model. Each beat is a sum of P (two atrial components), Q, R,
   S (R' for the dilated, LBBB-like class), ST and an asymmetric T wave, each a Gaussian in time
   times a 3-D heart vector; the 12 leads are projections of that vector, so Einthoven/Goldberger
   relations hold exactly (III = II - I, ...). R-R intervals carry respiratory + Mayer-wave HRV;
   QT follows Bazett on the preceding R-R. Noise (white, EMG, baseline wander, mains) is added to
   the independently recorded leads (I, II, V1-V6) and the other limb leads are derived, as an
   electrocardiograph does. (neurokit2's ``ecg_simulate(method="multileads")`` was not used: it
   rescales every lead to a fixed [-0.4, 1.2] mV range, which erases voltage phenotypes and breaks
   III = II - I, and it costs ~3.4 s per subject.)
3. Delineation of the clean ECG (before noise), by rule: QRS found on the spatial velocity,
   R-peak = top of the R wave in lead II (where ``data.phase.detect_rpeaks`` looks; the spatial-RMS
   peak if lead II has no R wave), QRS on/offset from the spatial velocity, T end and P onset by
   the tangent method on the spatial RMS. The cine uses those delineated times, not the
   simulator's parameters (the T end of the cine beat is the ES time; ``es_frame`` is the frame
   of the smallest model LV area, one of the two frames around it).
4. One R-R cycle (the beat whose R-R is closest to the median) is the cine: frame f at
   t = f * RR / 50, frame 0 at the R-peak (end-diastole). LV area curve: isovolumic contraction
   until QRS onset + 40-60 ms, ejection until aortic valve closure = delineated T end (ES),
   isovolumic relaxation (70-110 ms, a slight area rise), rapid filling, diastasis (its share
   shrinks with its duration, i.e. as heart rate rises), atrial kick from P onset + 90-130 ms to
   the next R-peak.
5. Geometry in mm (heart frame: u along the long axis, base -> apex; v across, towards the LV
   lateral wall): LV and RV cavities are truncated ellipses whose apex stays fixed while the base
   descends (MAPSE / TAPSE); LV cavity area follows the curve exactly; the myocardium keeps its
   area, so the wall thickens in systole (septum and lateral wall set separately); the RV wraps
   around the septum; LA and RA fill anti-phase to the ventricles. Masks and image come from the
   same implicit shapes. The image adds pericardial fat, lungs, liver, descending aorta, chest wall,
   smooth tissue texture, a point-spread blur, coil shading and Rician noise.

The cine frames and masks are rendered with vectorised numpy over (T, H, W).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from ecgflowcmr.contract import ECG_FS as FS
from ecgflowcmr.contract import ECG_SAMPLES as N_SAMPLES
from ecgflowcmr.contract import LEADS
from ecgflowcmr.contract import NUM_FRAMES as N_FRAMES

CLASSES = ("normal", "dilated", "hypertrophic")
MASK_LABELS = {0: "background", 1: "LV", 2: "RV", 3: "LA", 4: "RA", 5: "myocardium"}
IMAGE_SHAPE = (128, 128)
SLICE_MM = 8.0
RESOLUTION_UV = 5           # uV per LSB in the XML
MEDIAN_PRE, MEDIAN_POST = 250, 350   # median beat window around the R-peak (samples; 1.2 s)
GENERATOR_VERSION = 1       # this module's version; v2.py is version 2
VERSIONS = (1, 2)
TRUNC = 0.3                 # ventricles: ellipse cut at the base, TRUNC * semi-axis below its centre
_F_TRUNC = math.pi / 2 + TRUNC * math.sqrt(1 - TRUNC ** 2) + math.asin(TRUNC)   # area = A * B * _F_TRUNC

# Lead vectors in heart coordinates (x: patient's left, y: inferior, z: anterior).
_I = np.array([1.0, 0.0, 0.0])
_II = np.array([0.5, math.sqrt(3) / 2, 0.0])
_PRECORDIAL = np.array([[-0.55, 0.05, 0.83], [-0.05, 0.1, 1.0], [0.45, 0.15, 0.88],
                        [0.75, 0.2, 0.63], [0.92, 0.18, 0.3], [1.0, 0.15, 0.0]])
_PRECORDIAL = 1.35 * _PRECORDIAL / np.linalg.norm(_PRECORDIAL, axis=1, keepdims=True)
LEAD_MATRIX = np.vstack([_I, _II, _II - _I, -(_I + _II) / 2, _I - _II / 2, _II - _I / 2, _PRECORDIAL])


def subject_id(index: int) -> str:
    return f"PH{index:05d}"


# ----------------------------------------------------------------------------- parameters

def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def subject_class(seed: int, index: int) -> str:
    """2 normal : 1 dilated : 1 hypertrophic in every aligned block of four subjects (seeded order)."""
    block = np.random.default_rng(np.random.SeedSequence([seed, index // 4, 2]))
    return str(block.permutation(["normal", "normal", "dilated", "hypertrophic"])[index % 4])


def max_heart_rate(p: dict) -> float:
    """The fastest mean rate (bpm) that keeps >= 90 ms between T end and the next P onset at the
    shortest beats (3 SDs of HRV), given PR, QTc (Bazett) and HRV of ``p``."""
    hrs = np.linspace(40.0, 140.0, 1001)
    rr = 60.0 / hrs
    slack = (rr * (1 - 3 * p["sdnn_frac"]) - p["pr_ms"] / 1000
             - p["qtc_target_ms"] / 1000 * np.sqrt(rr * (1 + 3 * p["sdnn_frac"])) - 0.09)
    return float(hrs[slack >= 0].max())


def sample_params(seed: int, index: int) -> dict:
    """All parameters of one subject; a pure function of (seed, index).

    One long function on purpose: the order of its random draws defines every version-1 subject,
    so it reads top to bottom as that order and is not split."""
    cls = subject_class(seed, index)
    streams = np.random.SeedSequence([seed, index, 1]).spawn(4)
    r = np.random.default_rng(streams[0])      # class-tied physiology (ECG + heart)
    a = np.random.default_rng(streams[1])      # anatomy and image appearance no ECG reveals
    u = r.uniform
    by_class = {"normal": 0, "dilated": 1, "hypertrophic": 2}[cls]

    def pick(n, d, h):  # (low, high) per class
        lo, hi = (n, d, h)[by_class]
        return float(u(lo, hi))

    p: dict = {"class": cls, "seed": int(seed), "index": int(index), "generator_version": GENERATOR_VERSION}
    # --- rhythm
    p["hr_target_bpm"] = pick((55, 90), (65, 105), (50, 85))
    p["sdnn_frac"] = pick((0.02, 0.06), (0.008, 0.025), (0.015, 0.045))
    p["resp_hz"] = float(u(0.15, 0.33))
    p["mayer_hz"] = float(u(0.07, 0.12))
    p["pr_ms"] = pick((130, 190), (150, 220), (130, 200))
    p["qrs_target_ms"] = pick((80, 100), (125, 160), (90, 112))
    p["qtc_target_ms"] = pick((385, 425), (430, 475), (420, 465))
    # Keep >= 90 ms between T end and the next P onset at the fastest beats: squeeze the class's
    # heart-rate range (monotonically, so the order of subjects by rate is kept) where needed.
    lo, hi = ((55, 90), (65, 105), (50, 85))[by_class]
    hr_max = max_heart_rate(p)
    if hr_max < hi:
        p["hr_target_bpm"] = lo + (p["hr_target_bpm"] - lo) * (min(hr_max, hi) - lo) / (hi - lo)
    # --- ECG voltages and directions
    p["axis_deg"] = pick((0, 75), (0, 50), (-15, 60))
    p["r_z"] = pick((-0.45, -0.15), (-0.65, -0.35), (-0.75, -0.45))
    p["r_amp_mv"] = pick((1.1, 1.7), (0.8, 1.3), (2.2, 3.1))
    p["s_amp_mv"] = pick((0.3, 0.6), (0.3, 0.6), (0.7, 1.2))
    p["q_amp_mv"] = pick((0.1, 0.25), (0.0, 0.04), (0.15, 0.35))
    p["rprime_frac"] = pick((0, 0), (0.55, 0.9), (0, 0))
    p["t_amp_mv"] = pick((0.25, 0.5), (0.15, 0.35), (0.2, 0.45))
    p["t_discordance"] = pick((0.0, 0.15), (0.5, 0.8), (0.65, 0.95))  # 0: T along R; 1: opposite
    p["t_rot_deg"] = float(u(-25, 20))
    p["t_z"] = float(u(0.15, 0.5))
    p["t_sigma_up_ms"] = pick((45, 62), (50, 70), (55, 75))
    p["t_sigma_down_ms"] = pick((26, 36), (30, 40), (28, 38))
    p["st_amp_mv"] = pick((0, 0.02), (0.02, 0.08), (0.06, 0.16))
    p["p_amp_mv"] = float(u(0.06, 0.11))
    p["p_la_frac"] = pick((0.7, 1.0), (1.1, 1.5), (1.0, 1.4))           # P mitrale in the sick classes
    p["ecg_gain"] = float(np.exp(a.normal(0.0, 0.15)))                   # body habitus
    # --- ECG noise
    p["noise_white_uv"] = float(a.uniform(4, 20))
    p["noise_emg_uv"] = float(a.uniform(0, 15))
    p["wander_mv"] = float(a.uniform(0.02, 0.12))
    p["mains_uv"] = float(a.uniform(0, 15))
    # --- LV (class-tied anatomy and function), mm
    p["lv_length_mm"] = pick((80, 92), (98, 112), (74, 86))
    p["lv_halfwidth_mm"] = pick((21, 26), (29, 35), (16, 21))
    p["septum_mm"] = pick((8, 11), (6, 8.5), (15, 24))
    p["lateral_mm"] = pick((7.5, 10.5), (6, 8.5), (10, 15))
    p["apex_mm"] = pick((6, 8), (5, 6.5), (8, 12))
    p["ef_area_target"] = pick((0.47, 0.60), (0.15, 0.33), (0.58, 0.72))
    p["mapse_mm"] = pick((12, 17), (5, 9), (7, 11))
    p["ivc_ms"] = float(u(40, 60))
    p["ivr_ms"] = pick((70, 90), (70, 90), (85, 110))
    p["ivr_rise"] = float(u(0.04, 0.07))                                # share of stroke area regained in IVR
    p["rapid_fill_ms"] = pick((120, 170), (90, 130), (150, 210))
    p["e_frac"] = pick((0.58, 0.68), (0.68, 0.78), (0.40, 0.52))        # early (E) filling share
    p["diastasis_frac_per_s"] = float(u(0.08, 0.16))
    p["atrial_delay_ms"] = float(u(90, 130))
    # --- anatomy no ECG reveals
    p["heart_scale"] = float(a.uniform(0.9, 1.1))
    p["theta_deg"] = float(a.uniform(-80, -40))        # long axis (base -> apex) angle in the image
    p["offset_x_mm"] = float(a.uniform(-12, 12))
    p["offset_y_mm"] = float(a.uniform(-12, 12))
    p["pixel_mm"] = float(a.uniform(1.7, 1.95))
    p["rv_halfwidth_mm"] = float(a.uniform(19, 27)) * (1.12 if cls == "dilated" else 1.0)
    p["rv_length_frac"] = float(a.uniform(0.72, 0.86))
    p["rv_wall_mm"] = float(a.uniform(3, 4.5))
    p["rv_overlap"] = float(a.uniform(0.25, 0.4))
    p["rv_ef_area"] = float(a.uniform(0.38, 0.52)) * (0.7 if cls == "dilated" else 1.0)
    p["tapse_mm"] = float(a.uniform(16, 24)) * (0.6 if cls == "dilated" else 1.0)
    p["tv_offset_mm"] = float(a.uniform(4, 10))
    p["la_min_area_mm2"] = float(a.uniform(900, 1400)) * (1.35 if cls == "dilated" else 1.0)
    p["la_aspect"] = float(a.uniform(0.75, 1.05))      # v / u semi-axis
    p["la_reservoir"] = float(a.uniform(0.35, 0.6))    # LA area gained per LV area lost
    p["ra_min_area_mm2"] = float(a.uniform(800, 1300))
    p["ra_aspect"] = float(a.uniform(0.75, 1.05))
    p["ra_reservoir"] = float(a.uniform(0.3, 0.5))
    p["fat_mm"] = float(a.uniform(2, 6))
    p["blood_intensity"] = float(a.uniform(650, 900))
    p["myo_intensity"] = float(a.uniform(140, 230))
    p["tissue_intensity"] = float(a.uniform(220, 320))
    p["fat_intensity"] = float(a.uniform(550, 780))
    p["lung_intensity"] = float(a.uniform(15, 50))
    p["noise_sigma"] = float(a.uniform(8, 30))
    p["psf_sigma_px"] = float(a.uniform(0.45, 0.8))
    p["coil_angle_deg"] = float(a.uniform(0, 360))
    p["coil_strength"] = float(a.uniform(0.15, 0.5))
    p["texture_seed"] = int(a.integers(0, 2 ** 31 - 1))
    p["plane_jitter_deg"] = [float(x) for x in a.uniform(-10, 10, size=3)]
    p["scanner_center_mm"] = [float(x) for x in a.uniform(-30, 30, size=3)]
    return p


# ----------------------------------------------------------------------------- ECG

def _rr_intervals(p: dict, rng: np.random.Generator, t_start: float, t_stop: float) -> np.ndarray:
    """R-peak times (s) from t_start to t_stop with respiratory + Mayer-wave HRV."""
    rr_mean = 60.0 / p["hr_target_bpm"]
    n = int((t_stop - t_start) / (rr_mean * 0.75)) + 4
    t_nom = t_start + rr_mean * np.arange(n)
    sd = p["sdnn_frac"]
    phase_r, phase_m = rng.uniform(0, 2 * np.pi, size=2)
    mod = (sd * 1.0 * np.sin(2 * np.pi * p["resp_hz"] * t_nom + phase_r)
           + sd * 0.8 * np.sin(2 * np.pi * p["mayer_hz"] * t_nom + phase_m)
           + sd * 0.5 * rng.standard_normal(n))
    rr = rr_mean * (1.0 + mod)
    r_times = t_start + rng.uniform(0, rr_mean) + np.concatenate([[0.0], np.cumsum(rr[:-1])])
    return r_times[r_times < t_stop]


def _beat_components(p: dict, r_times: np.ndarray, rng: np.random.Generator):
    """Wave components of every beat: centres (s), left/right sigmas (s), heart vectors (K, 3) in mV."""
    d = p["qrs_target_ms"] / 1000.0
    alpha = math.radians(p["axis_deg"])
    r_dir = _unit([math.cos(alpha), math.sin(alpha), p["r_z"]])
    q_dir = _unit([-0.6, 0.25, 0.75])
    s_dir = _unit([-0.35, -0.45, -0.8])
    rp_dir = _unit([0.9, 0.15, -0.55])
    at = alpha + math.radians(p["t_rot_deg"])
    t_norm = _unit([math.cos(at), math.sin(at), p["t_z"]])
    w = p["t_discordance"]
    t_dir = _unit((1 - w) * t_norm - w * r_dir)
    st_dir = -r_dir
    p_ra_dir = _unit([0.15, 0.9, 0.45])
    p_la_dir = _unit([0.85, 0.35, -0.45])
    gain = p["ecg_gain"]

    rr = np.diff(r_times)
    rr_prev = np.concatenate([[np.median(rr)], rr])                      # R-R preceding each beat
    resp = 1.0 + 0.05 * np.sin(2 * np.pi * p["resp_hz"] * r_times + rng.uniform(0, 2 * np.pi))
    qrs_on = -0.475 * d
    qt = p["qtc_target_ms"] / 1000.0 * np.sqrt(rr_prev)                  # Bazett, per beat
    sig_up = p["t_sigma_up_ms"] / 1000.0 * np.sqrt(rr_prev)
    sig_dn = p["t_sigma_down_ms"] / 1000.0 * rr_prev ** 0.25
    t_end = qrs_on + qt
    t_peak = t_end - 2.0 * sig_dn
    p_on = qrs_on - p["pr_ms"] / 1000.0

    lbbb = p["rprime_frac"] > 0
    waves = []  # (offset from R (per-beat array or scalar), sigma_left, sigma_right, vector, amplitude per beat)
    ones = np.ones_like(r_times)
    if lbbb:
        waves += [(-0.12 * d * ones, 0.13 * d, 0.13 * d, r_dir, p["r_amp_mv"] * resp),
                  (0.16 * d * ones, 0.13 * d, 0.13 * d, rp_dir, p["r_amp_mv"] * p["rprime_frac"] * resp),
                  (0.36 * d * ones, 0.07 * d, 0.07 * d, s_dir, p["s_amp_mv"] * 0.6 * resp),
                  (-0.30 * d * ones, 0.07 * d, 0.07 * d, q_dir, p["q_amp_mv"] * resp)]
    else:
        waves += [(-0.30 * d * ones, 0.07 * d, 0.07 * d, q_dir, p["q_amp_mv"] * resp),
                  (0.0 * ones, 0.11 * d, 0.11 * d, r_dir, p["r_amp_mv"] * resp),
                  (0.30 * d * ones, 0.09 * d, 0.09 * d, s_dir, p["s_amp_mv"] * resp)]
    waves += [(t_peak, sig_up, sig_dn, t_dir, p["t_amp_mv"] * ones),
              (0.5 * (0.55 * d + t_peak - 1.5 * sig_up), 0.045 * ones, 0.045 * ones, st_dir, p["st_amp_mv"] * ones),
              (p_on + 0.040, 0.016, 0.016, p_ra_dir, p["p_amp_mv"] * ones),
              (p_on + 0.065, 0.016, 0.016, p_la_dir, p["p_amp_mv"] * p["p_la_frac"] * ones)]
    centres, sl, sr, vecs = [], [], [], []
    for offset, s_left, s_right, vec, amp in waves:
        centres.append(r_times + offset)
        sl.append(np.broadcast_to(s_left, r_times.shape))
        sr.append(np.broadcast_to(s_right, r_times.shape))
        vecs.append(np.outer(amp * gain, vec))
    return (np.concatenate(centres), np.concatenate(sl), np.concatenate(sr), np.concatenate(vecs))


def synthesize_ecg(p: dict, rng: np.random.Generator, hr_override: float | None = None):
    """Clean 12-lead ECG ``(12, 5000)`` in mV (before noise) and the simulated R-peak times (s)."""
    if hr_override is not None:
        p = dict(p, hr_target_bpm=float(hr_override))
    r_times = _rr_intervals(p, rng, -2.0, N_SAMPLES / FS + 2.0)
    centres, sl, sr, vecs = _beat_components(p, r_times, rng)
    keep = (centres > -0.5) & (centres < N_SAMPLES / FS + 0.5)
    centres, sl, sr, vecs = centres[keep], sl[keep], sr[keep], vecs[keep]
    # each component only within +-6 sigma of its centre (sparse sum via bincount)
    first = np.floor((centres - 6 * sl) * FS).astype(np.int64)
    width = int(np.ceil(6 * (sl + sr).max() * FS)) + 2
    idx = first[:, None] + np.arange(width)[None, :]                # (K, width)
    dt = idx / FS - centres[:, None]
    sig = np.where(dt < 0, sl[:, None], sr[:, None])
    gauss = np.exp(-0.5 * (dt / sig) ** 2)
    valid = (idx >= 0) & (idx < N_SAMPLES)
    flat_idx, flat_g = idx[valid], gauss[valid]
    comp = np.nonzero(valid)[0]
    vcg = np.stack([np.bincount(flat_idx, weights=flat_g * vecs[comp, d], minlength=N_SAMPLES) for d in range(3)])
    return LEAD_MATRIX @ vcg, r_times


def add_ecg_noise(clean: np.ndarray, p: dict, rng: np.random.Generator) -> np.ndarray:
    """Noise on the independently recorded leads (I, II, V1-V6); III, aVR, aVL, aVF derived from I, II."""
    t = np.arange(N_SAMPLES) / FS
    rec = clean[[0, 1, 6, 7, 8, 9, 10, 11]].copy()        # I, II, V1..V6
    n = rec.shape[0]
    white = rng.standard_normal((n, N_SAMPLES)) * p["noise_white_uv"] / 1000
    emg_raw = rng.standard_normal((n, N_SAMPLES + 1))
    emg = np.diff(emg_raw, axis=1) / math.sqrt(2) * p["noise_emg_uv"] / 1000
    emg *= (1 + 0.8 * np.sin(2 * np.pi * rng.uniform(0.05, 0.3) * t + rng.uniform(0, 2 * np.pi)))[None]
    amp = p["wander_mv"] * rng.uniform(0.4, 1.2, size=(n, 1))
    slow = rng.uniform(0.02, 0.08)
    wander = amp * (np.sin(2 * np.pi * p["resp_hz"] * t + rng.uniform(0, 2 * np.pi, size=(n, 1)))
                    + 0.6 * np.sin(2 * np.pi * slow * t + rng.uniform(0, 2 * np.pi, size=(n, 1))))
    mains = p["mains_uv"] / 1000 * rng.uniform(0.3, 1.0, size=(n, 1)) * np.sin(
        2 * np.pi * 50.0 * t + rng.uniform(0, 2 * np.pi, size=(n, 1)))
    rec = rec + white + emg + wander + mains
    lead_i, lead_ii = rec[0], rec[1]
    limb = np.stack([lead_i, lead_ii, lead_ii - lead_i, -(lead_i + lead_ii) / 2,
                     lead_i - lead_ii / 2, lead_ii - lead_i / 2])
    return np.concatenate([limb, rec[2:]])


# ----------------------------------------------------------------------------- delineation

def _tangent_crossing(curve: np.ndarray, idx: int, baseline: float, direction: int) -> float:
    """Where the tangent at ``idx`` (central slope) meets ``baseline``; direction +1 forward, -1 back."""
    slope = 0.5 * (curve[min(idx + 1, len(curve) - 1)] - curve[max(idx - 1, 0)])
    if abs(slope) < 1e-12:
        return float(idx)
    cross = idx + (baseline - curve[idx]) / slope
    return float(cross) if (cross - idx) * direction >= 0 else float(idx)


def delineate(ecg: np.ndarray, fs: float = FS) -> dict:
    """Fiducial points of a (clean) 12-lead ECG, in fractional samples; NaN where not measurable.

    - QRS peak: maximum of the spatial RMS near each QRS found on the spatial velocity
      (|d ecg / dt| over leads). R-peak (the fiducial, frame 0 of the cine): maximum of lead II
      within the QRS (parabolic refinement), the QRS peak where lead II has no R wave.
    - QRS onset / offset: ends of the run of spatial velocity above 5 % of its beat maximum
      around the R-peak (gaps shorter than 16 ms bridged).
    - T end: tangent method on the spatial RMS (steepest descent after the T peak -> baseline).
    - P onset: tangent method on the spatial RMS (steepest ascent before the P peak -> baseline).

    One long function on purpose: it defines the ground-truth intervals of every version-1 table
    (the measuring instrument), and stays as it was measured.
    """
    from scipy.signal import find_peaks

    ecg = np.asarray(ecg, dtype=np.float64)
    rms = np.sqrt(np.mean(ecg ** 2, axis=0))
    vel = np.sqrt(np.sum(np.diff(ecg, axis=1, prepend=ecg[:, :1]) ** 2, axis=0))
    ms = fs / 1000.0
    cand, _ = find_peaks(vel, height=0.35 * np.max(vel), distance=int(300 * ms))
    rpk, on, off, t_end, t_peak, p_on = [], [], [], [], [], []
    for c in cand:
        lo, hi = max(c - int(70 * ms), 0), min(c + int(70 * ms), len(rms) - 1)
        if lo == 0 or hi == len(rms) - 1:
            continue                                   # QRS cut by the record edge
        k = lo + int(np.argmax(rms[lo:hi + 1]))
        if rpk and k - rpk[-1] < 250 * ms:
            continue
        y0, y1, y2 = rms[k - 1], rms[k], rms[k + 1]
        den = y0 - 2 * y1 + y2
        rpk.append(k + (0.5 * (y0 - y2) / den if den < 0 else 0.0))
        seg_lo, seg_hi = max(k - int(150 * ms), 0), min(k + int(150 * ms), len(vel) - 1)
        seg = vel[seg_lo:seg_hi + 1]
        # the QRS: the run of high spatial velocity around the R-peak, bridging gaps < 16 ms
        hot = np.nonzero(seg >= 0.05 * np.max(seg))[0]
        groups = np.split(hot, np.nonzero(np.diff(hot) > int(16 * ms))[0] + 1)
        centre = k - seg_lo
        grp = min(groups, key=lambda g_: 0 if g_[0] <= centre <= g_[-1] else min(abs(g_[0] - centre),
                                                                               abs(g_[-1] - centre)))
        on.append(float(seg_lo + grp[0]) if grp[0] > 0 else np.nan)
        off.append(float(seg_lo + grp[-1]) if grp[-1] < len(seg) - 1 else np.nan)
    rpk = np.asarray(rpk)
    # The R-peak fiducial: top of the R wave in lead II (the rhythm lead, where an R-peak detector
    # such as ecgflowcmr.data.phase.detect_rpeaks looks) within the QRS; the spatial-RMS maximum
    # where lead II has no R wave (< 0.15 mV).
    lead2 = ecg[1]
    fid = []
    for k, a, b in zip(rpk, on, off):
        lo = int(a) if np.isfinite(a) else int(k - 60 * ms)
        hi = int(b) if np.isfinite(b) else int(k + 60 * ms)
        j = lo + int(np.argmax(lead2[lo:hi + 1]))
        if lead2[j] < 0.15 or not 0 < j < len(lead2) - 1:
            fid.append(float(k))
            continue
        y0, y1, y2 = lead2[j - 1], lead2[j], lead2[j + 1]
        den = y0 - 2 * y1 + y2
        fid.append(j + (0.5 * (y0 - y2) / den if den < 0 else 0.0))
    rr_med = float(np.median(np.diff(rpk))) if len(rpk) > 1 else 0.8 * fs
    for i, k in enumerate(rpk):
        ki = int(round(k))
        nxt = rpk[i + 1] if i + 1 < len(rpk) else ki + rr_med
        # T wave: max RMS between QRS offset + 60 ms and min(70 % of R-R, 0.5 s * sqrt(R-R / 1 s))
        start = int((off[i] if np.isfinite(off[i]) else ki + 60 * ms) + 60 * ms)
        rr_s = (nxt - ki) / fs
        stop = int(ki + min(0.7 * rr_s, 0.5 * math.sqrt(rr_s)) * fs)
        if stop >= len(rms) - 2 or stop <= start:
            t_end.append(np.nan)
            t_peak.append(np.nan)
        else:
            tp = start + int(np.argmax(rms[start:stop]))
            look = min(tp + int(250 * ms), len(rms) - 2)
            if look <= tp + 2:
                t_end.append(np.nan)
                t_peak.append(np.nan)
            else:
                slope = np.diff(rms[tp:look + 1])
                rising = np.nonzero(slope[1:] > 0)[0]          # stop where the descent ends (next wave)
                if len(rising):
                    slope = slope[:rising[0] + 1]
                steep = tp + int(np.argmin(slope))
                base = float(np.min(rms[tp:min(look + int(150 * ms), len(rms) - 1)]))
                t_end.append(_tangent_crossing(rms, steep, base, +1))
                t_peak.append(float(tp))
        # P wave: max RMS in [R - 350 ms, QRS onset - 10 ms]
        q_on = on[i] if np.isfinite(on[i]) else ki - 50 * ms
        start = int(ki - 350 * ms)
        stop = int(q_on - 10 * ms)
        if i > 0 and np.isfinite(t_end[i - 1]):
            start = max(start, int(t_end[i - 1] + 20 * ms))
        if start < 2 or stop <= start + 2:
            p_on.append(np.nan)
            continue
        pp = start + int(np.argmax(rms[start:stop]))
        back = max(pp - int(80 * ms), start - int(40 * ms), 1)
        if pp - back < 2:
            p_on.append(np.nan)
            continue
        slope = np.diff(rms[back:pp + 1])
        steep = back + int(np.argmax(slope)) + 1
        base = float(np.min(rms[max(back - int(60 * ms), 0):pp + 1]))
        p_on.append(_tangent_crossing(rms, steep, base, -1))
    return {"rpeaks": np.asarray(fid, float), "qrs_peak": rpk.astype(float), "qrs_on": np.asarray(on, float),
            "qrs_off": np.asarray(off, float), "t_peak": np.asarray(t_peak, float),
            "t_end": np.asarray(t_end, float), "p_on": np.asarray(p_on, float)}


# ----------------------------------------------------------------------------- mechanics

def _betainc(a: float, b: float, x: np.ndarray) -> np.ndarray:
    from scipy.special import betainc

    return betainc(a, b, np.clip(x, 0.0, 1.0))


def cycle_timing(delin: dict, p: dict) -> dict:
    """Pick the cine beat and derive the mechanical events (ms after its R-peak) from the delineation."""
    r = delin["rpeaks"]
    rr = np.diff(r)
    ok = []
    for k in range(len(r) - 1):
        fine = all(np.isfinite(x) for x in (delin["qrs_on"][k], delin["t_end"][k], delin["p_on"][k + 1]))
        if fine and delin["t_end"][k] < r[k + 1]:
            ok.append(k)
    if not ok:
        raise RuntimeError("phantom: no complete cardiac cycle in the synthesised ECG")
    med = np.median(rr)
    k = min(ok, key=lambda j: (abs(rr[j] - med), j))
    ms = 1000.0 / FS
    rr_ms = rr[k] * ms
    qrs_on = (delin["qrs_on"][k] - r[k]) * ms            # negative
    # aortic valve closure ~ end of T, plus the subject's electromechanical offset (0 in version 1)
    es = (delin["t_end"][k] - r[k]) * ms + p.get("em_offset_ms", 0.0)
    p_next = (delin["p_on"][k + 1] - r[k]) * ms
    ej0 = max(qrs_on + p["ivc_ms"], 5.0)
    kick = min(p_next + p["atrial_delay_ms"], rr_ms - 60.0)
    ivr = p["ivr_ms"]
    rf0 = es + ivr
    if kick - rf0 < 60.0:                                 # very fast rates: squeeze relaxation first
        ivr = max(40.0, kick - 60.0 - es)
        rf0 = es + ivr
    rf = min(p["rapid_fill_ms"], kick - rf0)
    diast = max(kick - (rf0 + rf), 0.0)
    return {"beat": int(k), "r_sample": float(r[k]), "rr_ms": float(rr_ms), "qrs_on_ms": float(qrs_on),
            "ejection_start_ms": float(ej0), "es_ms": float(es), "ivr_ms": float(ivr),
            "rapid_fill_start_ms": float(rf0), "rapid_fill_ms": float(rf), "diastasis_ms": float(diast),
            "atrial_kick_start_ms": float(kick), "p_on_next_ms": float(p_next)}


def lv_area_fraction(t_ms: np.ndarray, tm: dict, p: dict) -> np.ndarray:
    """LV cavity area / ED area over one cycle (t in ms after the R-peak)."""
    t = np.asarray(t_ms, dtype=np.float64)
    ef = p["ef_area_target"]
    v = np.ones_like(t)
    ej = (t >= tm["ejection_start_ms"]) & (t < tm["es_ms"])
    u = (t - tm["ejection_start_ms"]) / (tm["es_ms"] - tm["ejection_start_ms"])
    # ejection flow ~ u^0.6 (1-u)^0.8: peaks in the first ~40 %, still flowing at valve closure
    v = np.where(ej, 1.0 - ef * _betainc(1.6, 1.8, u), v)
    d_share = min(p["diastasis_frac_per_s"] * tm["diastasis_ms"] / 1000.0, 0.15)
    e_share = p["e_frac"]
    rise = p["ivr_rise"]
    a_share = max(1.0 - rise - e_share - d_share, 0.08)
    e_share = 1.0 - rise - d_share - a_share
    es, rf0, rf = tm["es_ms"], tm["rapid_fill_start_ms"], tm["rapid_fill_ms"]
    kick = tm["atrial_kick_start_ms"]
    rr = tm["rr_ms"]
    filled = np.zeros_like(t)
    filled += rise * np.clip((t - es) / max(rf0 - es, 1e-6), 0, 1)
    uf = np.clip((t - rf0) / max(rf, 1e-6), 0, 1)
    filled += e_share * (1 - (1 - uf) ** 2.2)
    filled += d_share * np.clip((t - rf0 - rf) / max(kick - rf0 - rf, 1e-6), 0, 1)
    ua = np.clip((t - kick) / max(rr - kick, 1e-6), 0, 1)
    filled += a_share * 0.5 * (1 - np.cos(np.pi * ua))
    v = np.where(t >= es, 1.0 - ef + ef * filled, v)
    return v


# ----------------------------------------------------------------------------- geometry + rendering

def _wave_field(rng: np.random.Generator, n_waves: int, lam_lo: float, lam_hi: float):
    """A smooth random field f(x, y) (mm) as a sum of random plane waves, ~unit variance."""
    k = 2 * np.pi / rng.uniform(lam_lo, lam_hi, size=n_waves)
    ang = rng.uniform(0, 2 * np.pi, size=n_waves)
    ph = rng.uniform(0, 2 * np.pi, size=n_waves)
    kx, ky = k * np.cos(ang), k * np.sin(ang)
    scale = math.sqrt(2.0 / n_waves)

    def field(x, y):
        out = np.zeros(np.broadcast_shapes(np.shape(x), np.shape(y)), dtype=np.float32)
        for i in range(n_waves):
            out += np.cos(kx[i] * x + ky[i] * y + ph[i]).astype(np.float32)
        return out * scale
    return field


def _trunc_ellipse(u, v, base, length, half_width, centre_v):
    """Inside of a ventricle: ellipse cut at u = base, apex at u = base + length. Broadcasts."""
    semi = length / (1 + TRUNC)
    cu = base + TRUNC * semi
    q = u - cu
    q *= 1.0 / semi
    np.square(q, out=q)
    w = v - centre_v
    w *= 1.0 / half_width
    np.square(w, out=w)
    q += w
    inside = q <= 1.0
    inside &= u >= base
    return inside


def heart_geometry(p: dict, vol: np.ndarray) -> dict:
    """Per-frame shape parameters (mm, heart frame) from the LV area fraction ``vol`` (T,)."""
    sc = p["heart_scale"]
    ef = p["ef_area_target"]
    s = np.clip((1.0 - vol) / ef, 0.0, 1.0)                  # 0 at ED, 1 at ES
    L_ed = p["lv_length_mm"] * sc
    b_ed = p["lv_halfwidth_mm"] * sc
    sept_ed, lat_ed, apex = p["septum_mm"], p["lateral_mm"], p["apex_mm"]
    area_ed = L_ed / (1 + TRUNC) * b_ed * _F_TRUNC
    w_ed = 0.5 * (sept_ed + lat_ed)
    area_epi_ed = (L_ed + apex) / (1 + TRUNC) * (b_ed + w_ed) * _F_TRUNC
    myo = area_epi_ed - area_ed
    base = p["mapse_mm"] * s
    L = L_ed - base
    area = area_ed * vol
    b = area / (L / (1 + TRUNC) * _F_TRUNC)
    L_epi = L + apex
    b_epi = (area + myo) / (L_epi / (1 + TRUNC) * _F_TRUNC)
    w = b_epi - b
    sept = w * sept_ed / w_ed
    lat = w * lat_ed / w_ed
    c_lv = np.full_like(vol, b_ed)                            # cavity centre: septal surface at v = 0 at ED
    c_epi = c_lv + 0.5 * (lat - sept)
    v_sept_epi = c_lv - b - sept
    # RV
    base_rv = p["tv_offset_mm"] + p["tapse_mm"] * s
    apex_rv = p["rv_length_frac"] * (L_ed + apex)
    L_rv = apex_rv - base_rv
    L_rv_ed = apex_rv - p["tv_offset_mm"]
    b_rv_ed = p["rv_halfwidth_mm"] * sc
    area_rv = L_rv_ed * b_rv_ed * (1.0 - p["rv_ef_area"] * s)
    b_rv = area_rv / L_rv
    c_rv = v_sept_epi - b_rv * (1 - p["rv_overlap"])
    # atria (area anti-phase to the ventricles)
    la_area = p["la_min_area_mm2"] * sc ** 2 + p["la_reservoir"] * (area_ed - area)
    ra_area = p["ra_min_area_mm2"] * sc ** 2 + p["ra_reservoir"] * (area_ed - area) * 0.8
    la_a = np.sqrt(la_area / (np.pi * p["la_aspect"]))
    ra_a = np.sqrt(ra_area / (np.pi * p["ra_aspect"]))
    v_ias = b_ed - b_ed - sept_ed / 2                          # interatrial septum continues the IVS
    return {"base": base, "L": L, "b": b, "c_lv": c_lv, "L_epi": L_epi, "b_epi": b_epi, "c_epi": c_epi,
            "sept": sept, "lat": lat, "base_rv": base_rv, "L_rv": L_rv, "b_rv": b_rv, "c_rv": c_rv,
            "la_a": la_a, "la_b": la_a * p["la_aspect"], "ra_a": ra_a, "ra_b": ra_a * p["ra_aspect"],
            "v_ias": v_ias, "lv_area_mm2": area}


def _col(x):
    return np.asarray(x, dtype=np.float32)[:, None, None]


def _ellipse(u, v, cu, cv, a, b):
    """Inside of an axis-aligned ellipse in (u, v); broadcasts, few temporaries."""
    q = u - cu
    q *= 1.0 / a
    np.square(q, out=q)
    w = v - cv
    w *= 1.0 / b
    np.square(w, out=w)
    q += w
    return q <= 1.0


GAP_MM, IAS_MM, ATRIAL_WALL_MM = 3.0, 3.0, 2.0   # AV-plane gap, interatrial septum, atrial wall


def image_plane(p: dict, shape=IMAGE_SHAPE):
    """Pixel centres (mm) of the image in the phantom's plane: x ``(1, W)`` along columns, y ``(H, 1)``
    along rows, origin at the image centre."""
    H, W = shape
    px = p["pixel_mm"]
    y = ((np.arange(H) - (H - 1) / 2) * px).astype(np.float32)[:, None]
    x = ((np.arange(W) - (W - 1) / 2) * px).astype(np.float32)[None, :]
    return x, y


def heart_frame(p: dict, x, y):
    """Long-axis unit vectors ``eu``, ``ev`` (in x, y), and the heart coordinates U, V (mm) of every
    pixel ``(H, W)`` (u: base -> apex from the crux, v: towards the LV lateral wall)."""
    th = math.radians(p["theta_deg"])
    eu = np.array([math.cos(th), math.sin(th)])               # long axis (x, y) in the image
    ev = np.array([-eu[1], eu[0]])                            # towards the LV lateral wall
    # the crux sits so that the heart (~ u in [-60, 100], v in [-45, 60]) is near the FOV centre
    centre = np.array([p["offset_x_mm"], p["offset_y_mm"]]) - 20 * eu - 8 * ev
    xr, yr = x - centre[0], y - centre[1]
    U = (xr * eu[0] + yr * eu[1]).astype(np.float32)
    V = (xr * ev[0] + yr * ev[1]).astype(np.float32)
    return eu, ev, U, V


def heart_box(p: dict, geo: dict, U: np.ndarray, V: np.ndarray) -> tuple[slice, slice]:
    """Rows and columns of the pixels that can hold the heart in any frame (with margins): the
    per-frame work is done only there."""
    fat_max = 2.0 * p["fat_mm"]
    rw = p["rv_wall_mm"]
    a_max = max(float(geo["la_a"].max()), float(geo["ra_a"].max()))
    u_lo = -(2 * a_max + GAP_MM + ATRIAL_WALL_MM + 4)
    u_hi = p["lv_length_mm"] * p["heart_scale"] + p["apex_mm"] + fat_max + 4
    v_lo = min(float((geo["c_rv"] - geo["b_rv"]).min()) - rw - fat_max,
               geo["v_ias"] - IAS_MM / 2 - 1.85 * float(geo["ra_b"].max()) - ATRIAL_WALL_MM) - 4
    v_hi = max(float((geo["c_epi"] + geo["b_epi"]).max()) + fat_max,
               geo["v_ias"] + IAS_MM / 2 + 1.85 * float(geo["la_b"].max()) + ATRIAL_WALL_MM) + 4
    inside = (U >= u_lo) & (U <= u_hi) & (V >= v_lo) & (V <= v_hi)
    rows, cols = np.nonzero(inside.any(axis=1))[0], np.nonzero(inside.any(axis=0))[0]
    H, W = inside.shape
    return (slice(max(int(rows.min()) - 1, 0), min(int(rows.max()) + 2, H)),
            slice(max(int(cols.min()) - 1, 0), min(int(cols.max()) + 2, W)))


def heart_labels(p: dict, g: dict, u: np.ndarray, v: np.ndarray, joined_atria: bool = False) -> dict:
    """Labels ``(T, h, w)`` uint8 (``MASK_LABELS``) and the masks the image needs, from the per-frame
    geometry ``g`` (columns ``(T, 1, 1)``) at heart coordinates ``u``, ``v`` ``(1, h, w)``.

    ``joined_atria``: the atria are ellipses cut at the AV plane, wide open onto their ventricle;
    otherwise whole ellipses a small gap above it."""
    rw = p["rv_wall_mm"]
    lv_cav = _trunc_ellipse(u, v, g["base"], g["L"], g["b"], g["c_lv"])
    lv_epi = _trunc_ellipse(u, v, g["base"], g["L_epi"], g["b_epi"], g["c_epi"])
    rv_cav = _trunc_ellipse(u, v, g["base_rv"], g["L_rv"], g["b_rv"], g["c_rv"])
    rv_cav &= ~lv_epi
    rv_epi = _trunc_ellipse(u, v, g["base_rv"], g["L_rv"] + rw, g["b_rv"] + rw, g["c_rv"])
    rv_epi &= ~lv_epi
    v_ias = g["v_ias"]
    gap, ias, wall = (0.0 if joined_atria else GAP_MM), IAS_MM, ATRIAL_WALL_MM

    def atrium(top, a, b, side):
        # joined: the ellipse's centre lies TRUNC * a above the AV plane, so the cut is wide
        cu = top - gap - (TRUNC * a if joined_atria else a)
        cv = v_ias + side * (ias / 2 + 0.85 * b)
        inner = _ellipse(u, v, cu, cv, a, b)
        inner &= u <= top - gap
        inner &= side * (v - v_ias) >= ias / 2
        outer = _ellipse(u, v, cu, cv, a + wall, b + wall)
        outer &= u <= top - gap + wall
        return inner, outer

    la, la_wall = atrium(g["base"], g["la_a"], g["la_b"], +1)
    ra, ra_wall = atrium(g["base_rv"], g["ra_a"], g["ra_b"], -1)
    la &= ~rv_epi
    ra &= ~lv_epi
    if joined_atria:                       # the ventricles' walls end at the AV plane
        la &= ~lv_cav
        ra &= ~rv_cav
    heart = lv_epi | rv_epi
    walls = (la_wall | ra_wall) & ~heart
    heart |= walls
    lab = np.zeros(lv_cav.shape, dtype=np.uint8)
    lab[lv_epi | rv_epi] = 5
    lab[lv_cav] = 1
    lab[rv_cav] = 2
    lab[la] = 3
    lab[ra] = 4
    return {"lab": lab, "heart": heart, "walls": walls, "lv_cav": lv_cav}


def _blend(img_, weight, value):
    return img_ + weight * (value - img_)


def _soft(q, edge):      # q: normalised radius (1 on the boundary) -> weight 1 inside, 0 outside
    return np.clip((1.0 - q) / edge, 0.0, 1.0)


def texture_fields(tex: np.random.Generator) -> dict:
    """The subject's smooth random fields (drawn in this order from ``tex``): tissue, fine, fat, blood."""
    return {"tissue": _wave_field(tex, 12, 12, 60), "fine": _wave_field(tex, 12, 5, 14),
            "fat": _wave_field(tex, 8, 20, 50), "blood": _wave_field(tex, 16, 8, 30)}


def surroundings(p: dict, geo: dict, tex: np.random.Generator, fields: dict, x, y, U, V, ev) -> dict:
    """Static image ``(H, W)`` float32 outside the heart: body with subcutaneous fat, lungs, liver,
    descending aorta; and the weight maps of fat and lung ``(H, W)`` (1 inside)."""
    fine_xy = fields["fine"](x, y)
    body_ax = tex.uniform(150, 185), tex.uniform(115, 135)
    body_c = tex.uniform(-15, 15, size=2)
    body_r = np.sqrt(((x - body_c[0]) / body_ax[0]) ** 2 + ((y - body_c[1]) / body_ax[1]) ** 2)
    img0 = p["tissue_intensity"] * (1 + 0.12 * fields["tissue"](x, y) + 0.05 * fine_xy)
    fat_w = 14.0 / body_ax[1]
    body_fat = 1 - _soft(body_r / (1 - fat_w), 0.03)
    img0 = _blend(img0, body_fat, p["fat_intensity"] * (1 + 0.06 * fine_xy))
    img0 = img0 * _soft(body_r, 0.015)
    lv_w = geo["b"][0] * 2 + p["lateral_mm"]
    lung_w = np.zeros_like(img0)
    for cu_, cv_, au, av in ((30 + tex.uniform(-10, 10), lv_w + 40 + tex.uniform(0, 15), 75, 38),
                             (-5 + tex.uniform(-10, 10), -(p["septum_mm"] + 2 * p["rv_halfwidth_mm"] + 42
                                                             + tex.uniform(0, 15)), 70, 36)):
        q = np.sqrt(((U - cu_) / au) ** 2 + ((V - cv_) / av) ** 2)
        lung_w = np.maximum(lung_w, _soft(q, 0.08))
    lung_w *= _soft(body_r / 0.93, 0.03)
    img0 = _blend(img0, lung_w, p["lung_intensity"] * (1 + 0.3 * fine_xy))
    liver_c = -40 - 30 * ev[0] + tex.uniform(-10, 10), 75 + tex.uniform(-10, 10)
    liver_w = _soft(np.sqrt(((x - liver_c[0]) / 70) ** 2 + ((y - liver_c[1]) / 45) ** 2), 0.06) \
        * _soft(body_r / 0.93, 0.03) * (1 - lung_w)
    img0 = _blend(img0, liver_w, 1.15 * p["tissue_intensity"] * (1 + 0.05 * fields["tissue"](x, y)))
    ao_u = -(2 * float(np.max(geo["la_a"])) + GAP_MM + 16 + tex.uniform(0, 6))
    ao_v = geo["v_ias"] + 0.6 * float(np.max(geo["la_b"]))
    ao_r = tex.uniform(9, 13)
    ao_q = np.sqrt((U - ao_u) ** 2 + (V - ao_v) ** 2)
    img0 = _blend(img0, _soft(ao_q / (ao_r + 2), 0.1), p["myo_intensity"])
    img0 = _blend(img0, _soft(ao_q / ao_r, 0.1), 0.9 * p["blood_intensity"]).astype(np.float32)
    return {"img": img0, "body_fat": body_fat * _soft(body_r, 0.015), "lung": lung_w}


def fat_band(p: dict, g: dict, u, v, heart: np.ndarray, f_fat) -> np.ndarray:
    """Epicardial fat ``(T, h, w)`` bool: a band of varying thickness, thicker in the AV groove."""
    rw = p["rv_wall_mm"]
    groove = np.exp(-((u + 2) / 14) ** 2)
    fat_local = p["fat_mm"] * np.clip(0.45 + 0.6 * f_fat(u, v) + 0.8 * groove, 0, 2.0)
    band = _trunc_ellipse(u, v, g["base"] - 4, g["L_epi"] + 4 + fat_local, g["b_epi"] + fat_local, g["c_epi"])
    band |= _trunc_ellipse(u, v, g["base_rv"] - 4, g["L_rv"] + rw + 4 + fat_local,
                           g["b_rv"] + rw + fat_local, g["c_rv"])
    band &= ~heart
    return band


def tissue_maps(p: dict, fields: dict, u, v, background: np.ndarray, blood_tex: float = 0.03) -> np.ndarray:
    """Intensity of each tissue code at every pixel of the heart box ``(8, h, w)`` float32: 0 the
    static background, 1 LV, 2 RV, 3 LA, 4 RA, 5 myocardium, 6 epicardial fat, 7 atrial wall.
    ``blood_tex``: relative amplitude of the blood pools' smooth inhomogeneity."""
    fine_uv = fields["fine"](u, v)[0]
    blood = p["blood_intensity"] * (1 + blood_tex * fields["blood"](u, v)[0])
    return np.stack([background, blood, 0.95 * blood, 0.97 * blood, 0.97 * blood,
                     p["myo_intensity"] * (1 + 0.06 * fine_uv), p["fat_intensity"] * (1 + 0.05 * fine_uv),
                     np.full_like(blood, 1.1 * p["myo_intensity"])]).astype(np.float32)


def lookup(code: np.ndarray, maps: np.ndarray) -> np.ndarray:
    """Per-pixel intensity ``(T, h, w)`` from tissue codes ``(T, h, w)`` and maps ``(K, h, w)``."""
    hh, ww = code.shape[1:]
    flat = code.astype(np.intp) * (hh * ww) + np.arange(hh * ww).reshape(1, hh, ww)
    return maps.reshape(-1)[flat]


def acquire(img: np.ndarray, p: dict, x, y) -> np.ndarray:
    """Point-spread blur, coil shading and Rician noise on ``(T, H, W)`` float32 -> int16 (in place)."""
    from scipy.ndimage import gaussian_filter

    img = gaussian_filter(img, sigma=(0, p["psf_sigma_px"], p["psf_sigma_px"]))
    ca = math.radians(p["coil_angle_deg"])
    cx, cy = 140 * math.cos(ca), 140 * math.sin(ca)
    coil = 1 + p["coil_strength"] * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * 110.0 ** 2)) \
        - 0.5 * p["coil_strength"]
    img *= coil.astype(np.float32)
    noise_rng = np.random.default_rng([p["texture_seed"], 7])
    n1 = noise_rng.standard_normal(img.shape, dtype=np.float32)
    n1 *= p["noise_sigma"]
    img += n1
    np.square(img, out=img)
    noise_rng.standard_normal(img.shape, dtype=np.float32, out=n1)
    n1 *= p["noise_sigma"]
    np.square(n1, out=n1)
    img += n1
    np.sqrt(img, out=img)
    np.rint(img, out=img)
    np.clip(img, 0, 4095, out=img)
    return img.astype(np.int16)


def frame_columns(geo: dict) -> dict:
    """The geometry with per-frame arrays as ``(T, 1, 1)`` columns (scalars kept)."""
    return {k: _col(val) if np.ndim(val) else val for k, val in geo.items()}


def render(p: dict, geo: dict, timing: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Cine intensities ``(T, H, W)`` int16 and labels ``(T, H, W)`` uint8 from the geometry
    (``timing``, the cycle's events, is not needed here)."""
    H, W = IMAGE_SHAPE
    T = len(geo["b"])
    tex = np.random.default_rng(p["texture_seed"])
    x, y = image_plane(p)
    eu, ev, U, V = heart_frame(p, x, y)
    rows, cols = heart_box(p, geo, U, V)
    u, v = U[None, rows, cols], V[None, rows, cols]
    g = frame_columns(geo)
    parts = heart_labels(p, g, u, v)
    lab = parts["lab"]
    fields = texture_fields(tex)
    img0 = surroundings(p, geo, tex, fields, x, y, U, V, ev)["img"]
    # compose by lookup: code per pixel -> value map per code (static maps in the heart frame)
    code = lab.copy()                                   # 0 bg, 1 LV, 2 RV, 3 LA, 4 RA, 5 myo
    code[fat_band(p, g, u, v, parts["heart"], fields["fat"])] = 6
    code[parts["walls"] & (lab == 0)] = 7
    img = np.empty((T, H, W), dtype=np.float32)
    img[:] = img0
    img[:, rows, cols] = lookup(code, tissue_maps(p, fields, u, v, img0[rows, cols]))
    labels = np.zeros((T, H, W), dtype=np.uint8)
    labels[:, rows, cols] = lab
    return acquire(img, p, x, y), labels


def wall_thickness_ed(geo: dict) -> tuple[float, float]:
    """Septal and lateral wall thickness (mm) at ED at the widest level of the cavity."""
    return float(geo["sept"][0]), float(geo["lat"][0])


# ----------------------------------------------------------------------------- one subject

def simulate(seed: int, index: int) -> dict:
    """Everything about one subject in memory (no files): params, ECGs, delineation, cine, masks."""
    return simulate_params(sample_params(seed, index), render)


def simulate_params(p: dict, render_fn) -> dict:
    """``simulate`` from given parameters ``p`` (seed and index in it), cine drawn by
    ``render_fn(p, geometry, timing)``."""
    seed, index = p["seed"], p["index"]
    streams = np.random.SeedSequence([seed, index, 1]).spawn(4)
    rng_rhythm = np.random.default_rng(streams[2])
    rng_noise = np.random.default_rng(streams[3])
    clean, r_sim = synthesize_ecg(p, rng_rhythm)
    delin = delineate(clean)
    noisy = add_ecg_noise(clean, p, rng_noise)
    tm = cycle_timing(delin, p)
    t_frames = np.arange(N_FRAMES) * tm["rr_ms"] / N_FRAMES
    vol = lv_area_fraction(t_frames, tm, p)
    geo = heart_geometry(p, vol)
    cine, masks = render_fn(p, geo, tm)
    return {"params": p, "clean": clean, "ecg": noisy, "delineation": delin, "timing": tm,
            "t_frames_ms": t_frames, "lv_area_fraction": vol, "geometry": geo, "cine": cine, "masks": masks}


def _median_or(values: np.ndarray, fallback: float) -> float:
    """Median of the finite ``values``; ``fallback`` when none is finite."""
    finite = np.asarray(values, float)[np.isfinite(values)]
    return float(np.median(finite)) if len(finite) else float(fallback)


def ground_truth(sim: dict) -> dict:
    """The per-subject truth written to truth/<id>.json (and the manifest's columns)."""
    p, tm, d = sim["params"], sim["timing"], sim["delineation"]
    ms = 1000.0 / FS
    r = d["rpeaks"]
    rr = np.diff(r) * ms
    qt = (d["t_end"] - d["qrs_on"]) * ms
    qrs = (d["qrs_off"] - d["qrs_on"]) * ms
    pr = (d["qrs_on"] - d["p_on"]) * ms
    masks = sim["masks"]
    px_area = p["pixel_mm"] ** 2
    counts = np.stack([(masks == lab).reshape(N_FRAMES, -1).sum(1) for lab in range(1, 6)])   # (5, T)
    lv = counts[0].astype(float)
    # ES frame: the frame where the model LV area is smallest (one of the two frames around the
    # ES time = delineated T end); what an argmin over the mask areas measures, without pixel noise
    es_frame = int(np.argmin(sim["lv_area_fraction"]))
    sept, lat = wall_thickness_ed(sim["geometry"])
    rr_med = float(np.median(rr))
    # no measurable T end in any beat (a flat T): the simulated QT (Bazett at the median R-R) is the truth
    qt_med = _median_or(qt, p["qtc_target_ms"] * math.sqrt(rr_med / 1000))
    truth = {
        "subject_id": subject_id(p["index"]), "class": p["class"],
        "hr_bpm": 60000.0 / rr_med, "rr_ms": rr_med, "qt_ms": qt_med, "qtc_ms": qt_med / math.sqrt(rr_med / 1000),
        # a wide QRS whose ST segment stays steep can leave every beat's QRS offset (or P onset)
        # unmeasurable by the delineator: the simulated interval is then the truth
        "qrs_ms": _median_or(qrs, p["qrs_target_ms"]), "pr_ms": _median_or(pr, p["pr_ms"]),
        "cine_rpeak_sample": int(round(tm["r_sample"])), "cine_rr_ms": tm["rr_ms"],
        "cine_qt_ms": (tm["es_ms"] - tm["qrs_on_ms"]),
        "es_time_ms": tm["es_ms"], "es_frame": es_frame,
        # areas from the masks: ED = frame 0, ES = the smallest LV area (as metrics/functional.py measures)
        "lv_ed_area_px": int(lv[0]), "lv_es_area_px": int(lv.min()),
        "lv_ed_area_mm2": lv[0] * px_area, "lv_es_area_mm2": lv.min() * px_area,
        "ef_area": 100.0 * (lv[0] - lv.min()) / lv[0],
        "rv_ed_area_mm2": float(counts[1, 0]) * px_area,
        "la_max_area_mm2": float(counts[2].max()) * px_area, "ra_max_area_mm2": float(counts[3].max()) * px_area,
        "wall_thickness_mm": sept, "lateral_wall_mm": lat,
        "pixel_mm": p["pixel_mm"], "frame_ms": tm["rr_ms"] / N_FRAMES,
    }
    anatomy_keys = ("heart_scale", "theta_deg", "offset_x_mm", "offset_y_mm", "rv_halfwidth_mm", "rv_length_frac",
                    "rv_wall_mm", "tv_offset_mm", "la_min_area_mm2", "la_aspect", "ra_min_area_mm2", "ra_aspect",
                    "fat_mm", "blood_intensity", "myo_intensity", "tissue_intensity", "noise_sigma",
                    "coil_angle_deg", "coil_strength", "psf_sigma_px", "texture_seed")
    for key in anatomy_keys:
        truth[key] = p[key]
    return {
        "manifest": truth,
        "params": p,
        "timing": tm,
        "delineation_samples": {k: [None if not np.isfinite(x) else round(float(x), 3) for x in v]
                                for k, v in d.items()},
        "lv_area_px": [int(x) for x in lv],
        "rv_area_px": [int(x) for x in counts[1]], "la_area_px": [int(x) for x in counts[2]],
        "ra_area_px": [int(x) for x in counts[3]], "myo_area_px": [int(x) for x in counts[4]],
        "lv_area_fraction_model": [round(float(x), 6) for x in sim["lv_area_fraction"]],
        "t_frames_ms": [round(float(x), 3) for x in sim["t_frames_ms"]],
    }


# ----------------------------------------------------------------------------- writers

def _samples_text(values: np.ndarray, per_line: int = 25) -> str:
    vals = [str(v) for v in np.asarray(values, dtype=np.int64).tolist()]
    lines = [",".join(vals[i:i + per_line]) for i in range(0, len(vals), per_line)]
    return "\n" + ",\n".join(lines) + "\n"


def _median_beats(ecg_mv: np.ndarray, rpeaks: np.ndarray) -> np.ndarray:
    idx = [int(round(r)) for r in rpeaks if r - MEDIAN_PRE >= 0 and r + MEDIAN_POST <= ecg_mv.shape[1]]
    if not idx:
        return np.zeros((12, MEDIAN_PRE + MEDIAN_POST))
    beats = np.stack([ecg_mv[:, i - MEDIAN_PRE:i + MEDIAN_POST] for i in idx])
    med = np.median(beats, axis=0)
    return med - np.median(med[:, :MEDIAN_PRE - 60], axis=1, keepdims=True)


def write_ecg_xml(path: Path, ecg_mv: np.ndarray, m: dict, delin: dict, axes: dict) -> None:
    """UK Biobank CardioSoft-style XML (root CardiologyXML, StripData + MedianSamples).

    ``ecg_mv`` (12, 5000) in mV, lead order ``LEADS``; ``m`` the manifest row (measurements);
    ``delin`` the delineation (R-peaks); ``axes`` P/R/T axes in degrees.
    """
    to_lsb = 1000.0 / RESOLUTION_UV
    strip = np.rint(ecg_mv * to_lsb).astype(np.int64)
    median = np.rint(_median_beats(ecg_mv, delin["rpeaks"]) * to_lsb).astype(np.int64)
    ms = 1000.0 / FS
    parts = ['<?xml version="1.0" encoding="ISO-8859-1"?>',
             '<!DOCTYPE CardiologyXML SYSTEM "CardiologyXML.dtd">',
             "<CardiologyXML>",
             "\t<ObservationType>RestECG</ObservationType>",
             "\t<ObservationDateTime><Hour>9</Hour><Minute>0</Minute><Second>0</Second>"
             "<Day>1</Day><Month>1</Month><Year>2020</Year></ObservationDateTime>",
             f"\t<PatientInfo><PID>{m['subject_id']}</PID><Name>phantom</Name></PatientInfo>",
             "\t<RestingECGMeasurements>",
             "\t\t<DiagnosisVersion>ecgflowcmr-phantom</DiagnosisVersion>",
             f"\t\t<VentricularRate units=\"BPM\">{round(m['hr_bpm'])}</VentricularRate>",
             f"\t\t<PQInterval units=\"ms\">{round(m['pr_ms'])}</PQInterval>",
             f"\t\t<QRSDuration units=\"ms\">{round(m['qrs_ms'])}</QRSDuration>",
             f"\t\t<QTInterval units=\"ms\">{round(m['qt_ms'])}</QTInterval>",
             f"\t\t<QTCInterval units=\"ms\">{round(m['qtc_ms'])}</QTCInterval>",
             f"\t\t<RRInterval units=\"ms\">{round(m['rr_ms'])}</RRInterval>"]
    for name in ("PAxis", "RAxis", "TAxis"):
        if name in axes:
            parts.append(f"\t\t<{name} units=\"degrees\">{round(axes[name])}</{name}>")
    parts.append(f"\t\t<QRSNum>{len(delin['rpeaks'])}</QRSNum>")
    parts += ["\t\t<MedianSamples>",
              "\t\t\t<NumberOfLeads>12</NumberOfLeads>",
              f"\t\t\t<SampleRate units=\"Hz\">{FS}</SampleRate>",
              f"\t\t\t<ChannelSampleCountTotal>{median.shape[1]}</ChannelSampleCountTotal>",
              f"\t\t\t<Resolution units=\"uVperLsb\">{RESOLUTION_UV}</Resolution>",
              "\t\t\t<FirstValid units=\"ms\">0</FirstValid>",
              f"\t\t\t<LastValid units=\"ms\">{round((median.shape[1] - 1) * ms)}</LastValid>"]
    for lead, row in zip(LEADS, median):
        parts.append(f"\t\t\t<WaveformData lead=\"{lead}\">{_samples_text(row)}\t\t\t</WaveformData>")
    parts += ["\t\t</MedianSamples>", "\t</RestingECGMeasurements>", "\t<QRSTimesTypes>"]
    for r in delin["rpeaks"]:
        parts.append(f"\t\t<QRS><Time units=\"ms\">{round(r * ms)}</Time><Type>0</Type></QRS>")
    parts += ["\t</QRSTimesTypes>",
              "\t<StripData>",
              "\t\t<NumberOfLeads>12</NumberOfLeads>",
              f"\t\t<SampleRate units=\"Hz\">{FS}</SampleRate>",
              f"\t\t<ChannelSampleCountTotal>{strip.shape[1]}</ChannelSampleCountTotal>",
              f"\t\t<Resolution units=\"uVperLsb\">{RESOLUTION_UV}</Resolution>"]
    for lead, row in zip(LEADS, strip):
        parts.append(f"\t\t<WaveformData lead=\"{lead}\">{_samples_text(row)}\t\t</WaveformData>")
    parts += ["\t</StripData>", "</CardiologyXML>", ""]
    atomic_write_bytes(path, "\n".join(parts).encode("ascii"))


def nifti_affine(p: dict, shape=IMAGE_SHAPE) -> np.ndarray:
    """Voxel (i, j, k) -> scanner mm: an oblique four-chamber plane with the subject's pixel spacing."""
    jx, jy, jz = (math.radians(a) for a in p["plane_jitter_deg"])
    base = np.array([[0.60, -0.75, 0.28], [0.55, 0.62, 0.56], [-0.58, -0.23, 0.78]])   # rows: e_i, e_j, normal
    q, _ = np.linalg.qr(base.T)
    rot = q * np.sign(np.diag(_))                                                         # columns orthonormal

    def rx(a):
        return np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])

    def rz(a):
        return np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])

    rot = rz(jz) @ rx(jx) @ rz(jy) @ rot
    H, W = shape
    px = p["pixel_mm"]
    aff = np.eye(4)
    aff[:3, 0] = rot[:, 0] * px
    aff[:3, 1] = rot[:, 1] * px
    aff[:3, 2] = rot[:, 2] * SLICE_MM
    centre = np.asarray(p["scanner_center_mm"])
    aff[:3, 3] = centre - aff[:3, 0] * (H - 1) / 2 - aff[:3, 1] * (W - 1) / 2
    return aff


def write_nifti(path: Path, frames: np.ndarray, p: dict, frame_ms: float) -> None:
    """``frames`` (T, H, W) -> NIfTI (H, W, 1, T) with the subject's affine; atomic."""
    import nibabel as nib

    data = np.ascontiguousarray(np.transpose(frames, (1, 2, 0))[:, :, None, :])
    img = nib.Nifti1Image(data, nifti_affine(p, frames.shape[1:]))
    img.header.set_xyzt_units("mm", "msec")
    zooms = img.header.get_zooms()
    img.header.set_zooms(tuple(zooms[:3]) + (float(frame_ms),))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    tmp = path.with_name(path.name[:-len(".nii.gz")] + ".tmp.nii.gz")
    nib.save(img, tmp)
    os.replace(tmp, path)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def frontal_axes(clean: np.ndarray, delin: dict) -> dict:
    """P, QRS and T axes (degrees) from net areas in leads I and aVF of the clean ECG."""
    out = {}
    spans = {"RAxis": (delin["qrs_on"], delin["qrs_off"]), "TAxis": (delin["qrs_off"], delin["t_end"]),
             "PAxis": (delin["p_on"], delin["qrs_on"])}
    for name, (a, b) in spans.items():
        i_area = f_area = 0.0
        for lo, hi in zip(a, b):
            if np.isfinite(lo) and np.isfinite(hi) and hi > lo:
                i_area += clean[0, int(lo):int(hi)].sum()
                f_area += clean[5, int(lo):int(hi)].sum()
        if i_area or f_area:
            out[name] = math.degrees(math.atan2(f_area, i_area))
    return out
