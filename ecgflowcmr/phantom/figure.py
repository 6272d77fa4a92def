"""One phantom subject in one picture: the 12-lead ECG with its R-peaks, the LV area curve from the
masks, and a strip of cine frames, all on one time axis.

``python -m ecgflowcmr.phantom.figure --subject DIR/cmr/PH00000.nii.gz --out docs/phantom_subject.png``

``--subject`` is any file of the subject (``ecg/<id>.xml``, ``cmr/<id>.nii.gz``, ``masks/<id>.nii.gz``,
``truth/<id>.json``), or ``DIR/<id>``, or the phantom folder ``DIR`` (then ``--id``, default the first
subject of the manifest). Everything is read back from the files the phantom wrote (the ECG
through ``ecgflowcmr.data.ecg_io`` when present), so the figure also checks the round trip.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

from .v1 import FS, LEADS, N_FRAMES


def resolve_subject(subject: str | Path, subject_id: str | None = None) -> tuple[Path, str]:
    """(phantom folder, subject id) from a path given on the command line."""
    path = Path(subject)
    if path.is_dir() and (path / "manifest.csv").is_file():
        if subject_id:
            return path, subject_id
        with open(path / "manifest.csv", newline="") as fh:
            return path, next(csv.DictReader(fh))["subject_id"]
    name = path.name
    for suffix in (".nii.gz", ".xml", ".json", ".nii"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    root = path.parent.parent if path.parent.name in ("ecg", "cmr", "masks", "truth") else path.parent
    if not (root / "truth" / f"{name}.json").is_file():
        raise FileNotFoundError(f"'{subject}': no phantom subject there (expected {root}/truth/{name}.json); "
                                f"give a file of the subject, DIR/<id>, or the phantom folder")
    return root, name


def _read_ecg(path: Path) -> np.ndarray:
    try:
        from ecgflowcmr.data.ecg_io import read_ecg
    except ImportError:           # reader not available: parse the strip directly
        import xml.etree.ElementTree as ET

        strip = ET.parse(path).getroot().find("StripData")
        res = float(strip.findtext("Resolution")) / 1000.0
        leads = {w.get("lead"): np.array([int(v) for v in w.text.replace("\n", "").strip(",").split(",")
                                          if v.strip()]) * res for w in strip.findall("WaveformData")}
        return np.stack([leads[name] for name in LEADS]).astype(np.float32)
    return read_ecg(path)


def load_subject(root: Path, sid: str) -> dict:
    import nibabel as nib

    truth = json.loads((root / "truth" / f"{sid}.json").read_text())
    cine = np.asarray(nib.load(root / "cmr" / f"{sid}.nii.gz").dataobj)[:, :, 0, :]     # (H, W, T)
    masks = np.asarray(nib.load(root / "masks" / f"{sid}.nii.gz").dataobj)[:, :, 0, :]
    return {"truth": truth, "ecg": _read_ecg(root / "ecg" / f"{sid}.xml"),
            "cine": np.moveaxis(cine, -1, 0), "masks": np.moveaxis(masks, -1, 0)}


def _heart_box(masks: np.ndarray, margin: int = 6) -> tuple[slice, slice]:
    rows = np.nonzero(masks.any(axis=(0, 2)))[0]
    cols = np.nonzero(masks.any(axis=(0, 1)))[0]
    h, w = masks.shape[1:]
    r0, r1 = max(rows[0] - margin, 0), min(rows[-1] + margin + 1, h)
    c0, c1 = max(cols[0] - margin, 0), min(cols[-1] + margin + 1, w)
    side = max(r1 - r0, c1 - c0)                      # square crop
    rc, cc = (r0 + r1) // 2, (c0 + c1) // 2
    r0, c0 = max(min(rc - side // 2, h - side), 0), max(min(cc - side // 2, w - side), 0)
    return slice(r0, r0 + side), slice(c0, c0 + side)


def make_figure(root: Path, sid: str, out: Path, n_strip: int = 8) -> Path:
    """Four panels of subject ``sid`` under ``root``: the 12 leads, the cine's cycle with its events,
    the LV area curve from the masks, and a strip of frames at their times."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sub = load_subject(root, sid)
    truth = sub["truth"]
    m, tm = truth["manifest"], truth["timing"]
    r0, rr = tm["r_sample"] / FS, tm["rr_ms"] / 1000.0
    t_frames = r0 + np.arange(N_FRAMES) * rr / N_FRAMES
    fig = plt.figure(figsize=(13, 12.5))
    gs = fig.add_gridspec(4, 1, height_ratios=[3.2, 1.6, 1.3, 1.1], hspace=0.3)
    _leads_panel(fig.add_subplot(gs[0]), sub, sid, r0, rr)
    ax1 = fig.add_subplot(gs[1])
    events, (lo, hi) = _cycle_panel(ax1, sub["ecg"], m, tm, r0, rr)
    _curve_panel(fig.add_subplot(gs[2], sharex=ax1), truth, events, t_frames, r0)
    _strip_panel(fig.add_subplot(gs[3], sharex=ax1), sub, m["es_frame"], t_frames, hi - lo, n_strip)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


