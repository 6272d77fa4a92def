"""One training loop for the three stages: ``Trainer`` runs it, a ``Stage`` plugs in what is its own.

A stage gives its model, ``batch -> loss`` (``train_step``, which also takes its optimiser step:
the VAE takes two), its validation metrics, the score that picks ``best.pt`` and its figures.
The loop owns the rest, the same for every stage and for 1..N processes (``torchrun``):

* epochs and steps: ``epochs`` bound the run, ``max_steps`` (> 0) stops it early, also inside an
  epoch; ``stop_after_epochs`` returns as if the process had been killed (tests of resume);
* EMA of the stage's model (``stage.ema``), with a warm-up of the decay;
* validation every ``val_every`` epochs and when the run stops, on every rank (a stage shards it or
  repeats it; every rank gets the same numbers);
* ``last.pt`` at every epoch end (and every ``ckpt_every`` steps, and at ``snapshot_steps`` under
  ``snapshots/``), ``best.pt`` when the score improves (or when none exists yet). A checkpoint is
  ``make_checkpoint``'s dict: model, optimiser(s), scheduler(s), EMA, step, epoch, config, RNG and
  ``extra`` (best score, position in the epoch, history, per-rank RNG states);
* exact resume: the data order depends only on (seed, epoch), the position inside the epoch is
  skipped, and every rank restores its own RNG states (global and the stage's generator). Another
  world size resumes too, from fresh per-rank streams (not bit-exact; a warning says so); CUDA
  generator states are restored only for devices that exist;
* logging with few host syncs: statistics stay on the device and are read every ``log_every``
  steps and at epoch ends. Only rank 0 logs and saves.

AMP (bf16 autocast on CUDA, none on CPU) is ``utils.device.autocast`` inside ``train_step``.
"""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from . import dist as udist
from .checkpoint import atomic_save, make_checkpoint, restore_checkpoint
from .run import JsonlLog, trim_jsonl
from .seed import rng_state, set_rng_state
from .train import EMA

SEED_STRIDE = 7919          # reseeding a stage generator at another world size: + SEED_STRIDE * step


