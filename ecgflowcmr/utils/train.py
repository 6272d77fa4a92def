"""Small pieces every training loop uses: AdamW + cosine/warm-up schedule, EMA, grad clipping."""
from __future__ import annotations

import copy
import math

import torch


def build_optimizer(params, lr: float, weight_decay: float, betas=(0.9, 0.999)) -> torch.optim.AdamW:
    """AdamW with decay only on matrices (weights), not on biases / norms / embeddings of dim < 2."""
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas)


def cosine_schedule(optimizer, warmup_steps: int, total_steps: int, min_ratio: float = 0.0):
    """Linear warm-up to the base lr over ``warmup_steps``, then cosine decay to ``min_ratio``."""
    total_steps = max(total_steps, 1)

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class EMA(torch.nn.Module):
    """Exponential moving average of a model's parameters (buffers copied), kept in fp32."""

    def __init__(self, model: torch.nn.Module, decay: float = 0.999):
        super().__init__()
        self.decay = self.target = decay      # decay: the current one (a loop may warm it up to target)
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        from .dist import unwrap

        model = unwrap(model)
        for ema_p, p in zip(self.module.parameters(), model.parameters()):
            ema_p.lerp_(p.detach().to(ema_p.dtype), 1 - self.decay)
        for ema_b, b in zip(self.module.buffers(), model.buffers()):
            ema_b.copy_(b)

    def state_dict(self, *args, **kwargs):
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True):
        return self.module.load_state_dict(state_dict, strict=strict)


def optimizer_step(loss: torch.Tensor, optimizer, scheduler, params, max_norm: float) -> torch.Tensor:
    """backward, clip (``max_norm`` <= 0: only measure), step the optimiser and the scheduler;
    returns the grad norm as a device tensor (no host sync)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    norm = clip_grad(params, max_norm, sync=False)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return norm


def clip_grad(params, max_norm: float, sync: bool = True) -> float | torch.Tensor:
    """Clip the global grad norm of ``params`` (skipped when max_norm <= 0); returns the norm, as a
    float, or with ``sync=False`` as a device tensor (reading it waits for the GPU: do it rarely)."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0 if sync else torch.zeros(())
    if max_norm <= 0:
        norm = torch.norm(torch.stack([p.grad.norm() for p in params]))
    else:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return float(norm) if sync else norm.detach()
