"""Phantom version 2: the version-1 phantom (``v1.py``) made to look and behave like a UK Biobank
four-chamber cine. Selected by ``data.phantom_version: 2`` or ``python -m ecgflowcmr.phantom
--version 2``; version 1 stays unchanged. ``docs/phantom_realism.md`` measures both against published
ranges (``benchmarks/phantom_realism.py``).

What changes (everything else, ECG model, delineation, LV area-curve shape, noise, is version 1's):

1. Coupling with scatter. Class prevalence is a parameter (default 80 % normal, 10 % dilated, 10 %
   hypertrophic), drawn per subject. ECG phenotypes overlap across classes: a bundle branch block
   (QRS >= 125 ms, drawn with the LBBB shape; it stands in for every wide-QRS conduction delay, 3-5 %
   of adults) in 4 % of normal, 30 % of dilated and 6 % of hypertrophic hearts; QTc,
   voltages and strain-pattern T waves shift with the class but spread across it; ventricular size,
   wall thickness and EF are drawn per class from overlapping normal distributions. End-systole is
   the delineated T end plus a per-subject electromechanical offset (aortic valve closure follows
   the T end by ~+12 +- 18 ms in normal hearts, ~-5 +- 22 ms in failing ones, where QT can exceed QS2).
2. Timing: heart rate ~ N(62, 9) bpm, QTc ~ N(410, 17) ms, so that ES falls at 0.35-0.40 of R-R;
   the atrial kick starts 40-80 ms after P onset (version 1: 90-130 ms).
3. EF drawn as a volume EF (normal ~ N(0.61, 0.055)) and turned into the area EF the 2-D model
   draws by the area-length method (V = 8 A^2 / (3 pi L)): ``area_ef_from_volume_ef``.
4. Layout: UK Biobank's matrix and field of view, 208 x 180 pixels of 1.827 mm (380 x 329 mm), and
   its in-plane orientation: version 1's scene mirrored (columns) and rotated by 200 degrees.
5. Anatomy: atria joined to their ventricles at the AV plane; an anterolateral papillary muscle and
   apical/lateral trabeculation in the LV (dark in the image, inside the LV label, as UK Biobank
   reference segmentations count them as blood pool).
6. Image: stronger blood-pool inhomogeneity, systolic signal loss of slow-flowing apical blood, dark
   chemical-shift lines at fat-water borders, slice partial volume (the 8 mm slice averaged over
   three sub-slices through the curved chambers), and a wider point-spread function (edge 10-90 %
   about 4 mm).
"""
from __future__ import annotations

import math

import numpy as np

from . import v1

GENERATOR_VERSION = 2
DEFAULT_PREVALENCE = (0.8, 0.1, 0.1)        # normal, dilated, hypertrophic
IMAGE_SHAPE = (208, 180)                    # UK Biobank long-axis matrix (rows, columns)
PIXEL_MM = 1.827
LAYOUT_ROTATION_DEG = 200.0                 # version 1's scene, mirrored, then rotated by this
SUB_SLICES_MM = (-2.7, 0.0, 2.7)            # through-plane positions averaged over the 8 mm slice


def subject_class(seed: int, index: int, prevalence=DEFAULT_PREVALENCE) -> str:
    """The class of one subject, drawn with the given shares; a pure function of (seed, index)."""
    draw = np.random.default_rng(np.random.SeedSequence([seed, index, 4])).uniform()
    cum = np.cumsum(np.asarray(prevalence, dtype=np.float64) / np.sum(prevalence))
    return v1.CLASSES[min(int(np.searchsorted(cum, draw, side="right")), len(v1.CLASSES) - 1)]


def area_ef_from_volume_ef(ef_volume, length_ed_mm, shortening_mm):
    """Area EF that gives ``ef_volume`` by the area-length method, V = 8 A^2 / (3 pi L), when the
    long axis shortens from ``length_ed_mm`` by ``shortening_mm`` (MAPSE): A_es / A_ed =
    sqrt((1 - EF_vol) * L_es / L_ed)."""
    ratio = (length_ed_mm - shortening_mm) / length_ed_mm
    return 1.0 - np.sqrt((1.0 - ef_volume) * ratio)


def volume_ef_from_area_ef(ef_area, length_ed_mm, length_es_mm):
    """The inverse: volume EF by the area-length method from area EF and the two long-axis lengths."""
    return 1.0 - (1.0 - ef_area) ** 2 * length_ed_mm / length_es_mm


