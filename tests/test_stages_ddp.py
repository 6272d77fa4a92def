"""Every stage under real 2-process DDP (`torchrun`, gloo on CPU), then resumed on one process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from ecgflowcmr.config import load_config

from .conftest import ROOT, write_fake_prepared

TIMING = {"seconds", "epoch_seconds", "cpu_seconds"}


def stage_configs(root: Path, ddp: bool) -> dict:
    """Tiny configs of the three stages; ``ddp``: the first part of the run (``max_steps``).

    2 processes: 1 step per epoch in each stage (8 / 6 / 8 train subjects); 1 process: 2 / 3 / 2."""
    from tests.flow_fakes import tiny_config
    from tests.test_pamae import TINY as ECG_TINY
    from tests.test_vae import TINY as VAE_TINY

    stop = ["ecg.max_steps=2", "vae.max_steps=1", "flow.max_steps=2"] if ddp else []
    return {"ecg": load_config(None, ECG_TINY + [f"run_dir={root / 'ecg_run'}", f"data.root={root / 'ecg_data'}",
                                                 "ecg.epochs=3", "ecg.log_every=1", *stop[:1]]),
            "vae": load_config(ROOT / "configs" / "demo.yaml",
                               VAE_TINY + [f"run_dir={root / 'vae_run'}", f"data.root={root / 'vae_data'}",
                                           "vae.epochs=2", "vae.disc_start=0", *stop[1:2]]),
            "flow": tiny_config(root / "flow_run", "flow.epochs=3", "flow.sample_every=0", *stop[2:])}


def test_every_stage_trains_under_two_process_ddp_and_resumes_on_one(tmp_path, monkeypatch):
    from ecgflowcmr.ecg import train as ecg_train
    from ecgflowcmr.flow import trainer as flow_trainer
    from ecgflowcmr.vae import trainer as vae_trainer
    from tests.flow_fakes import build_run, use_bridges
    from tests.test_pamae import write_synthetic_prepared

    write_synthetic_prepared(tmp_path / "ecg_data", n=12)
    write_fake_prepared(tmp_path / "vae_data", n=10)
    build_run(tmp_path / "flow_run", n=12, real_ecg=False, real_vae=False)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           str(ROOT / "tests" / "stages_ddp_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == 2 and ranks[0] == ranks[1]           # every rank validated to the same numbers
    runs = {"ecg": ("ecg_run/ecg", "mask_rng", 2), "vae": ("vae_run/vae", None, 1),
            "flow": ("flow_run/flow", "flow_rng", 2)}
    for stage, (folder, rng_key, steps) in runs.items():
        ckpt = torch.load(tmp_path / folder / "last.pt", weights_only=True)
        assert (ckpt["step"], ckpt["epoch"], ckpt["extra"]["epoch_step"]) == (steps, steps, 0), stage
        assert len(ckpt["extra"]["rng_per_rank"]) == 2, stage
        if rng_key:                                                  # one stream per rank, saved per rank
            states = ckpt["extra"][rng_key]
            assert len(states) == 2 and not torch.equal(states[0], states[1]), stage

    # another world size: one process continues each run to its end (fresh random streams, a warning)
    use_bridges(monkeypatch, real_ecg=False, real_vae=False)
    cfgs = stage_configs(tmp_path, ddp=False)
    ecg_train.train(cfgs["ecg"])
    vae_trainer.train(cfgs["vae"], extract=False)
    flow_trainer.train(cfgs["flow"])
    for stage, (folder, rng_key, steps) in runs.items():
        ckpt = torch.load(tmp_path / folder / "last.pt", weights_only=True)
        epochs = cfgs[stage].to_dict()[stage]["epochs"]
        spe = {"ecg": 2, "vae": 3, "flow": 2}[stage]
        assert (ckpt["epoch"], ckpt["step"]) == (epochs, steps + (epochs - steps) * spe), stage
        assert len(ckpt["extra"]["rng_per_rank"]) == 1
        assert (tmp_path / folder / "best.pt").is_file()
        if rng_key:
            assert "not bit-exact" in (tmp_path / folder / "train.log").read_text(), stage
