#!/usr/bin/env python
"""How much a folder of four-chamber cines looks and behaves like UK Biobank's: measured properties
next to published or real ranges, with pass / fail.

    python benchmarks/phantom_realism.py runs/realism/v1 runs/realism/v2 [--max N] [--json out.json]

Each argument is a folder: a phantom (``manifest.csv`` with ``cmr_path`` and ``mask_path``) or any
folder of NIfTI cines (``*.nii.gz`` / ``*.nii``, UK Biobank layout ``(H, W, 1, T)``; a mask named like
its cine under a sibling ``masks/`` folder, or ``<name>_seg.nii.gz``, is used where present).
Properties that need masks, or the manifest's ground truth (class, QRS, QTc, T end), are reported
as n/a without them. Per cine (all on the raw file, pixel size and frame duration from the header):

- layout: field of view (mm) and matrix; LV long-axis angle in the array and handedness (sign of
  the LV-to-RV direction relative to the long axis), reported without a range;
- LV convexity at ED: pixels of the bright blood inside the LV label (above the blood/myocardium
  midpoint, largest component) over pixels of its convex hull, so papillary muscles and trabeculae count;
- blood-pool CoV at ED: std / mean of the LV label eroded by 2 pixels, pixels above the midpoint;
- edge 10-90 % width (mm) at ED: an error function fitted to intensity against signed distance to
  the LV label's border (LV inside, myocardium outside, within 5 mm): 2.563 sigma;
- timing: heart rate from R-R = frames x frame duration; ES frame = smallest LV label area; ES
  fraction of R-R; with the manifest, ES time (ES frame x frame duration) minus the ECG's T end;
- function: area EF from the LV label; the long axis of the LV label (extent along its principal
  axis) at ED and ES; volume EF by the area-length method V = 8 A^2 / (3 pi L);
- size in the model input: LV area at ED as a share of the 96 x 96 crop of ``read_cine``
  (``--crop-mm``: its physical crop, ``data.crop_mm``);
- with the manifest: class prevalence, P(dilated | QRS >= 120 ms), P(normal | QTc < 428 ms), and
  the AUC of QRS for dilated vs the rest and of QTc for abnormal vs normal.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ERF_10_90 = 2 * 1.2815515655446004        # 10-90 % width of a Gaussian-blurred step, in sigmas

# (key, label, low, high, source). None: no bound on that side; both None: reported only.
RANGES = (
    ("fov_mm", "field of view (mm, rows x columns)", None, None,
     "UK Biobank long-axis protocol: ~380 x 330 mm, 208 x 180 pixels of 1.827 mm"),
    ("la_angle_deg", "LV long-axis angle in the array (deg, mean)", None, None, "reported"),
    ("handedness", "share with the RV clockwise of the LV", None, None, "reported"),
    ("convexity_ed", "LV blood-pool convexity at ED (mean)", 0.70, 0.92, "two real UK Biobank cines"),
    ("blood_cov_ed", "LV blood-pool CoV at ED (mean)", 0.07, 0.10, "two real UK Biobank cines"),
    ("edge_mm", "edge width 10-90 % (mm, mean)", 4.0, 6.0, "two real UK Biobank cines: >= 4 mm"),
    ("hr_bpm", "heart rate (bpm, mean)", 60.0, 65.0, "UK Biobank imaging visit: 60-65 bpm"),
    ("es_fraction", "ES fraction of R-R (mean)", 0.35, 0.40,
     "Weissler's QS2 = 546 - 2.1 HR ms at 60-65 bpm: 0.37-0.40"),
    ("es_frame_sd", "ES frame (of 50) SD", None, None, "reported"),
    ("ef_area_normal", "area EF, normal class (mean)", None, None, "reported"),
    ("ef_volume_normal", "implied volume EF, normal class (mean)", 0.56, 0.66,
     "UK Biobank reference ranges: LVEF ~61 % (men), ~64 % (women)"),
    ("ef_volume_normal_sd", "implied volume EF, normal class (SD)", 0.035, 0.08,
     "same: 95 % ranges ~52-73 %, SD ~0.05"),
    ("lv_share_input", "LV ED area, % of the 96 x 96 model input (mean)", None, None, "reported"),
    ("es_minus_tend_ms", "ES - T end (ms, normal class, mean)", 0.0, 30.0,
     "QS2 exceeds QT by ~10-20 ms in normal hearts"),
    ("es_minus_tend_sd_ms", "ES - T end (ms, SD over subjects)", 10.0, None, "per-subject scatter"),
    ("normal_share", "share of the normal class", 0.7, None, "population cohort: mostly normal"),
    ("p_dilated_wide_qrs", "P(dilated | QRS >= 120 ms)", None, 0.6,
     "wide QRS mostly without cardiomyopathy; LBBB in ~1/3 of dilated hearts"),
    ("p_normal_short_qtc", "P(normal | QTc < 428 ms)", None, None, "reported"),
    ("auc_qrs_dilated", "AUC of QRS: dilated vs rest", 0.55, 0.85, "a weak, real ECG signal"),
    ("auc_qtc_abnormal", "AUC of QTc: abnormal vs normal", 0.55, 0.85, "a weak, real ECG signal"),
)


# ----------------------------------------------------------------------------- measures

def convexity(region: np.ndarray) -> float:
    """Pixels of a 2-D boolean region over the pixels of its convex hull (pixel centres on or inside
    the hull of the region's centres): 1 for any digitised convex shape."""
    from scipy.spatial import ConvexHull, QhullError

    rr, cc = np.nonzero(region)
    if len(rr) == 0:
        return float("nan")
    pts = np.stack([rr, cc], 1).astype(np.float64)
    try:
        hull = ConvexHull(pts)
    except QhullError:                                   # a line of pixels
        return 1.0
    gr, gc = np.mgrid[rr.min():rr.max() + 1, cc.min():cc.max() + 1]
    grid = np.stack([gr.ravel(), gc.ravel()], 1).astype(np.float64)
    inside = np.all(grid @ hull.equations[:, :2].T + hull.equations[:, 2] <= 1e-9, axis=1)
    return float(len(rr) / inside.sum())


def _largest_component(region: np.ndarray) -> np.ndarray:
    from scipy.ndimage import label

    lab, n = label(region)
    if n <= 1:
        return region
    sizes = np.bincount(lab.ravel())[1:]
    return lab == (1 + int(np.argmax(sizes)))


def blood_threshold(image: np.ndarray, lv: np.ndarray, myo: np.ndarray) -> float:
    """Midpoint between the medians of the eroded LV label and the myocardium label."""
    from scipy.ndimage import binary_erosion

    core = binary_erosion(lv, iterations=2)
    core = core if core.any() else lv
    return 0.5 * (float(np.median(image[core])) + float(np.median(image[myo])))


def blood_convexity(image: np.ndarray, lv: np.ndarray, myo: np.ndarray) -> float:
    """Convexity of the bright blood (above ``blood_threshold``) inside the LV label, 2-D inputs."""
    from scipy.ndimage import binary_dilation

    bright = binary_dilation(lv) & (image > blood_threshold(image, lv, myo))
    return convexity(_largest_component(bright))


def blood_cov(image: np.ndarray, lv: np.ndarray, myo: np.ndarray) -> float:
    """Coefficient of variation of the blood inside the LV label eroded by 2 pixels (bright pixels)."""
    from scipy.ndimage import binary_erosion

    core = binary_erosion(lv, iterations=2)
    values = image[core & (image > blood_threshold(image, lv, myo))].astype(np.float64)
    return float(values.std() / values.mean())


def signed_distance_mm(inside: np.ndarray, pixel_mm: float) -> np.ndarray:
    """Signed distance (mm) of each pixel centre to the region's border: > 0 inside, < 0 outside."""
    from scipy.ndimage import distance_transform_edt

    d_in = distance_transform_edt(inside) - 0.5
    d_out = distance_transform_edt(~inside) - 0.5
    return np.where(inside, d_in, -d_out) * pixel_mm


def edge_width_mm(image: np.ndarray, inside: np.ndarray, outside: np.ndarray, pixel_mm: float,
                  reach_mm: float = 5.0) -> float:
    """10-90 % width (mm) of the edge between ``inside`` (bright) and ``outside`` 2-D regions: an
    error function of the signed distance fitted to the pixels within ``reach_mm`` of the border."""
    from scipy.optimize import OptimizeWarning, curve_fit
    from scipy.special import erf

    d = signed_distance_mm(inside, pixel_mm)
    use = (np.abs(d) <= reach_mm) & (inside | outside)
    x, y = d[use], image[use].astype(np.float64)

    def model(dist, lo, hi, centre, sigma):
        return lo + (hi - lo) * 0.5 * (1 + erf((dist - centre) / (math.sqrt(2) * abs(sigma) + 1e-9)))

    start = (float(np.percentile(y, 10)), float(np.percentile(y, 90)), 0.0, 1.5)
    try:
        with warnings.catch_warnings():          # an exact fit (synthetic edges) has no covariance
            warnings.simplefilter("ignore", OptimizeWarning)
            params, _ = curve_fit(model, x, y, p0=start, maxfev=4000)
    except RuntimeError:
        return float("nan")
    return float(ERF_10_90 * abs(params[3]))


def principal_axis(region: np.ndarray, pixel_mm: float) -> tuple[float, float, np.ndarray]:
    """Extent (mm) of a 2-D region along its principal axis, the axis angle (deg, atan2 of
    (row, column)) and its unit vector (row, column)."""
    rr, cc = np.nonzero(region)
    pts = np.stack([rr, cc], 1).astype(np.float64)
    pts -= pts.mean(0)
    _, vecs = np.linalg.eigh(pts.T @ pts)
    axis = vecs[:, -1]
    proj = pts @ axis
    return float((proj.max() - proj.min() + 1) * pixel_mm), math.degrees(math.atan2(axis[0], axis[1])), axis


def implied_volume_ef(area_ed: float, area_es: float, length_ed: float, length_es: float) -> float:
    """Volume EF by the area-length method, V = 8 A^2 / (3 pi L)."""
    return 1.0 - (area_es ** 2 / length_es) / (area_ed ** 2 / length_ed)


def auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney, ties counted half)."""
    pos, neg = scores[positive], scores[~positive]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


# ----------------------------------------------------------------------------- one cine

def _header(path: Path) -> tuple[float, float | None]:
    """Pixel size (mm) and frame duration (ms; None where the header has none)."""
    import nibabel as nib

    hdr = nib.load(str(path)).header
    zooms = hdr.get_zooms()
    frame = None
    if len(zooms) >= 4 and zooms[3] > 0:
        unit = hdr.get_xyzt_units()[1]
        frame = float(zooms[3]) * {"msec": 1.0, "sec": 1000.0, "usec": 0.001}.get(unit, 1.0)
    return float(zooms[0]), frame


def measure_cine(cine_path: Path, mask_path: Path | None, crop_mm: float = 0.0) -> dict:
    """Every per-cine property (keys of ``RANGES`` plus helpers); NaN where not measurable."""
    from ecgflowcmr.data import cmr_io

    frames = cmr_io.load_frames(cine_path)                    # (T, H, W)
    t, h, w = frames.shape
    px, frame_ms = _header(cine_path)
    out = {"fov": (h * px, w * px), "matrix": (h, w), "frames": t,
           "rr_ms": t * frame_ms if frame_ms else float("nan")}
    out["hr_bpm"] = 60000.0 / out["rr_ms"] if frame_ms else float("nan")
    if mask_path is None:
        return out
    masks = cmr_io.load_frames(mask_path).astype(np.uint8)
    lv_area = (masks == 1).reshape(t, -1).sum(1).astype(np.float64)
    es = int(np.argmin(lv_area))
    ed_img, lv, myo = frames[0], masks[0] == 1, masks[0] == 5
    out.update({"es_frame_raw": es, "es_fraction": es / t, "es_frame": es * 50.0 / t,
                "es_ms": es * frame_ms if frame_ms else float("nan"),
                "convexity_ed": blood_convexity(ed_img, lv, myo), "blood_cov_ed": blood_cov(ed_img, lv, myo),
                "edge_mm": edge_width_mm(ed_img, lv, myo, px), "ef_area": 1.0 - lv_area[es] / lv_area[0]})
    len_ed, angle, axis = principal_axis(lv, px)
    len_es, _, _ = principal_axis(masks[es] == 1, px)
    out["ef_volume"] = implied_volume_ef(lv_area[0], lv_area[es], len_ed, len_es)
    rv, la = masks[0] == 2, masks[0] == 3
    if rv.any() and la.any():
        centre = np.array(np.nonzero(lv)).mean(1)
        if axis @ (centre - np.array(np.nonzero(la)).mean(1)) < 0:
            axis = -axis                                       # base (atrium) -> apex
        angle = math.degrees(math.atan2(axis[0], axis[1]))
        d = np.array(np.nonzero(rv)).mean(1) - centre
        # rows grow downwards: a positive cross product is clockwise on screen
        out["handedness"] = float(axis[1] * d[0] - axis[0] * d[1] > 0)
    out["la_angle_deg"] = angle
    cine, box = cmr_io.read_cine(cine_path, return_box=True, crop_mm=crop_mm)
    out["lv_share_input"] = 100.0 * float((cmr_io.read_mask(mask_path, box)[0] == 1).mean())
    return out


# ----------------------------------------------------------------------------- one folder

def _find(folder: Path):
    """(subject ids, cine paths, mask paths or None, manifest table or None)."""
    manifest = folder / "manifest.csv"
    if manifest.is_file():
        import pandas as pd

        table = pd.read_csv(manifest, dtype={"subject_id": str})
        if "cmr_path" in table.columns:
            masks = [folder / m for m in table["mask_path"]] if "mask_path" in table.columns else None
            return list(table["subject_id"]), [folder / c for c in table["cmr_path"]], masks, table
    cines = sorted(p for p in folder.rglob("*.nii*") if not any(k in p.name for k in ("_seg", "mask"))
                   and "masks" not in p.parts)
    masks = []
    for c in cines:
        stem = c.name.split(".nii")[0]
        cand = [c.parent.parent / "masks" / c.name, c.with_name(stem + "_seg.nii.gz")]
        masks.append(next((m for m in cand if m.is_file()), None))
    return [c.name.split(".nii")[0] for c in cines], cines, masks, None


def measure_folder(folder: str | Path, max_n: int | None = None, progress: bool = True, crop_mm: float = 0.0) -> dict:
    """Summary of every property over a folder (see module doc)."""
    from tqdm import tqdm

    folder = Path(folder)
    ids, cines, masks, table = _find(folder)
    if max_n:
        ids, cines = ids[:max_n], cines[:max_n]
        masks = masks[:max_n] if masks else None
        table = table.iloc[:max_n] if table is not None else None
    if not cines:
        raise SystemExit(f"{folder}: no cines found (manifest.csv with cmr_path, or *.nii / *.nii.gz)")
    per = [measure_cine(c, masks[i] if masks else None, crop_mm)
           for i, c in enumerate(tqdm(cines, desc=str(folder), disable=not progress))]

    def col(key):
        return np.array([r.get(key, np.nan) for r in per], dtype=np.float64)

    s = {"n": len(per), "fov_mm": "{:.0f} x {:.0f} on {} x {}".format(*per[0]["fov"], *per[0]["matrix"])}
    for key in ("la_angle_deg", "handedness", "convexity_ed", "blood_cov_ed", "edge_mm", "hr_bpm",
                "es_fraction", "lv_share_input"):
        s[key] = float(np.nanmean(col(key))) if np.isfinite(col(key)).any() else float("nan")
    s["es_frame_sd"] = float(np.nanstd(col("es_frame"), ddof=1)) if len(per) > 1 else float("nan")
    normal = np.ones(len(per), bool)
    if table is not None and "class" in table.columns:
        cls = table["class"].astype(str).to_numpy()
        normal = cls == "normal"
        s["normal_share"] = float(normal.mean())
        s["prevalence"] = {c: float((cls == c).mean()) for c in sorted(set(cls))}
        if "qrs_ms" in table.columns:
            qrs = table["qrs_ms"].to_numpy(float)
            wide = qrs >= 120
            s["p_dilated_wide_qrs"] = float((cls[wide] == "dilated").mean()) if wide.any() else float("nan")
            s["auc_qrs_dilated"] = auc(qrs, cls == "dilated")
        if "qtc_ms" in table.columns:
            qtc = table["qtc_ms"].to_numpy(float)
            short = qtc < 428
            s["p_normal_short_qtc"] = float(normal[short].mean()) if short.any() else float("nan")
            s["auc_qtc_abnormal"] = auc(qtc, ~normal)
        # T end of the cine beat: its own column, or (version 1, where ES is the T end) es_time_ms
        t_end = table["t_end_ms"] if "t_end_ms" in table.columns else table.get("es_time_ms")
        if t_end is not None:
            offset = col("es_ms") - t_end.to_numpy(float)
            s["es_minus_tend_ms"] = float(np.nanmean(offset[normal]))
            s["es_minus_tend_sd_ms"] = float(np.nanstd(offset, ddof=1))
    ef_a, ef_v = col("ef_area")[normal], col("ef_volume")[normal]
    s["ef_area_normal"] = float(np.nanmean(ef_a))
    s["ef_volume_normal"] = float(np.nanmean(ef_v))
    s["ef_volume_normal_sd"] = float(np.nanstd(ef_v, ddof=1)) if np.isfinite(ef_v).sum() > 1 else float("nan")
    return s


def verdict(value, lo, hi) -> str:
    if isinstance(value, str) or lo is None and hi is None:
        return ""
    if value is None or not np.isfinite(value):
        return "n/a"
    ok = (lo is None or value >= lo) and (hi is None or value <= hi)
    return "pass" if ok else "FAIL"


def _fmt(value) -> str:
    if isinstance(value, str):
        return value
    if value is None or not np.isfinite(value):
        return "n/a"
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"


def table_markdown(names: list[str], summaries: list[dict]) -> str:
    head = "| property | " + " | ".join(f"{n} (n={s['n']})" for n, s in zip(names, summaries)) + " | range | source |"
    lines = [head, "|" + "---|" * (len(names) + 3)]
    for key, label, lo, hi, source in RANGES:
        rng = ("" if lo is None else f">= {lo:g}" if hi is None else f"{lo:g}-{hi:g}") if lo is not None \
            else ("" if hi is None else f"<= {hi:g}")
        cells = []
        for s in summaries:
            v = s.get(key, float("nan"))
            mark = verdict(v, lo, hi)
            cells.append(_fmt(v) + (f" {mark}" if mark else ""))
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {rng or '-'} | {source} |")
    prev = [", ".join(f"{k} {v:.2f}" for k, v in s.get("prevalence", {}).items()) or "n/a" for s in summaries]
    lines.append("| class prevalence | " + " | ".join(prev) + " | - | reported |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", help="phantom folders (manifest.csv) or folders of NIfTI cines")
    parser.add_argument("--max", type=int, default=None, help="at most this many cines per folder")
    parser.add_argument("--json", default=None, help="also write the summaries here")
    parser.add_argument("--crop-mm", type=float, default=0.0,
                        help="crop of read_cine for the model-input size row (data.crop_mm; 0: relative)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    summaries = [measure_folder(f, args.max, progress=not args.quiet, crop_mm=args.crop_mm) for f in args.folders]
    print(table_markdown([Path(f).name for f in args.folders], summaries))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(zip(args.folders, summaries)), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
