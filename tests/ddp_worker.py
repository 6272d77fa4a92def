"""Run by tests/test_ddp.py under `torchrun --nproc_per_node 2` (gloo, CPU).

Each rank trains the same model on its own shard; DDP must average gradients so that every rank
ends with identical gradients and parameters, and only rank 0 writes the result file.
"""
import json
import sys

import torch

from ecgflowcmr.utils import dist
from ecgflowcmr.utils.device import select_device
from ecgflowcmr.utils.seed import seed_everything


def main(out_path: str) -> None:
    device = select_device("cpu")
    assert dist.init_distributed(device), "expected to run under torchrun with WORLD_SIZE=2"
    seed_everything(0)  # same initial weights on every rank
    model = dist.wrap_ddp(torch.nn.Linear(4, 1), device)
    data = torch.utils.data.TensorDataset(torch.arange(16, dtype=torch.float32).view(16, 1).repeat(1, 4))
    loader = dist.make_loader(data, batch_size=4, train=True, seed=0)
    dist.set_loader_epoch(loader, 0)
    (batch,) = next(iter(loader))
    loss = model(batch).pow(2).mean()
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    local_grad = torch.autograd.grad(dist.unwrap(model)(batch).pow(2).mean(), list(model.parameters()))
    local_grad = torch.cat([g.flatten() for g in local_grad])
    gathered = [torch.zeros_like(grads) for _ in range(dist.world_size())]
    torch.distributed.all_gather(gathered, grads)
    local_gathered = [torch.zeros_like(local_grad) for _ in range(dist.world_size())]
    torch.distributed.all_gather(local_gathered, local_grad)
    seen = [torch.zeros(4) for _ in range(dist.world_size())]
    torch.distributed.all_gather(seen, batch[:, 0].contiguous())
    if dist.is_main():
        with open(out_path, "w") as f:
            json.dump({"world": dist.world_size(),
                       "ddp_grads": [g.tolist() for g in gathered],
                       "local_grads": [g.tolist() for g in local_gathered],
                       "batches": [s.tolist() for s in seen],
                       "mean_reduced": dist.all_reduce_mean(float(dist.rank()))}, f)
    else:
        dist.all_reduce_mean(float(dist.rank()))
    dist.cleanup()


if __name__ == "__main__":
    main(sys.argv[1])
    dist.exit_process(0)
