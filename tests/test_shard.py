"""Work after a training stage is sharded over torchrun ranks (2-process gloo): the latents of
every split and the ECG-token cache equal the single-process ones, each rank did part of them, and
a 2-process run resumes a single-process extraction without redoing its rows."""
import json
import os
import subprocess
import sys

import numpy as np
import torch

from ecgflowcmr.data.datasets import Prepared
from ecgflowcmr.flow.trainer import ConditionCache
from ecgflowcmr.vae import VAE3D
from ecgflowcmr.vae.latents import extract_all

from .conftest import ROOT, write_fake_prepared
from .flow_fakes import FakeECGEncoder
from .test_vae import interrupted_extraction


def tiny_vae() -> VAE3D:
    """One level (the 8x is a pixel-unshuffle): cheap enough for two ranks on a busy CPU."""
    torch.manual_seed(0)
    return VAE3D(latent_channels=3, base_channels=4, channel_mult=[1], temporal_levels=0, attention=False).eval()


def test_two_ranks_share_latent_extraction_and_token_cache(tmp_path):
    data = write_fake_prepared(tmp_path / "data", n=14)
    device = torch.device("cpu")
    reference = extract_all(tiny_vae(), data, tmp_path / "ref" / "latents", device, batch_size=2, progress=False)
    torch.manual_seed(0)
    prepared = Prepared(data)
    ConditionCache.build(tmp_path / "ref" / "cache", FakeECGEncoder(), prepared.ecg, prepared.split_indices("train"),
                         device, batch_size=2)

    run = tmp_path / "run"                                 # a single-process run, interrupted
    interrupted_extraction(tiny_vae(), data, run / "latents", batch_size=2)
    assert np.load(run / "latents" / "train.done.npy").sum() == 4

    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           str(ROOT / "tests" / "shard_worker.py"), str(data), str(run)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((run / f"rank{r}.json").read_text()) for r in (0, 1)]
    n_all, n_train = len(prepared), len(prepared.split_indices("train"))
    assert all(r["world"] == 2 and r["latents"] > 0 and r["tokens"] > 0 for r in ranks)
    assert sum(r["latents"] for r in ranks) == n_all - 4          # the interrupted run's rows are kept
    assert sum(r["tokens"] for r in ranks) == n_train == ranks[0]["rows"]
    for split in ("train", "val", "test"):
        np.testing.assert_allclose(np.load(run / "latents" / f"{split}.npy"),
                                   np.load(tmp_path / "ref" / "latents" / f"{split}.npy"), rtol=1e-5, atol=1e-6)
        assert json.loads((run / "latents" / f"{split}.progress.json").read_text())["complete"]
    template = torch.load(run / "latents" / "template.pt", weights_only=True)
    torch.testing.assert_close(template["template"], reference["template"])
    sharded, single = ConditionCache(run / "cache"), ConditionCache(tmp_path / "ref" / "cache")
    assert ConditionCache.valid(run / "cache", n_train)
    np.testing.assert_allclose(sharded.tokens, single.tokens, rtol=1e-5, atol=1e-6)
    for name in ("pooled", "start", "end", "fallback"):
        np.testing.assert_array_equal(getattr(sharded, name), getattr(single, name))


def test_process_group_waits_long_enough_for_rank_zero(monkeypatch):
    """Rank 0's own work between two barriers may pass NCCL's 10-minute default at paper size."""
    from ecgflowcmr.utils import dist

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist.dist, "init_process_group", lambda **kw: calls.append(kw))
    monkeypatch.setattr(dist, "_RAN_PROCESS_GROUP", False)
    assert dist.init_distributed(torch.device("cuda"))
    assert calls == [{"backend": "nccl", "timeout": dist.TIMEOUT}]
    assert dist.TIMEOUT.total_seconds() >= 3600
