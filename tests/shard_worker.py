"""Run by tests/test_shard.py under `torchrun --nproc_per_node 2` (gloo, CPU).

Both ranks extract the latents of a prepared dataset (resuming whatever an earlier run left) and
build the frozen-encoder ECG-token cache of its train split, each doing its share of the rows. Every
rank writes how many rows it encoded.
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch

from ecgflowcmr.data.datasets import Prepared
from ecgflowcmr.flow.trainer import ConditionCache
from ecgflowcmr.utils import dist
from ecgflowcmr.utils.device import select_device
from ecgflowcmr.vae.latents import extract_all
from tests.flow_fakes import FakeECGEncoder
from tests.test_shard import tiny_vae


def main(data_root: str, out_dir: str) -> None:
    device = select_device("cpu")
    assert dist.init_distributed(device), "expected to run under torchrun with WORLD_SIZE=2"
    out = Path(out_dir)
    vae = tiny_vae()
    encoded = {"latents": 0, "tokens": 0}
    original = vae.encode

    def counting_encode(x):
        encoded["latents"] += x.shape[0]
        return original(x)

    vae.encode = counting_encode
    extract_all(vae, data_root, out / "latents", device, batch_size=2, progress=False)
    torch.manual_seed(0)
    encoder = FakeECGEncoder()
    forward = encoder.forward

    def counting_forward(ecg):
        encoded["tokens"] += ecg.shape[0]
        return forward(ecg)

    encoder.forward = counting_forward
    prepared = Prepared(data_root)
    ConditionCache.build(out / "cache", encoder, prepared.ecg, prepared.split_indices("train"), device,
                         batch_size=2)
    (out / f"rank{dist.rank()}.json").write_text(json.dumps({
        "world": dist.world_size(), **encoded,
        "rows": int(np.load(out / "cache" / "tokens.npy").shape[0])}))


if __name__ == "__main__":
    main(*sys.argv[1:])
    dist.exit_process(0)