def sample_params(seed: int, index: int, prevalence=DEFAULT_PREVALENCE) -> dict:
    """All parameters of one subject; a pure function of (seed, index, prevalence).

    Starts from version 1's draws for what does not depend on the class (noise, intensities,
    texture, orientation, ...) and redraws the rest from its own stream."""
    p = v1.sample_params(seed, index)
    cls = subject_class(seed, index, prevalence)
    k = v1.CLASSES.index(cls)
    q = np.random.default_rng(np.random.SeedSequence([seed, index, 5]))

    def by_class(n, d, h):
        return (n, d, h)[k]

    def normal(mean, sd, lo, hi):
        return float(np.clip(q.normal(mean, sd), lo, hi))

    p.update({"class": cls, "generator_version": GENERATOR_VERSION,
              "prevalence": [float(x) for x in prevalence]})
    # --- conduction and repolarisation: shifted by the class, overlapping across classes
    lbbb = bool(q.uniform() < by_class(0.04, 0.30, 0.06))
    p["lbbb"] = lbbb
    p["pr_ms"] = normal(160 + by_class(0, 12, 5), 20, 115, 240)
    if lbbb:
        p["qrs_target_ms"] = float(q.uniform(125, 165))
        p["rprime_frac"] = float(q.uniform(0.55, 0.9))
        p["q_amp_mv"] = float(q.uniform(0.0, 0.04))
        p["t_discordance"] = float(q.uniform(0.5, 0.8))
    else:
        p["qrs_target_ms"] = normal(92 + by_class(0, 10, 7), 9, 72, 118)
        p["rprime_frac"] = 0.0
        p["q_amp_mv"] = float(q.uniform(0.08, 0.25)) * by_class(1.0, 0.6, 1.3)
        strain = cls == "hypertrophic" and q.uniform() < 0.45
        p["t_discordance"] = float(q.uniform(0.6, 0.95) if strain else q.uniform(0.0, 0.2))
    p["qtc_target_ms"] = normal(410 + by_class(0, 16, 12) + (12 if lbbb else 0), 17, 360, 495)
    p["st_amp_mv"] = float(q.uniform(0.0, 0.04) + (0.08 if p["t_discordance"] > 0.5 else 0.0))
    p["axis_deg"] = normal(45 - by_class(0, 12, 10), 25, -30, 100)
    p["r_z"] = float(q.uniform(-0.5, -0.15)) - by_class(0.0, 0.12, 0.15)
    p["r_amp_mv"] = float(1.35 * np.exp(q.normal(0.0, 0.25))) * by_class(1.0, 0.85, 1.45)
    p["s_amp_mv"] = float(q.uniform(0.3, 0.6)) * by_class(1.0, 1.0, 1.5)
    p["t_amp_mv"] = float(q.uniform(0.2, 0.5)) * by_class(1.0, 0.8, 0.9)
    p["p_la_frac"] = float(q.uniform(0.7, 1.1)) + by_class(0.0, 0.3, 0.2) * float(q.uniform())
    # --- rhythm: resting rate of a UK Biobank imaging visit, capped where T end would meet the next P
    p["sdnn_frac"] = float(q.uniform(0.015, 0.05)) * by_class(1.0, 0.6, 0.85)
    p["hr_target_bpm"] = min(normal(62 + by_class(0, 5, -1), 9, 42, 105), v1.max_heart_rate(p))
    # --- mechanics
    p["em_offset_ms"] = normal(by_class(12, -5, 10), by_class(18, 22, 18), -60, 70)
    p["atrial_delay_ms"] = float(q.uniform(40, 80))
    p["ivr_ms"] = float(q.uniform(70, 90) + by_class(0, 0, 15))
    p["rapid_fill_ms"] = float(q.uniform(120, 170) + by_class(0, -30, 30))
    p["e_frac"] = float(q.uniform(0.55, 0.68) + by_class(0, 0.08, -0.12))
    # --- LV size, walls and function: class means, overlapping spreads
    p["lv_length_mm"] = normal(86 + by_class(0, 16, -5), 5, 70, 125)
    p["lv_halfwidth_mm"] = normal(23.5 + by_class(0, 7, -3), 2.0, 15, 40)
    p["septum_mm"] = normal(by_class(9.5, 7.8, 17.0), by_class(1.2, 1.0, 3.0), 5.5, 28)
    p["lateral_mm"] = normal(by_class(9.0, 7.2, 12.5), by_class(1.2, 1.0, 2.0), 5.5, 18)
    p["apex_mm"] = float(q.uniform(*by_class((6, 8), (5, 6.5), (8, 12))))
    p["mapse_mm"] = normal(by_class(14.5, 8.0, 10.5), by_class(1.8, 1.8, 1.8), 4, 20)
    p["ef_volume_target"] = by_class(normal(0.61, 0.055, 0.48, 0.76), normal(0.36, 0.08, 0.15, 0.52),
                                     normal(0.67, 0.05, 0.55, 0.82))
    p["ef_area_target"] = float(area_ef_from_volume_ef(p["ef_volume_target"], p["lv_length_mm"] * p["heart_scale"],
                                                       p["mapse_mm"]))
    # --- right heart and atria: class-tied shares redrawn, independent of the ECG otherwise
    p["rv_halfwidth_mm"] = float(q.uniform(19, 27)) * by_class(1.0, 1.1, 1.0)
    p["rv_ef_area"] = float(q.uniform(0.38, 0.52)) * by_class(1.0, 0.75, 1.0)
    p["tapse_mm"] = float(q.uniform(16, 24)) * by_class(1.0, 0.65, 0.9)
    p["la_min_area_mm2"] = float(q.uniform(900, 1400)) * by_class(1.0, 1.3, 1.15)
    # --- layout and image (no ECG reveals these)
    p["pixel_mm"] = PIXEL_MM
    p["psf_sigma_mm"] = float(q.uniform(1.7, 2.2))
    p["psf_sigma_px"] = p["psf_sigma_mm"] / PIXEL_MM
    p["blood_texture"] = float(q.uniform(0.025, 0.045))
    p["apical_signal_loss"] = float(q.uniform(0.15, 0.4))
    p["chemical_shift_depth"] = float(q.uniform(0.45, 0.75))
    p["papillary_mm"] = [float(q.uniform(10, 15)), float(q.uniform(5.5, 8.0))]   # semi-axes along u, v
    p["papillary_level"] = float(q.uniform(0.45, 0.65))                           # of the LV length
    p["trabeculation_mm"] = float(q.uniform(3.0, 6.0)) * by_class(1.0, 1.3, 0.8)
    return p