def _leads_panel(ax, sub: dict, sid: str, r0: float, rr: float) -> None:
    """(a) the whole 10 s, 12 leads, R-peaks and the cine's cycle."""
    ecg, m, dl = sub["ecg"], sub["truth"]["manifest"], sub["truth"]["delineation_samples"]
    t_ecg = np.arange(ecg.shape[1]) / FS
    gap = 2.0
    for i, name in enumerate(LEADS):
        ax.plot(t_ecg, ecg[i] - i * gap, lw=0.6, color="k")
        ax.text(-0.15, -i * gap, name, ha="right", va="center", fontsize=8)
    for r in np.array([x for x in dl["rpeaks"] if x is not None]) / FS:
        ax.axvline(r, color="tab:red", lw=0.6, alpha=0.6)
    ax.axvspan(r0, r0 + rr, color="tab:blue", alpha=0.12, label="cycle shown as the cine")
    ax.set_xlim(-0.3, 10)
    ax.set_ylim(-(len(LEADS) - 1) * gap - 1.5, 2)
    ax.set_yticks([])
    ax.set_xlabel("time (s)")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(f"{sid}  class {m['class']}   HR {m['hr_bpm']:.0f} bpm, QRS {m['qrs_ms']:.0f} ms, "
                 f"QT {m['qt_ms']:.0f} ms (QTc {m['qtc_ms']:.0f}), EF(area) {m['ef_area']:.0f} %, "
                 f"wall {m['wall_thickness_mm']:.1f} mm   (red: R-peaks)", fontsize=10)


def _cycle_panel(ax, ecg: np.ndarray, m: dict, tm: dict, r0: float, rr: float):
    """(b) the cine's cycle: leads II and V5 with the delineated events; returns them and the x range."""
    t_ecg = np.arange(ecg.shape[1]) / FS
    lo, hi = r0 - 0.12, r0 + rr + 0.12
    sel = (t_ecg >= lo) & (t_ecg <= hi)
    ax.plot(t_ecg[sel], ecg[1, sel], lw=0.9, label="II")
    ax.plot(t_ecg[sel], ecg[10, sel] - 1.5, lw=0.9, label="V5 (-1.5 mV)")
    events = [(r0, "R", "tab:red"), (r0 + rr, "R", "tab:red"),
              *([(r0 + m["t_end_ms"] / 1000, "T end", "tab:brown"), (r0 + tm["es_ms"] / 1000, "ES", "tab:purple")]
                if "t_end_ms" in m else [(r0 + tm["es_ms"] / 1000, "T end = ES", "tab:purple")]),
              (r0 + tm["p_on_next_ms"] / 1000, "P on", "tab:green"),
              (r0 + tm["atrial_kick_start_ms"] / 1000, "atrial kick", "tab:olive")]
    for t, label, color in events:
        ax.axvline(t, color=color, lw=1, ls="--")
        ax.text(t, ax.get_ylim()[1], label, color=color, fontsize=8, ha="center", va="bottom")
    ax.set_xlim(lo, hi)
    ax.set_ylabel("mV")
    ax.legend(loc="lower right", fontsize=8)
    return events, (lo, hi)


