"""Run by tests/test_stages_ddp.py under `torchrun --nproc_per_node 2` (gloo, CPU).

Trains the three stages in turn, each through its real ``train`` entry point and one process group,
until their configs' ``max_steps``; every rank writes what its validation returned.
"""
import json
import sys
from pathlib import Path

import pytest

from ecgflowcmr.ecg import train as ecg_train
from ecgflowcmr.flow import trainer as flow_trainer
from ecgflowcmr.utils import dist, stage
from ecgflowcmr.utils.device import select_device
from ecgflowcmr.vae import trainer as vae_trainer
from tests.flow_fakes import use_bridges
from tests.test_stages_ddp import TIMING, stage_configs


def main(root: str) -> None:
    device = select_device("cpu")
    assert dist.init_distributed(device), "expected to run under torchrun with WORLD_SIZE=2"
    mp = pytest.MonkeyPatch()
    for module in (stage, dist):                        # one process group for the three stages
        mp.setattr(module, "cleanup", dist.barrier)
    use_bridges(mp, real_ecg=False, real_vae=False)
    cfgs = stage_configs(Path(root), ddp=True)
    result = {"world": dist.world_size(),
              "ecg": ecg_train.train(cfgs["ecg"]),
              "vae": vae_trainer.train(cfgs["vae"], extract=False)["val"],
              "flow": {k: v for k, v in flow_trainer.train(cfgs["flow"])["history"][-1].items() if k not in TIMING}}
    (Path(root) / f"rank{dist.rank()}.json").write_text(json.dumps(result))
    mp.undo()


if __name__ == "__main__":
    main(sys.argv[1])
    dist.exit_process(0)