# ----------------------------------------------------------------------------- rendering

def image_plane(p: dict):
    """Pixel centres of the UK Biobank matrix in version 1's scene coordinates (mm): x, y ``(H, W)``.
    The scene is mirrored (columns) and rotated by ``LAYOUT_ROTATION_DEG`` onto the image."""
    xi, yi = v1.image_plane(p, IMAGE_SHAPE)
    a = math.radians(LAYOUT_ROTATION_DEG)
    # image = R(a) @ diag(-1, 1) @ scene  ->  scene = diag(-1, 1) @ R(-a) @ image
    xs = -(math.cos(a) * xi + math.sin(a) * yi)
    ys = -math.sin(a) * xi + math.cos(a) * yi
    return xs.astype(np.float32), ys.astype(np.float32)


def _sub_slice(g: dict, dz: float) -> dict:
    """The geometry cut ``dz`` mm off the central plane: each chamber's in-plane semi-axes shrink
    like an ellipsoid's whose through-plane semi-axis equals its in-plane width."""
    if dz == 0.0:
        return g
    out = dict(g)

    def k(width):
        return np.sqrt(np.clip(1.0 - (dz / np.maximum(width, 1e-3)) ** 2, 0.05, 1.0))

    for length, width in (("L", "b"), ("L_epi", "b_epi"), ("L_rv", "b_rv")):
        kk = k(g[width])
        out[width] = g[width] * kk
        out[length] = g[length] * (v1.TRUNC + kk) / (1 + v1.TRUNC)    # base fixed, apex recedes
    for a, b in (("la_a", "la_b"), ("ra_a", "ra_b")):
        kk = k(g[b])
        out[a], out[b] = g[a] * kk, g[b] * kk
    return out


