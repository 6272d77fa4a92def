"""Run by tests/test_vae.py under `torchrun --nproc_per_node 2` (gloo, CPU).

Each rank takes VAE + PatchGAN steps on its own cines (GAN off at step 0, on at step 1). DDP must
keep the VAE and the discriminator identical on both ranks; rank 0 writes the largest difference.
"""
import json
import sys

import torch

from ecgflowcmr.config import load_config
from ecgflowcmr.utils import dist
from ecgflowcmr.utils.device import select_device
from ecgflowcmr.utils.seed import seed_everything
from ecgflowcmr.vae.trainer import VAETrainer


def flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def main(config: str, out_path: str, *overrides: str) -> None:
    device = select_device("cpu")
    assert dist.init_distributed(device), "expected to run under torchrun with WORLD_SIZE=2"
    seed_everything(0)                      # same initial weights on every rank
    cfg = load_config(config, list(overrides))
    trainer = VAETrainer(cfg, device, total_steps=3)
    gen = torch.Generator().manual_seed(100 + dist.rank())
    stats = [trainer.train_step(torch.rand(1, 1, 50, 96, 96, generator=gen) * 2 - 1) for _ in range(2)]
    result = {"world": dist.world_size(), "gan": [trainer.gan_active(s) for s in (0, 1)],
              "d_loss": [float(s["d_loss"]) for s in stats]}
    for name, module in (("vae", trainer.model), ("disc", trainer.disc)):
        mine = flat(module)
        gathered = [torch.zeros_like(mine) for _ in range(dist.world_size())]
        torch.distributed.all_gather(gathered, mine)
        result[f"{name}_max_diff"] = float((gathered[0] - gathered[1]).abs().max())
    rec = torch.tensor([stats[-1]["rec"]])
    recs = [torch.zeros(1) for _ in range(dist.world_size())]
    torch.distributed.all_gather(recs, rec)
    result["rec_per_rank"] = [float(r) for r in recs]
    if dist.is_main():
        with open(out_path, "w") as f:
            json.dump(result, f)
    dist.cleanup()


if __name__ == "__main__":
    main(*sys.argv[1:])
    dist.exit_process(0)
