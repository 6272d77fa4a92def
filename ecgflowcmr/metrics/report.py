"""Write ``eval/metrics.json``, ``eval/per_video.csv`` and ``eval/report.md`` (+ plots).

metrics.json holds every metric with its variant, N videos / frames, weight-file sha256 hashes,
optional bootstrap confidence intervals, or, for a metric that could not run, why and how to fix it.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

PLOT_FRAMES = 8


def _clean(obj):
    """JSON-safe copy: numpy -> python, NaN/inf -> None, private keys (``_...``) dropped."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    return obj


def metrics_json(result: dict) -> dict:
    return _clean(result)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _fmt(v, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e4 else f"{v:.1f}"
    return str(v)


def _ci(entry: dict) -> str:
    ci = entry.get("ci95")
    if isinstance(ci, list) and len(ci) == 2 and None not in ci:
        return f"[{_fmt(ci[0])}, {_fmt(ci[1])}]"
    return ""


def metric_table(result: dict) -> list[str]:
    m = result.get("metrics", {})
    lines = ["| metric | value | 95% CI | variant | N | weights |", "|---|---|---|---|---|---|"]
    for name in ("fid", "fvd", "lpips", "psnr", "ssim"):
        if name not in m:
            continue
        e = m[name]
        if not e.get("available"):
            why = e.get("reason", "unavailable")
            fix = f" — put `{e['file']}` ({e['url']}) in `{e['put_it_in']}`" if e.get("file") else ""
            lines.append(f"| {name.upper()} | unavailable | | {e.get('variant', '')} | | {why}{fix} |")
            continue
        if name in ("fid", "fvd"):
            n = (f"{e.get('n_real_videos')} real / {e.get('n_fake_videos')} gen videos"
                 + (f"; {e.get('n_real_frames')} / {e.get('n_fake_frames')} frames" if name == "fid" else ""))
            variant = f"{e.get('variant')}: {e.get('description', '')}"
        else:
            n = f"{e.get('n_videos')} pairs, {e.get('n_frames')} frames"
            variant = e.get("variant", "")
        w = e.get("weights") or {}
        wtxt = (f"`{w.get('file')}` sha256 {str(w.get('sha256', ''))[:12]}…" if w.get("sha256")
                else (w.get("note") or ""))
        unit = f" {e['unit']}" if e.get("unit") else ""
        lines.append(f"| {name.upper()} | {_fmt(e.get('value'))}{unit} | {_ci(e)} | {variant} | {n} | {wtxt} |")
    return lines


def functional_lines(result: dict) -> list[str]:
    f = result.get("metrics", {}).get("functional")
    if not f:
        return []
    lines = ["## Functional metrics (LV area-time curves)", ""]
    if not f.get("available"):
        return lines + [f"Unavailable: {f.get('reason')}", ""]
    seg = f.get("segmenter", {})
    dice = seg.get("dice", {})
    lines.append(f"Segmenter: {seg.get('architecture')}, trained on {seg.get('train_subjects')} subjects' ground-truth "
                 f"masks ({seg.get('steps')} steps), validated on the {seg.get('validated_on')} "
                 f"({seg.get('val_subjects')} subjects): Dice "
                 + ", ".join(f"{k} {_fmt(v, 3)}" for k, v in dice.items()) + ".")
    lines.append("")
    rows = [("generated_vs_real", "generated vs real (both segmented)"),
            ("generated_vs_real_masks", "generated (segmented) vs real ground-truth masks"),
            ("generated_vs_ground_truth", "generated vs manifest ground truth"),
            ("real_vs_ground_truth", "real (segmented) vs manifest ground truth: floor"),
            ("segmenter_on_eval_real", "real: segmenter vs ground-truth masks: floor")]
    lines += ["| comparison | ES-frame error (frames) | area-EF error (points) | curve corr | curve RMSE (rel.) | N |",
              "|---|---|---|---|---|---|"]
    for key, label in rows:
        e = f.get(key)
        if not e:
            continue
        n = max(int(e.get("es_frame_error_n", 0) or 0), int(e.get("ef_area_error_n", 0) or 0))
        lines.append(f"| {label} | {_fmt(e.get('es_frame_error'), 3)} | {_fmt(e.get('ef_area_error'), 3)} | "
                     f"{_fmt(e.get('curve_corr'), 3)} | {_fmt(e.get('curve_rmse_rel'), 3)} | {n} |")
    if "distributions" in f:
        d = f["distributions"]
        lines += ["", f"Unpaired: area EF real {_fmt(d['real']['ef_area_mean'], 3)} ± "
                      f"{_fmt(d['real']['ef_area_std'], 3)}, "
                      f"generated {_fmt(d['generated']['ef_area_mean'], 3)} ± "
                      f"{_fmt(d['generated']['ef_area_std'], 3)}."]
    return lines + [""]


def plot_frame_grid(result: dict, path: Path, max_pairs: int = 4) -> bool:
    real, fake, pairing = result.get("_real"), result.get("_fake"), result.get("_pairing")
    if real is None or fake is None:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if pairing is not None:
        pairs = list(zip(pairing.real_index[:max_pairs], pairing.fake_index[:max_pairs]))
    else:
        k = min(max_pairs, len(real), len(fake))
        pairs = list(zip(range(k), range(k)))
    if not pairs:
        return False
    t = real.cines.shape[1]
    frames = np.linspace(0, t - 1, PLOT_FRAMES).round().astype(int)
    fig, axes = plt.subplots(2 * len(pairs), len(frames), figsize=(1.3 * len(frames), 1.4 * 2 * len(pairs)),
                             squeeze=False)
    for p, (ri, fi) in enumerate(pairs):
        for row, (cset, idx, tag) in enumerate(((real, ri, "real"), (fake, fi, "gen"))):
            for c, fr in enumerate(frames):
                ax = axes[2 * p + row, c]
                ax.imshow(cset.cines[idx, fr], cmap="gray", vmin=0, vmax=255)
                ax.set_xticks([]), ax.set_yticks([])
                if c == 0:
                    ax.set_ylabel(f"{tag}\n{cset.keys[idx]}", fontsize=7)
                if p == 0 and row == 0:
                    ax.set_title(f"frame {fr}", fontsize=7)
    fig.suptitle("real (upper) vs generated (lower) rows, frame 0 = R-peak", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def plot_lv_curves(result: dict, path: Path, max_pairs: int = 6) -> bool:
    curves = result.get("_curves")
    if not curves or "pairs" not in curves:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r, f = curves["pairs"]
    n = min(max_pairs, len(r))
    if n == 0:
        return False
    cols = min(3, n)
    rows = int(math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
    fake_set = result.get("_fake")
    for k in range(n):
        ax = axes[k // cols, k % cols]
        ax.plot(curves["real_seg"][r[k]], label="real (segmenter)", color="C0")
        if "real_mask" in curves:
            ax.plot(curves["real_mask"][r[k]], label="real (GT mask)", color="C0", linestyle=":")
        ax.plot(curves["fake_seg"][f[k]], label="generated (segmenter)", color="C3")
        ax.set_title(fake_set.keys[f[k]] if fake_set is not None else str(k), fontsize=8)
        ax.set_xlabel("frame"), ax.set_ylabel("LV area (px)")
        if k == 0:
            ax.legend(fontsize=7)
    for k in range(n, rows * cols):
        axes[k // cols, k % cols].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def write_per_video_csv(result: dict, path: Path) -> bool:
    rows = result.get("per_video")
    if not rows:
        return False
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in keys})
    return True


def write_outputs(result: dict, out_dir: str | Path, command: str | None = None) -> dict[str, Path]:
    """metrics.json, per_video.csv, report.md and its plots under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"metrics": out / "metrics.json", "report": out / "report.md"}
    public = metrics_json(result)
    public.pop("per_video", None)
    if command:
        public["command"] = command
    _atomic_write(paths["metrics"], json.dumps(public, indent=2) + "\n")
    if write_per_video_csv(result, out / "per_video.csv"):
        paths["per_video"] = out / "per_video.csv"
    grid = plot_frame_grid(result, out / "frames_real_vs_generated.png")
    lv = plot_lv_curves(result, out / "lv_area_curves.png")
    r, g = public.get("real", {}), public.get("fake", {})
    lines = ["# Evaluation report", "",
             f"- created: {public.get('created')}; mode: **{public.get('mode')}** (samples: {public.get('samples')}); "
             f"device: {public.get('device')}",
             f"- real: `{r.get('source')}`: {r.get('n_videos')} videos, {r.get('n_frames')} frames "
             f"({r.get('frames_per_video')} x {r.get('frame_size')})",
             f"- generated: `{g.get('source')}`: {g.get('n_videos')} videos, {g.get('n_frames')} frames"]
    if public.get("pairs"):
        p = public["pairs"]
        lines.append(f"- pairs: {p['n_pairs']} ({p['n_subjects']} subjects); unmatched generated: "
                     f"{p['n_unmatched_generated']}, real without a generated cine: {p['n_unmatched_real']}")
    lines += [f"- quantisation: {public.get('quantisation')}",
              f"- weights folder: `{public.get('weights_dir')}`", ""]
    if command:
        lines += ["```", command, "```", ""]
    lines += ["## Metrics", ""] + metric_table(public) + [""]
    if public.get("bootstrap"):
        b = public["bootstrap"]
        lines += [f"95% confidence intervals: {b['resamples']} bootstrap resamples over {b['unit']}.", ""]
    lines += ["Frechet distances (FID, FVD) are biased upwards at small N: compare numbers only at equal N "
              "and with the same variant.", ""]
    unavailable = [(k, v) for k, v in public.get("metrics", {}).items() if not v.get("available") and v.get("file")]
    if unavailable:
        lines += ["### Unavailable metrics and how to enable them", ""]
        for k, v in unavailable:
            lines.append(f"- **{k.upper()}**: {v.get('reason')}: put `{v['file']}` (from {v['url']}) into "
                         f"`{v['put_it_in']}`"
                         + (" (also accepted: " + ", ".join(a["file"] for a in v["also_accepted"]) + ")"
                            if v.get("also_accepted") else "") + ".")
        lines.append("")
    lines += functional_lines(public)
    if grid:
        lines += ["## Frames", "", "![real vs generated frames](frames_real_vs_generated.png)", ""]
    if lv:
        lines += ["## LV area curves", "", "![LV area curves](lv_area_curves.png)", ""]
    if public.get("timing_seconds"):
        lines += ["## Timing (s)", "", ", ".join(f"{k} {v}" for k, v in public["timing_seconds"].items()), ""]
    _atomic_write(paths["report"], "\n".join(lines))
    return paths
