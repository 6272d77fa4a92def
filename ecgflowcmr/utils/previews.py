"""Animated previews: the generated cine beside the ECG that drove it, with a moving time cursor.

Layout of every frame (RGB, drawn with PIL; the static ECG panel is rendered once, so a 50-frame
GIF costs milliseconds, not a matplotlib figure per frame)::

    +-----------+-------------------------------------------+
    |           | lead II, whole 10 s record; the chosen     |
    |   cine    | R-R cycle shaded, cursor moving inside it  |
    | frame k   +-------------------------------------------+
    | (2x)      | the chosen cycle zoomed, cursor at the     |
    |           | ECG time of frame k: start + k/50 * RR     |
    +-----------+-------------------------------------------+

Frame ``k`` of the cine (frame 0 = R-peak) sits at ECG sample ``start + k * (end - start) / 50``.
GIF frame duration is the real frame interval (RR / 50), so the preview plays at heart speed.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..contract import ECG_FS
from ..contract import LEADS as LEAD_NAMES

BG = (12, 12, 16)
TRACE = (120, 230, 140)
SHADE = (30, 45, 90)
CURSOR = (255, 70, 60)
TEXT = (220, 220, 220)
GRID = (40, 40, 48)


def _trace_points(signal: np.ndarray, x0: int, y0: int, width: int, height: int) -> list[tuple[float, float]]:
    """Polyline of ``signal`` scaled into the box (robust range, min-max by percentiles)."""
    sig = np.asarray(signal, dtype=np.float64)
    if sig.size == 0 or not np.all(np.isfinite(sig)):
        sig = np.nan_to_num(sig)
    lo, hi = np.percentile(sig, 0.5), np.percentile(sig, 99.5)
    if hi - lo < 1e-6:
        lo, hi = lo - 1.0, hi + 1.0
    pad = 0.1 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    n = len(sig)
    # at most ~2 points per pixel: min/max envelope keeps QRS spikes visible
    bins = max(1, min(n, 2 * width))
    edges = np.linspace(0, n, bins + 1).astype(int)
    pts = []
    for i in range(bins):
        seg = sig[edges[i]:max(edges[i + 1], edges[i] + 1)]
        x = x0 + (i + 0.5) * width / bins
        for v in ((seg.min(), seg.max()) if i % 2 == 0 else (seg.max(), seg.min())):
            pts.append((x, y0 + height - (v - lo) / (hi - lo) * height))
    return pts


def preview_frames(cine: np.ndarray, ecg: np.ndarray, start: int, end: int, lead: int = 1,
                   scale: int = 2, title: str = "", fallback: bool = False) -> list[np.ndarray]:
    """RGB frames ``(H, W, 3)`` uint8 for a cine ``(1, T, H, W)`` / ``(T, H, W)`` in [-1, 1] and
    its ECG ``(12, 5000)``; ``start, end``: the chosen cycle in samples."""
    cine = np.asarray(cine, dtype=np.float32)
    if cine.ndim == 4:
        cine = cine[0]
    n_frames, ch, cw = cine.shape
    ecg = np.asarray(ecg, dtype=np.float32)
    n = ecg.shape[-1]
    start, end = int(start), int(end)
    if not (0 <= start < end <= n):                # nothing sensible: use the whole record
        start, end = 0, n
    img_w, img_h = cw * scale, ch * scale
    panel_w = 2 * img_w
    top_h, bottom_h = img_h * 2 // 5, img_h - img_h * 2 // 5
    width, height = img_w + panel_w, img_h
    font = ImageFont.load_default()

    # -- static background -------------------------------------------------------------------
    bg = Image.new("RGB", (width, height), BG)
    draw = ImageDraw.Draw(bg)
    px = lambda s: img_w + s / n * panel_w          # noqa: E731  sample -> x, top strip
    draw.rectangle([px(start), 0, px(end), top_h - 1], fill=SHADE)
    for sec in range(1, int(n / ECG_FS)):
        draw.line([(px(sec * ECG_FS), 0), (px(sec * ECG_FS), top_h - 1)], fill=GRID)
    lead_name = LEAD_NAMES[lead] if lead < len(LEAD_NAMES) else str(lead)
    draw.line(_trace_points(ecg[lead], img_w, 14, panel_w, top_h - 18), fill=TRACE, width=1)
    draw.text((img_w + 4, 1), f"lead {lead_name}, {n / ECG_FS:.0f} s", fill=TEXT, font=font)
    draw.line([(img_w, top_h), (width, top_h)], fill=GRID)
    cyc = ecg[lead, start:end]
    draw.line(_trace_points(cyc, img_w, top_h + 14, panel_w, bottom_h - 18), fill=TRACE, width=2)
    rr_ms = (end - start) / ECG_FS * 1000
    label = f"chosen cycle RR={rr_ms:.0f} ms" + ("  [fallback window]" if fallback else "")
    draw.text((img_w + 4, top_h + 2), label, fill=TEXT, font=font)
    if title:
        draw.text((4, height - 12), title[:40], fill=TEXT, font=font)
    base = np.asarray(bg).copy()

    # -- per frame ----------------------------------------------------------------------------
    gray = np.clip((cine + 1.0) * 127.5, 0, 255).astype(np.uint8)
    frames = []
    for k in range(n_frames):
        frame = base.copy()
        tile = np.repeat(np.repeat(gray[k], scale, 0), scale, 1)
        frame[:img_h, :img_w] = tile[..., None]
        s = start + k * (end - start) / n_frames
        x_top = int(round(px(s)))
        x_bot = int(round(img_w + (s - start) / (end - start) * (panel_w - 1)))
        frame[:top_h, max(x_top - 1, img_w):min(x_top + 1, width)] = CURSOR
        frame[top_h + 1:, max(x_bot - 1, img_w):min(x_bot + 1, width)] = CURSOR
        frames.append(frame)
    # frame counter drawn on the cine tile
    for k, frame in enumerate(frames):
        im = Image.fromarray(frame)
        ImageDraw.Draw(im).text((3, 2), f"{k:02d}/{n_frames}", fill=CURSOR, font=font)
        frames[k] = np.asarray(im)
    return frames


def save_gif(frames: list[np.ndarray], path: str | os.PathLike, frame_ms: float = 20.0) -> None:
    """Write RGB frames as a looping GIF (one shared palette), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [Image.fromarray(f) for f in frames]
    palette = images[0].quantize(colors=255, method=Image.Quantize.MEDIANCUT)
    paletted = [im.quantize(palette=palette, dither=Image.Dither.NONE) for im in images]
    tmp = path.with_name(path.name + ".tmp.gif")
    paletted[0].save(tmp, format="GIF", save_all=True, append_images=paletted[1:],
                     duration=max(20, int(round(frame_ms / 10.0)) * 10), loop=0, disposal=1)
    os.replace(tmp, path)


def save_preview(path: str | os.PathLike, cine: np.ndarray, ecg: np.ndarray, start: int, end: int,
                 title: str = "", fallback: bool = False, lead: int = 1) -> None:
    """One call: frames for ``cine`` + ``ecg`` and the chosen cycle, saved as a GIF at heart speed."""
    frames = preview_frames(cine, ecg, start, end, lead=lead, title=title, fallback=fallback)
    n_frames = len(frames)
    rr_ms = (int(end) - int(start)) / ECG_FS * 1000 if 0 <= int(start) < int(end) else 1000.0
    save_gif(frames, path, frame_ms=rr_ms / n_frames)
