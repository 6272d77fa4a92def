"""DistributedDataParallel helpers: one training loop for 1..N processes (``torchrun``).

Under ``torchrun --nproc_per_node N`` the environment carries RANK / WORLD_SIZE / LOCAL_RANK;
without it every helper degrades to the single-process case, so the same code path runs on a
laptop CPU and on a GPU box.

Teardown: ``cleanup`` (all ranks meet at a barrier, then the process group is destroyed) and
``exit_process`` (how a worker ends). DDP keeps its process group alive past
``destroy_process_group`` (its reducer holds a reference), so gloo's worker threads outlive the
teardown. A worker thread frees its last finished collective a moment after the collective
returns; if the interpreter is already finalising by then, freeing a Python-owned tensor must
take the GIL, the thread is terminated inside a destructor, and the process dies with SIGABRT
("terminate called without an active exception") after its work is done. A process that ran a
process group therefore ends with ``os._exit`` once its streams are flushed: there is no
finalisation for a late thread to race.
"""
from __future__ import annotations

import datetime
import logging
import os
import sys

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Sampler, SequentialSampler

_RAN_PROCESS_GROUP = False       # this process initialised a process group (see exit_process)
# How long a collective may wait for its slowest rank. NCCL's default (10 min) is shorter than what
# rank 0 alone may do between two barriers at UK Biobank size (the template's statistics over the
# cached latents, checkpoints of the VAE with its discriminator, figures); the sharded work (latents,
# ECG tokens, validation) does not rely on it.
TIMEOUT = datetime.timedelta(minutes=60)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else int(os.environ.get("RANK", 0))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    return rank() == 0


def init_distributed(device: torch.device | None = None) -> bool:
    """Initialise the process group when launched by torchrun (NCCL on CUDA, gloo on CPU)."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) <= 1 or is_distributed():
        return is_distributed()
    global _RAN_PROCESS_GROUP
    backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, timeout=TIMEOUT)
    _RAN_PROCESS_GROUP = True
    return True


def cleanup() -> None:
    """Tear the process group down once every rank is done with it (no rank leaves a peer mid-collective)."""
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()


def exit_process(code: int = 0) -> None:
    """End a stage script with ``code``. After a process group: flush and ``os._exit`` (module docstring)."""
    if not _RAN_PROCESS_GROUP:
        sys.exit(code)
    cleanup()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def wrap_ddp(model: torch.nn.Module, device: torch.device, **kwargs) -> torch.nn.Module:
    """Wrap in DDP when distributed; otherwise return the model unchanged."""
    if not is_distributed():
        return model
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, **kwargs)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank (no-op when not distributed)."""
    if not is_distributed():
        return
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=src)


def all_gather_object(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank; ``[obj]`` when not distributed."""
    if not is_distributed():
        return [obj]
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def all_reduce_mean(value: float | torch.Tensor, device: torch.device | None = None) -> float:
    """Average a scalar over ranks (identity when not distributed)."""
    tensor = torch.as_tensor(value, dtype=torch.float64, device=device)
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= world_size()
    return float(tensor)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch ``epoch``'s draw of training rows: a function of (seed, epoch) alone."""
    return seed * 100003 + epoch


class WeightedEpochSampler(Sampler[int]):
    """Rows drawn with replacement, P(row) proportional to ``weights (N,)``: N draws an epoch over all
    ranks (N // world_size each). The draw depends on (seed, epoch) only: every rank makes the same one
    and takes its strided share, so a resumed run and any world size see the same rows."""

    def __init__(self, weights, seed: int = 0, rank: int = 0, world: int = 1):
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        if self.weights.ndim != 1 or len(self.weights) == 0 or not bool(torch.isfinite(self.weights).all()) \
                or bool((self.weights < 0).any()) or float(self.weights.sum()) <= 0:
            raise ValueError("sampling weights must be a non-empty 1-d array of finite, non-negative numbers "
                             "with a positive sum")
        self.seed, self.rank, self.world, self.epoch = seed, rank, world, 0
        self.num_samples = max(1, len(self.weights) // world)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        rows = torch.multinomial(self.weights, self.num_samples * self.world, replacement=True, generator=generator)
        return iter(rows[self.rank::self.world].tolist())

    def __len__(self) -> int:
        return self.num_samples


def make_loader(dataset: Dataset, batch_size: int, train: bool, seed: int = 0,
                num_workers: int = 0, drop_last: bool | None = None, weights=None) -> DataLoader:
    """DataLoader with a DistributedSampler when distributed (call ``set_epoch`` via ``set_loader_epoch``).

    ``batch_size`` is per process. Training loaders shuffle with a seeded generator so a resumed
    run sees the same order. ``weights (N,)`` (training only): rows drawn with replacement in
    proportion to them (``WeightedEpochSampler``), on one process or many.
    """
    if weights is not None:
        if not train:
            raise ValueError("sampling weights are for training loaders")
        sampler = WeightedEpochSampler(weights, seed, rank(), world_size())
        if len(sampler.weights) != len(dataset):
            raise ValueError(f"{len(sampler.weights)} sampling weights for a dataset of {len(dataset)} rows")
    elif is_distributed():
        sampler = DistributedSampler(dataset, shuffle=train, seed=seed, drop_last=train)
    elif train:
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
    else:
        sampler = SequentialSampler(dataset)
    if drop_last is None:
        drop_last = train and len(dataset) >= batch_size * world_size()
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      drop_last=drop_last, pin_memory=torch.cuda.is_available(),
                      persistent_workers=num_workers > 0)


def set_loader_epoch(loader: DataLoader, epoch: int, seed: int = 0) -> None:
    """Make epoch ``epoch``'s shuffle depend only on (seed, epoch), for exact resume."""
    sampler = loader.sampler
    if isinstance(sampler, (DistributedSampler, WeightedEpochSampler)):
        sampler.set_epoch(epoch)
    elif isinstance(sampler, RandomSampler) and sampler.generator is not None:
        sampler.generator.manual_seed(epoch_seed(seed, epoch))