def _lv_interior(p: dict, g: dict, u, v, rng: np.random.Generator):
    """Papillary muscle and trabeculae ``(T, h, w)`` bool: muscle inside the LV cavity (trabeculae
    where a random field of 4-9 mm wavelength is positive within their depth of the endocardium,
    over the apical and lateral walls)."""
    semi = g["L"] / (1 + v1.TRUNC)
    cu = g["base"] + v1.TRUNC * semi
    qu = (u - cu) / semi
    qv = (v - g["c_lv"]) / g["b"]
    rad = np.sqrt(qu ** 2 + qv ** 2)                                  # 1 on the endocardium
    depth = (1.0 - rad) * np.minimum(semi, g["b"])                    # ~ mm from the endocardium
    s = np.clip(g["base"] / max(p["mapse_mm"], 1e-3), 0, 1)          # 0 at ED, 1 at ES
    trab_field = v1._wave_field(rng, 10, 4, 9)(u, v)
    apical = np.clip((u - g["base"]) / g["L"] - 0.3, 0, 1) / 0.7
    lateral = np.clip(qv + 0.3, 0, 1)
    trab = (depth < p["trabeculation_mm"] * (1 + 0.5 * s)) & (trab_field > 0.0) & (apical + lateral > 0.4)
    au, av = p["papillary_mm"]
    grow = 1 + 0.35 * s                                               # muscle thickens in systole
    pu = g["base"] + p["papillary_level"] * g["L"]
    pv = g["c_lv"] + g["b"] * np.sqrt(np.clip(1 - ((pu - cu) / semi) ** 2, 0, 1)) - 0.8 * av * grow
    pap = ((u - pu) / (au * grow)) ** 2 + ((v - pv) / (av * grow)) ** 2 <= 1.0
    return trab | pap


def _fat_water_lines(fat: np.ndarray) -> np.ndarray:
    """Pixels ``(T, h, w)`` on a fat-water border: fat next to non-fat along rows or columns."""
    line = np.zeros_like(fat)
    for axis in (1, 2):
        fwd = np.diff(fat, axis=axis, prepend=np.take(fat, [0], axis=axis))
        line |= fwd
    return line


def valve_opening(timing: dict, n_frames: int) -> np.ndarray:
    """Opening of the AV valves per frame ``(T,)`` in [0, 1]: closed from the R-peak through ejection
    and isovolumic relaxation, open (40 ms ramps) from the start of rapid filling until 10 ms before
    the next R-peak."""
    rr = timing["rr_ms"]
    t = np.arange(n_frames) * rr / n_frames
    opening = np.clip((t - timing["rapid_fill_start_ms"]) / 40.0, 0, 1)
    return opening * np.clip((rr - 10.0 - t) / 40.0, 0, 1)


def _leaflets(u, v, hinge_u, centre_v, half, opening, thick_mm=1.6) -> np.ndarray:
    """Two valve leaflets ``(T, h, w)`` bool hinged on the annulus (u = ``hinge_u``, v = centre
    -+ ``half``): closed they meet across it, bowed slightly towards the atrium; open they point
    into the ventricle. Columns ``(T, 1, 1)`` for the per-frame arguments."""
    out = np.zeros(np.broadcast_shapes(u.shape, np.shape(hinge_u)), dtype=bool)
    # angle from the annulus line towards the ventricle (+u): -12 deg closed, 75 deg open
    ang = np.radians(-12.0 + 87.0 * opening)
    for side, share in ((+1, 0.55), (-1, 0.45)):        # anterior (septal) leaflet the longer
        length = share * 2 * half * 1.05
        h_v = centre_v - side * half
        du, dv = np.sin(ang), side * np.cos(ang)        # unit direction from the hinge
        ru, rv = u - hinge_u, v - h_v
        along = np.clip(ru * du + rv * dv, 0, length)
        out |= (ru - along * du) ** 2 + (rv - along * dv) ** 2 <= (thick_mm / 2) ** 2
    return out


