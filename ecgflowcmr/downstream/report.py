"""The table (markdown + JSON) in the paper's layout and the metric-vs-ratio plots."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

HIGHER_IS_BETTER = {"acc": True, "auc": True, "r2": True, "mae": False}


def columns_of(rows: dict) -> list[tuple[str, str]]:
    """(task, metric) pairs in a stable order: classification tasks first, then phenotypes."""
    seen: list[tuple[str, str]] = []
    for summary in rows.values():
        for task, metrics in summary["scores"].items():
            for metric in metrics:
                if (task, metric) not in seen:
                    seen.append((task, metric))
    return sorted(seen, key=lambda tm: tm[1] not in ("acc", "auc"))   # stable: first-seen order within


def _cell(entry: dict | None, digits: int) -> str:
    if not entry or entry.get("n", 0) == 0 or math.isnan(entry["mean"]):
        return "n/a"
    return f"{entry['mean']:.{digits}f} ± {entry['std']:.{digits}f}"


def _gain(entry: dict | None, metric: str) -> float | None:
    """A paired difference's mean, signed so that > 0 is better than MAE on real; None if unscored."""
    if not entry or entry.get("n", 0) == 0 or math.isnan(entry["mean"]):
        return None
    return entry["mean"] if HIGHER_IS_BETTER.get(metric, True) else -entry["mean"]


def _difference_cell(entry: dict | None, metric: str) -> str:
    better = _gain(entry, metric)
    if better is None:
        return "n/a"
    digits = 2 if metric == "mae" else 3
    star = "*" if entry["n"] > 1 and better > entry["std"] else ""
    return f"{entry['mean']:+.{digits}f} ± {entry['std']:.{digits}f}{star}"


def tally(vs_real: dict) -> dict:
    """Over the (task, metric) columns of a paired difference: how many are better than MAE on real,
    better by more than one paired std, and worse by more than one."""
    out = {"columns": 0, "better": 0, "better_beyond_std": 0, "worse_beyond_std": 0}
    for metrics in vs_real.values():
        for metric, entry in metrics.items():
            better = _gain(entry, metric)
            if better is None:
                continue
            sure = entry["n"] > 1
            out["columns"] += 1
            out["better"] += better > 0
            out["better_beyond_std"] += sure and better > entry["std"]
            out["worse_beyond_std"] += sure and -better > entry["std"]
    return out


def write_table(result: dict, out_dir: Path) -> tuple[Path, Path]:
    """``downstream.{md,json}``; ``result = {"rows": {row: {"source", "ratio", "counts", "scores"}},
    "setup": {...}}``. Rows as the paper: scratch, MAE on real, then source x ratio."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = result["rows"]
    columns = columns_of(rows)
    header = "| pretraining | synthetic | " + " | ".join(f"{t} {m.upper() if m != 'r2' else 'R²'}"
                                                       for t, m in columns) + " |"
    lines = [header, "|" + "---|" * (len(columns) + 2)]
    for name, row in rows.items():
        label = {"scratch": "ViT from scratch", "real": "MAE, real only"}.get(name, f"MAE + {row['source']}")
        synthetic = "-" if row["ratio"] is None else f"{row['ratio']} % ({row['counts'].get('synthetic', 0)})"
        digits = {"acc": 3, "auc": 3, "r2": 3, "mae": 2}
        cells = [_cell(row["scores"].get(t, {}).get(m), digits.get(m, 3)) for t, m in columns]
        lines.append(f"| {label} | {synthetic} | " + " | ".join(cells) + " |")
    paired = [(name, row) for name, row in rows.items() if row.get("vs_real")]
    if paired:
        lines += ["", "Paired difference to MAE on real (row minus real, fold by fold; mean ± std over folds; "
                  "`*`: the mean is better than 0 by more than one std):", "",
                  header, "|" + "---|" * (len(columns) + 2)]
        for name, row in paired:
            label = "ViT from scratch" if name == "scratch" else f"MAE + {row['source']}"
            synthetic = "-" if row["ratio"] is None else f"{row['ratio']} %"
            cells = [_difference_cell(row["vs_real"].get(t, {}).get(m), m) for t, m in columns]
            lines.append(f"| {label} | {synthetic} | " + " | ".join(cells) + " |")
        lines += ["", "Against MAE on real, over the task-metric columns:", "",
                  "| pretraining | synthetic | better | better by > 1 paired std | worse by > 1 paired std |",
                  "|---|---|---|---|---|"]
        for name, row in paired:
            label = "ViT from scratch" if name == "scratch" else f"MAE + {row['source']}"
            synthetic = "-" if row["ratio"] is None else f"{row['ratio']} %"
            t = row["vs_real_tally"] = tally(row["vs_real"])
            lines.append(f"| {label} | {synthetic} | {t['better']} / {t['columns']} | {t['better_beyond_std']} | "
                         f"{t['worse_beyond_std']} |")
    setup = result.get("setup", {})
    notes = [f"- {k}: {v}" for k, v in setup.items() if not isinstance(v, (dict, list))]
    scored = "linearly probed" if str(setup.get("evaluation", "")).startswith("linear") else "fine-tuned"
    text = "\n".join([f"# Synthetic pretraining: {scored} scores (mean ± std over folds)", "", *lines, "",
                      *notes, ""])
    md, js = out_dir / "downstream.md", out_dir / "downstream.json"
    for path, content in ((md, text), (js, json.dumps(result, indent=1, default=_plain))):
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")      # parallel workers write it too
        tmp.write_text(content)
        os.replace(tmp, path)
    return md, js


def _plain(value):
    return float(value) if hasattr(value, "__float__") else str(value)


def plot(result: dict, out_dir: Path) -> Path | None:
    """``downstream.png``: each (task, metric) against the mixing ratio, one line per source, with
    the scratch and real-only rows as horizontal references (fold std as error bars / bands)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = result["rows"]
    columns = columns_of(rows)
    if not columns:
        return None
    ncol = min(4, len(columns))
    nrow = math.ceil(len(columns) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.6 * ncol, 2.8 * nrow), squeeze=False)
    sources = sorted({r["source"] for r in rows.values() if r["source"] not in (None, "real")})
    for ax, (task, metric) in zip(axes.flat, columns):
        for name, style in (("scratch", ":"), ("real", "--")):
            entry = rows.get(name, {}).get("scores", {}).get(task, {}).get(metric)
            if entry and entry["n"]:
                ax.axhline(entry["mean"], ls=style, color="grey", label=name)
                ax.axhspan(entry["mean"] - entry["std"], entry["mean"] + entry["std"], color="grey", alpha=0.1)
        real = rows.get("real", {}).get("scores", {}).get(task, {}).get(metric)
        for j, source in enumerate(sources):
            shift = (j - (len(sources) - 1) / 2) * 4      # a few % apart: the error bars stay readable
            pts = sorted((r["ratio"], r["scores"].get(task, {}).get(metric)) for r in rows.values()
                         if r["source"] == source)
            if real and real["n"]:
                pts = [(0, real)] + pts
            pts = [(x, e) for x, e in pts if e and e["n"]]
            if pts:
                ax.errorbar([x + shift for x, _ in pts], [e["mean"] for _, e in pts], yerr=[e["std"] for _, e in pts],
                            marker="o", capsize=2, label=source)
        ax.set_title(f"{task} {metric}", fontsize=8)
        ax.set_xlabel("synthetic, % of real", fontsize=7)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(columns):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.tight_layout()
    path = out_dir / "downstream.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
