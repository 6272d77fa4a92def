"""Real multi-process DDP: `torchrun --nproc_per_node 2` with gloo on CPU."""
import json
import os
import subprocess
import sys

import numpy as np

from .conftest import ROOT


def test_two_process_ddp_equal_gradients(tmp_path):
    out = tmp_path / "ddp.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           str(ROOT / "tests" / "ddp_worker.py"), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["world"] == 2
    rank0, rank1 = (np.array(g) for g in result["ddp_grads"])
    np.testing.assert_allclose(rank0, rank1)                       # all-reduced: identical on both ranks
    local = np.array(result["local_grads"])
    np.testing.assert_allclose(rank0, local.mean(axis=0), rtol=1e-6)  # = the average of the shards' grads
    assert not np.allclose(local[0], local[1])                     # the shards really differed
    seen = set(result["batches"][0]) | set(result["batches"][1])
    assert len(seen) == 8                                          # DistributedSampler: disjoint shards
    assert result["mean_reduced"] == 0.5