def _curve_panel(ax, truth: dict, events: list, t_frames: np.ndarray, r0: float) -> None:
    """(c) the LV area curve from the masks, on the cycle's time axis, with the mechanical phases."""
    m, tm = truth["manifest"], truth["timing"]
    lv_mm2 = np.array(truth["lv_area_px"]) * m["pixel_mm"] ** 2
    es = m["es_frame"]
    ax.plot(t_frames, lv_mm2, "o-", ms=3, color="tab:blue", label="LV area (masks)")
    ax.plot(t_frames[es], lv_mm2[es], "s", color="tab:purple", ms=8, label=f"ES frame {es}")
    ax.plot(t_frames[0], lv_mm2[0], "s", color="tab:red", ms=8, label="ED frame 0")
    for t, _, color in events:
        ax.axvline(t, color=color, lw=1, ls="--")
    spans = [(tm["ejection_start_ms"], tm["es_ms"], "ejection"),
             (tm["es_ms"], tm["rapid_fill_start_ms"], "IVR"),
             (tm["rapid_fill_start_ms"], tm["rapid_fill_start_ms"] + tm["rapid_fill_ms"], "rapid filling"),
             (tm["rapid_fill_start_ms"] + tm["rapid_fill_ms"], tm["atrial_kick_start_ms"], "diastasis"),
             (tm["atrial_kick_start_ms"], tm["rr_ms"], "atrial")]
    ymin = lv_mm2.min() - 0.08 * np.ptp(lv_mm2)
    for a, b, label in spans:
        if b - a > 25:
            ax.text(r0 + (a + b) / 2000, ymin, label, fontsize=7, ha="center", va="bottom", color="0.3")
    ax.set_ylabel("LV area (mm$^2$)")
    ax.legend(loc="upper center", fontsize=8, ncol=3)
    ax.set_ylim(ymin - 0.05 * np.ptp(lv_mm2), lv_mm2.max() + 0.25 * np.ptp(lv_mm2))


def _strip_panel(ax, sub: dict, es: int, t_frames: np.ndarray, span: float, n_strip: int) -> None:
    """(d) a strip of frames (the ES frame among them) placed at their times, LV contour in blue."""
    cine, masks = sub["cine"], sub["masks"]
    ax.set_ylim(0, 1)
    ax.set_yticks([])
    ax.set_xlabel("time (s)")
    rows, cols = _heart_box(masks)
    picks = np.linspace(0, N_FRAMES - 1, n_strip).round().astype(int)
    picks[np.argmin(np.abs(picks[1:] - es)) + 1] = es            # the ES frame replaces its neighbour
    picks = sorted(set(picks.tolist()))
    width = min(span / (len(picks) + 0.6), 0.98 * np.diff(t_frames[picks]).min())
    vmax = np.percentile(cine, 99.5)
    for f in picks:
        inset = ax.inset_axes([t_frames[f] - width / 2, 0.02, width, 0.96], transform=ax.transData)
        inset.imshow(cine[f][rows, cols], cmap="gray", vmin=0, vmax=vmax)
        inset.contour(masks[f][rows, cols] == 1, levels=[0.5], colors="tab:blue", linewidths=0.6)
        inset.set_xticks([])
        inset.set_yticks([])
        color = "tab:purple" if f == es else ("tab:red" if f == 0 else "k")
        inset.set_title(f"frame {f}", fontsize=7, color=color, pad=2)
        ax.plot([t_frames[f]], [1.0], "v", color=color, ms=4, clip_on=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ecgflowcmr.phantom.figure", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subject", required=True, help="a file of the subject, DIR/<id>, or the phantom DIR")
    parser.add_argument("--id", default=None, help="subject id when --subject is the phantom folder")
    parser.add_argument("--out", default="docs/phantom_subject.png")
    args = parser.parse_args(argv)
    root, sid = resolve_subject(args.subject, args.id)
    print(f"wrote {make_figure(root, sid, Path(args.out))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
