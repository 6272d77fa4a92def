"""Run directories, logging, and the "refuse without the previous stage" check."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from ..config import Config, save_config
from .dist import is_main


def setup_logging(log_file: str | Path | None = None, name: str = "ecgflowcmr") -> logging.Logger:
    """Rank-0 logs INFO to stderr and ``log_file``; other ranks only WARNING to stderr."""
    logger = logging.getLogger(name)
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if is_main() else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(fmt)
    logger.addHandler(stream)
    if log_file is not None and is_main():
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_file)
        handler.setFormatter(fmt)
        logger.addHandler(handler)
    return logger


def stage_dir(cfg: Config, stage: str, save_resolved: bool = True) -> Path:
    """Create ``runs/<exp>/<stage>/`` and write the resolved config there (rank 0)."""
    out = cfg.stage_dir(stage)
    if is_main():
        out.mkdir(parents=True, exist_ok=True)
        if save_resolved:
            save_config(cfg, out / "config.yaml")
    return out


def require_file(path: str | Path, written_by: str) -> Path:
    """Refuse to run without an earlier stage's output, naming the file and the stage."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"'{path}' is missing: it is written by {written_by}. "
                                f"Run that stage first (with the same config / run_dir).")
    return path


def trim_jsonl(path: str | Path, max_step: int | None) -> None:
    """Drop the records of a jsonl log past ``max_step`` (written after the checkpoint a run resumes
    from); records without a step stay. ``max_step=None``: a fresh start, drop everything."""
    path = Path(path)
    if not path.is_file():
        return
    keep = []
    if max_step is not None:
        for line in path.read_text().splitlines():
            try:
                if int(json.loads(line).get("step", 0)) <= max_step:
                    keep.append(line)
            except ValueError:
                continue
    path.write_text("".join(line + "\n" for line in keep))


class JsonlLog:
    """Append-only metrics log (one JSON object per line), rank 0 only."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def write(self, **record) -> None:
        if is_main():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
