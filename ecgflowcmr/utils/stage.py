"""One entry for every training stage: device and process group, the prerequisite files, the resume
checks, "already done", and the clean-up (always, in ``finally``). Each stage gives only its body."""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import Config, refuse_other_config
from .checkpoint import checkpoint_to_resume
from .device import select_device
from .dist import cleanup, init_distributed
from .run import require_file, setup_logging, stage_dir

# Keys of a training section (ecg, vae, flow) that may change between a run and its resumption:
# they change neither the model nor the data order, only how long it runs and what it reports.
RESUMABLE_KEYS = frozenset({"epochs", "max_steps", "log_every", "val_every", "num_workers", "ckpt_every",
                            "sample_every", "amp", "snapshot_steps", "grad_checkpoint", "cycle_mode"})


@dataclass
class StageRun:
    """What a stage's body starts from: ``ckpt`` is the checkpoint it continues (None: from scratch)."""
    cfg: Config
    device: torch.device
    out: Path
    log: logging.Logger
    last_path: Path
    ckpt: dict | None


def finished(ckpt: dict, loop) -> bool:
    """Whether ``ckpt`` already completed the run ``loop`` (a ``TrainLoop`` section) asks for."""
    return int(ckpt["epoch"]) >= loop.epochs or bool(loop.max_steps and int(ckpt["step"]) >= loop.max_steps)


def run_stage(cfg: Config, section: str, script: str, resume: bool, fresh: bool,
              body: Callable[[StageRun], dict], done: Callable[[StageRun], dict],
              requires: tuple[tuple[Path, str], ...] = (), also: tuple[str, ...] = ()) -> dict:
    """Run stage ``section`` (writing ``runs/<exp>/<section>/``) of ``script``.

    ``requires``: (file, what writes it) checked first. ``last.pt`` is continued unless ``fresh``;
    a checkpoint written with other ``section`` keys (besides ``RESUMABLE_KEYS``) or other ``also``
    keys is refused before anything is written. A finished run returns ``done(run)``; otherwise
    ``body(run)``. The process group is torn down however the stage ends.
    """
    device = select_device(cfg.device)
    init_distributed(device)
    try:
        for path, writer in requires:
            require_file(path, writer)
        last_path = cfg.stage_dir(section) / "last.pt"
        ckpt = checkpoint_to_resume(last_path, resume, fresh, script)
        if ckpt is not None:             # before anything is written over the run's config
            refuse_other_config(ckpt, cfg, last_path, section, RESUMABLE_KEYS, also,
                                f"Start over with {script} --fresh (or delete '{last_path.parent}')")
        out = stage_dir(cfg, section)
        log = setup_logging(out / "train.log")
        run = StageRun(cfg, device, out, log, last_path, ckpt)
        if ckpt is not None and finished(ckpt, getattr(cfg, section)):
            log.info("%s: already complete (%d epochs, %d steps in %s); nothing to do (%s --fresh starts over)",
                     section, int(ckpt["epoch"]), int(ckpt["step"]), last_path, script)
            return done(run)
        if ckpt is not None:
            log.info("resuming %s at epoch %d, step %d (%s --fresh starts over)", last_path, int(ckpt["epoch"]),
                     int(ckpt["step"]), script)
        return body(run)
    finally:
        cleanup()