class Stage:
    """What a stage plugs into ``Trainer`` (override what applies).

    Attributes: ``model`` (unwrapped; DDP wrapping is the stage's), ``ema`` (``EMA`` or None),
    ``generator`` (a per-rank ``torch.Generator`` the stage draws from, or None) with ``rng_key``
    (its name in ``extra``) and ``rng_seed`` (its seed before ``+ rank``), ``best_key`` (the name
    of the best score in ``extra``), ``epoch_means`` (the statistics averaged into the epoch
    record; None: all of them)."""

    name = "stage"
    model: torch.nn.Module
    ema: EMA | None = None
    generator: torch.Generator | None = None
    rng_key = ""
    rng_seed = 0
    best_key = "best_val"
    epoch_means: tuple[str, ...] | None = None

    def train_mode(self) -> None:
        self.model.train()

    def train_step(self, batch, step: int) -> dict:
        """One optimisation step on ``batch`` (``step`` = steps done before it); returns scalar
        statistics as device tensors (or floats): read only when logged, so no sync here."""
        raise NotImplementedError

    def validate(self) -> dict[str, float]:
        """Validation metrics, called on every rank; they must agree across ranks."""
        return {}

    def score(self, record: dict) -> float:
        """Lower is better; nan: nothing to validate on (the latest weights count as best)."""
        return record.get("val_loss", math.nan)

    def state(self) -> dict:
        """Objects with a state dict, as ``make_checkpoint`` / ``restore_checkpoint`` keywords."""
        return {}

    def extra(self) -> dict:
        """Stage data stored in the checkpoint's ``extra`` (hashes, ...)."""
        return {}

    def checkpoint(self, ckpt: dict, best: bool) -> dict:
        """Last touches to a checkpoint before it is written (``best``: for ``best.pt``)."""
        return ckpt

    def describe(self, record: dict) -> str:
        """The log line of an epoch record."""
        return " ".join(f"{k} {v:.5g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items())

    def on_epoch_end(self, record: dict, validated: bool, stopping: bool, finished: bool) -> None:
        """Figures / previews (rank 0, after validation, before the checkpoint is written).
        ``finished``: the epoch ran to its end (else ``max_steps`` stopped it)."""


@dataclass
class LoopSettings:
    epochs: int
    max_steps: int = 0              # > 0: stop after this many steps in all
    log_every: int = 50
    val_every: int = 1
    ckpt_every: int = 0             # > 0: also write last.pt every this many steps inside an epoch
    snapshot_steps: tuple[int, ...] = ()
    ema_warmup: bool = True         # EMA decay min(decay, (1 + step) / (10 + step))
    step_log: str = ""              # jsonl file (in the stage folder) for the step records; "" = text log only


@dataclass
class LoopState:
    step: int = 0
    epoch: int = 0
    epoch_step: int = 0             # steps done inside ``epoch``
    best: float = math.inf
    history: list = field(default_factory=list)
    last_val: dict = field(default_factory=dict)


class Trainer:
    """Runs ``stage`` over ``loader`` (a ``dist.make_loader``) and writes ``out_dir/{last,best}.pt``
    and ``out_dir/log.jsonl``; ``config``: the resolved config dict stored in checkpoints."""

    def __init__(self, stage: Stage, loader, settings: LoopSettings, out_dir: Path, config: dict,
                 seed: int, device: torch.device, log):
        self.stage, self.loader, self.settings = stage, loader, settings
        self.out_dir, self.config, self.seed, self.device, self.log = Path(out_dir), config, seed, device, log
        self.last_path, self.best_path = self.out_dir / "last.pt", self.out_dir / "best.pt"
        self.history_log = JsonlLog(self.out_dir / "log.jsonl")
        self.step_log = JsonlLog(self.out_dir / settings.step_log) if settings.step_log else None
        self.steps_per_epoch = max(1, len(loader))
        self.state = LoopState()
        self.first_loss: float | None = None

    # -- checkpoints ----------------------------------------------------------------------------
    def restore(self, ckpt: dict | None) -> None:
        """Continue from ``ckpt`` (None: a fresh start). Log records past its step are dropped."""
        for log in (self.history_log, self.step_log):
            if log is not None and udist.is_main():
                trim_jsonl(log.path, int(ckpt["step"]) if ckpt is not None else None)
        if ckpt is None:
            return
        stage, s, extra = self.stage, self.state, ckpt.get("extra", {})
        s.step, s.epoch = restore_checkpoint(ckpt, stage.model, ema=stage.ema, **stage.state())
        s.epoch_step = int(extra.get("epoch_step", 0))
        s.best = float(extra.get(stage.best_key, math.inf))
        s.history, s.last_val = list(extra.get("history", [])), dict(extra.get("val", {}))
        self._restore_rng(extra)

    def _restore_rng(self, extra: dict) -> None:
        rank, world, stage = udist.rank(), udist.world_size(), self.stage
        per_rank = extra.get("rng_per_rank") or []
        if len(per_rank) == world:            # else make_checkpoint's (rank 0's) state, set above
            set_rng_state(per_rank[rank])
        if stage.generator is None:
            return
        saved = extra.get(stage.rng_key, [])
        saved = saved if isinstance(saved, list) else [saved]          # older checkpoints: one state
        if len(saved) == world and saved[rank].numel() == stage.generator.get_state().numel():
            stage.generator.set_state(saved[rank])
        else:
            self.log.warning("the checkpoint has %s states of %d processes, this run has %d on %s: its random "
                             "stream continues from a fresh generator (not bit-exact)", stage.rng_key,
                             len(saved), world, self.device.type)
            stage.generator.manual_seed(stage.rng_seed + rank + SEED_STRIDE * self.state.step)

    def _gather_rng(self) -> dict:
        """Every rank's RNG states (a collective: every rank calls it)."""
        out = {"rng_per_rank": udist.all_gather_object(rng_state())}
        if self.stage.generator is not None:
            out[self.stage.rng_key] = udist.all_gather_object(self.stage.generator.get_state())
        return out

    def checkpoint(self, rng: dict, best: bool = False) -> dict:
        stage, s = self.stage, self.state
        extra = {stage.best_key: s.best, "epoch_step": s.epoch_step, "steps_per_epoch": self.steps_per_epoch,
                 "val": s.last_val, "history": s.history, **rng, **stage.extra()}
        ckpt = make_checkpoint(stage.model, ema=stage.ema, step=s.step, epoch=s.epoch, config=self.config,
                               extra=extra, **stage.state())
        return stage.checkpoint(ckpt, best)

    def save(self, path: Path | None = None, best: bool = False) -> None:
        """Write ``last.pt`` (or ``path``; with ``best`` also ``best.pt``) on rank 0. Every rank calls it."""
        rng = self._gather_rng()
        if udist.is_main():
            atomic_save(self.checkpoint(rng), path or self.last_path)
            if best:
                atomic_save(self.checkpoint(rng, best=True), self.best_path)

    # -- the loop -------------------------------------------------------------------------------
    def done(self) -> bool:
        s, cfg = self.state, self.settings
        return s.epoch >= cfg.epochs or bool(cfg.max_steps and s.step >= cfg.max_steps)

    def fit(self, stop_after_epochs: int | None = None) -> LoopState:
        """Train until ``done()`` (or ``stop_after_epochs`` epochs of this call); returns the state."""
        self.started, self.cpu_started = time.time(), time.process_time()
        if self.settings.snapshot_steps and udist.is_main():
            (self.out_dir / "snapshots").mkdir(parents=True, exist_ok=True)
        epochs = 0
        while not self.done() and (stop_after_epochs is None or epochs < stop_after_epochs):
            epoch_started = time.time()
            sums, count = self._run_epoch()
            self._end_epoch(sums, count, time.time() - epoch_started)
            epochs += 1
        return self.state

    def _run_epoch(self) -> tuple[dict, int]:
        s, cfg, stage = self.state, self.settings, self.stage
        udist.set_loader_epoch(self.loader, s.epoch, seed=self.seed)
        stage.train_mode()
        batches = itertools.islice(iter(self.loader), s.epoch_step, None)       # exact resume inside an epoch
        bar = tqdm(batches, total=self.steps_per_epoch, initial=s.epoch_step, disable=not udist.is_main(),
                   desc=f"{stage.name} epoch {s.epoch + 1}/{cfg.epochs}", leave=False, mininterval=2.0)
        sums: dict[str, torch.Tensor | float] = {}  # tensors stay on the device: reading one waits for it
        count = 0
        for batch in bar:
            stats = stage.train_step(batch, s.step)
            s.step, s.epoch_step, count = s.step + 1, s.epoch_step + 1, count + 1
            if stage.ema is not None:
                stage.ema.decay = ema_decay(stage.ema.target, s.step) if cfg.ema_warmup else stage.ema.target
                stage.ema.update(stage.model)
            for key, value in stats.items():
                if stage.epoch_means is None or key in stage.epoch_means:
                    value = value.detach().double() if torch.is_tensor(value) else float(value)
                    sums[key] = sums[key] + value if key in sums else value
            self._after_step(stats, bar)
            if cfg.max_steps and s.step >= cfg.max_steps:
                break
        bar.close()
        return sums, count

    def _after_step(self, stats: dict, bar) -> None:
        s, cfg = self.state, self.settings
        if self.first_loss is None:
            self.first_loss = float(stats["loss"])
        if s.step % max(1, cfg.log_every) == 0:           # the only per-step host syncs
            values = {k: float(v) for k, v in stats.items()}
            bar.set_postfix({k: f"{values[k]:.4f}" for k in list(values)[:3]})
            self.log.info("step %d  %s", s.step, "  ".join(f"{k} {v:.4g}" for k, v in values.items()))
            if self.step_log is not None:
                self.step_log.write(step=s.step, epoch=s.epoch, **values,
                                    seconds=round(time.time() - self.started, 3))
        if s.step in cfg.snapshot_steps:
            self.save(self.out_dir / "snapshots" / f"step_{s.step:06d}.pt")
        elif cfg.ckpt_every and s.step % cfg.ckpt_every == 0 and s.epoch_step < self.steps_per_epoch:
            self.save()
            udist.barrier()

    def _end_epoch(self, sums: dict, count: int, epoch_seconds: float) -> None:
        s, cfg, stage = self.state, self.settings, self.stage
        finished = s.epoch_step >= self.steps_per_epoch
        if finished:
            s.epoch, s.epoch_step = s.epoch + 1, 0
        stopping = self.done()
        record = {"epoch": s.epoch, "step": s.step, "seconds": round(time.time() - self.started, 1),
                  "epoch_seconds": round(epoch_seconds, 1),
                  "cpu_seconds": round(time.process_time() - self.cpu_started, 1)}
        record.update({f"train_{k}": udist.all_reduce_mean(v / max(1, count), self.device)
                       for k, v in sums.items()})
        validated = (finished and s.epoch % max(1, cfg.val_every) == 0) or stopping
        improved = False
        if validated:
            s.last_val = stage.validate()
            record.update({f"val_{k}": v for k, v in s.last_val.items()})
            score = stage.score(record)
            improved = math.isnan(score) or score < s.best
            if improved and not math.isnan(score):
                s.best = score
        s.history.append(record)
        self.history_log.write(**record)
        self.log.info("%s epoch %d step %d: %s%s", stage.name, s.epoch, s.step, stage.describe(record),
                      " (best)" if improved else "")
        if udist.is_main():
            stage.on_epoch_end(record, validated, stopping, finished)
        self.save(best=improved or not self.best_path.is_file())
        udist.barrier()


def ema_decay(target: float, step: int) -> float:
    """EMA warm-up: early averages are not dominated by the random initialisation."""
    return min(target, (1.0 + step) / (10.0 + step))