def render(p: dict, geo: dict, timing: dict) -> tuple[np.ndarray, np.ndarray]:
    """Cine intensities ``(T, 208, 180)`` int16 and labels uint8 (the central sub-slice's)."""
    H, W = IMAGE_SHAPE
    T = len(geo["b"])
    # atria cut at the AV plane keep their areas: semi-axes grow by sqrt(pi / truncated-ellipse factor)
    grow = math.sqrt(math.pi / v1._F_TRUNC)
    geo = dict(geo, **{k: geo[k] * grow for k in ("la_a", "la_b", "ra_a", "ra_b")})
    tex = np.random.default_rng(p["texture_seed"])
    x, y = image_plane(p)
    eu, ev, U, V = v1.heart_frame(p, x, y)
    rows, cols = v1.heart_box(p, geo, U, V)
    u, v = U[None, rows, cols], V[None, rows, cols]
    g = v1.frame_columns(geo)
    fields = v1.texture_fields(tex)
    scene = v1.surroundings(p, geo, tex, fields, x, y, U, V, ev)
    bg = scene["img"]
    # dark line where subcutaneous fat meets water-based tissue (fat weight 0.5 at the border)
    fw = scene["body_fat"]
    bg = bg * (1 - p["chemical_shift_depth"] * np.clip(4 * fw * (1 - fw), 0, 1))
    maps = v1.tissue_maps(p, fields, u, v, bg[rows, cols], blood_tex=p["blood_texture"])
    # codes beyond version 1's: 8 papillary muscle / trabeculae, 9 fat-water border
    maps = np.concatenate([maps, maps[5:6], (1 - p["chemical_shift_depth"]) * maps[6:7]])
    interior = _lv_interior(p, g, u, v, np.random.default_rng([p["texture_seed"], 2]))
    # mitral and tricuspid leaflets, hinged where each ventricle's cavity is cut at the AV plane
    opening = v1._col(valve_opening(timing, T))
    cut = math.sqrt(1 - v1.TRUNC ** 2)
    valves_lv = _leaflets(u, v, g["base"], g["c_lv"], g["b"] * cut, opening)
    valves_rv = _leaflets(u, v, g["base_rv"], g["c_rv"], g["b_rv"] * cut, opening)
    # slow apical flow loses signal in systole: LV blood darkens towards the apex as it empties
    s = np.clip(g["base"] / max(p["mapse_mm"], 1e-3), 0, 1)
    apex_w = np.clip((u - g["base"]) / g["L"] - 0.45, 0, 1) / 0.55
    apical_gain = (1 - p["apical_signal_loss"] * s * apex_w ** 1.5).astype(np.float32)
    heart = np.zeros((T,) + u.shape[1:], dtype=np.float32)
    for dz in SUB_SLICES_MM:
        gs = _sub_slice(g, dz)
        parts = v1.heart_labels(p, gs, u, v, joined_atria=True)
        lab = parts["lab"]
        code = lab.copy()
        fat = v1.fat_band(p, gs, u, v, parts["heart"], fields["fat"])
        code[fat] = 6
        code[parts["walls"] & (lab == 0)] = 7
        code[interior & (lab == 1)] = 8
        code[valves_lv & ((lab == 1) | (lab == 3))] = 8
        code[valves_rv & ((lab == 2) | (lab == 4))] = 8
        code[_fat_water_lines(fat) & fat] = 9
        sub = v1.lookup(code, maps)
        sub = np.where(code == 1, sub * apical_gain, sub)
        heart += sub / len(SUB_SLICES_MM)
        if dz == 0.0:
            labels_box = lab
    img = np.empty((T, H, W), dtype=np.float32)
    img[:] = bg
    img[:, rows, cols] = heart
    labels = np.zeros((T, H, W), dtype=np.uint8)
    labels[:, rows, cols] = labels_box
    return v1.acquire(img, p, x, y), labels


# ----------------------------------------------------------------------------- one subject

def simulate(seed: int, index: int, prevalence=DEFAULT_PREVALENCE) -> dict:
    """Everything about one version-2 subject in memory (as ``phantom.simulate``)."""
    return v1.simulate_params(sample_params(seed, index, prevalence), render)


def ground_truth(sim: dict) -> dict:
    """Version 1's truth, plus what version 2 adds (its manifest columns end with these)."""
    truth = v1.ground_truth(sim)
    p, tm, m = sim["params"], sim["timing"], truth["manifest"]
    t_end = tm["es_ms"] - p["em_offset_ms"]
    m["cine_qt_ms"] = t_end - tm["qrs_on_ms"]
    m.update({"phantom_version": GENERATOR_VERSION, "t_end_ms": t_end, "em_offset_ms": p["em_offset_ms"],
              "lbbb": int(p["lbbb"]), "ef_volume": 100.0 * p["ef_volume_target"],
              "lv_ed_length_mm": float(sim["geometry"]["L"][0]),
              "lv_es_length_mm": float(sim["geometry"]["L"][int(np.argmin(sim["lv_area_fraction"]))])})
    return truth
