"""ODE samplers for the flow (t from 0 at the template anchor to 1 at the data) and guidance.

``integrate(velocity_fn, z0, steps, method)`` on the uniform grid ``t_i = i / steps``:

* ``euler``    (the paper's): ``z += dt * v(z, t)``                              1 call / step
* ``heun``     (trapezoid predictor-corrector)                                 2 calls / step
* ``midpoint`` (explicit midpoint, RK2)                                        2 calls / step
* ``euler_mid`` (the official inference): ``z += dt * v(z, t + dt / 2)``       1 call / step

Heun and midpoint are exact when ``v`` depends on ``t`` only linearly (and not on ``z``); Euler is
exact for a constant ``v`` (checked in ``tests/test_flow_math.py``).

Classifier-free guidance: ``guided_velocity`` returns ``v_u + g * (v_c - v_u)`` with the
conditional and unconditional passes concatenated into ONE forward of batch ``2B``. At ``g == 1``
it returns the conditional prediction and skips the unconditional half (same result, half the
work).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

SAMPLERS = ("euler", "heun", "midpoint", "euler_mid")
VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def nfe_per_step(method: str) -> int:
    return 1 if method in ("euler", "euler_mid") else 2


def _t(value: float, z: torch.Tensor) -> torch.Tensor:
    return torch.full((z.shape[0],), float(value), device=z.device, dtype=torch.float32)


def euler_step(v: VelocityFn, z: torch.Tensor, t: float, dt: float) -> torch.Tensor:
    return z + dt * v(z, _t(t, z))


def euler_mid_step(v: VelocityFn, z: torch.Tensor, t: float, dt: float) -> torch.Tensor:
    """Euler with the velocity read at the step's mid time: the official schedule (i + 0.5) / N."""
    return z + dt * v(z, _t(t + 0.5 * dt, z))


def heun_step(v: VelocityFn, z: torch.Tensor, t: float, dt: float) -> torch.Tensor:
    k1 = v(z, _t(t, z))
    k2 = v(z + dt * k1, _t(t + dt, z))
    return z + 0.5 * dt * (k1 + k2)


def midpoint_step(v: VelocityFn, z: torch.Tensor, t: float, dt: float) -> torch.Tensor:
    k1 = v(z, _t(t, z))
    return z + dt * v(z + 0.5 * dt * k1, _t(t + 0.5 * dt, z))


_STEPS = {"euler": euler_step, "heun": heun_step, "midpoint": midpoint_step, "euler_mid": euler_mid_step}


@torch.no_grad()
def integrate(velocity_fn: VelocityFn, z0: torch.Tensor, steps: int, method: str = "euler",
              t0: float = 0.0, t1: float = 1.0) -> torch.Tensor:
    """Solve ``dz/dt = v(z, t)`` from ``t0`` to ``t1`` in ``steps`` uniform steps."""
    if method not in _STEPS:
        raise ValueError(f"infer.sampler: unknown sampler '{method}' (use one of {SAMPLERS})")
    if steps < 1:
        raise ValueError("infer.steps must be >= 1")
    step = _STEPS[method]
    dt = (t1 - t0) / steps
    z = z0
    for i in range(steps):
        z = step(velocity_fn, z, t0 + i * dt, dt)
    return z


def guided_velocity(model, ecg_tokens: torch.Tensor, ecg_pooled: torch.Tensor,
                    guidance: float = 1.0) -> VelocityFn:
    """Velocity field with classifier-free guidance for ``model(z, t, tokens, pooled, drop)``.

    ``ecg_tokens (B, S, E)``, ``ecg_pooled (B, E)``. ``guidance == 1``: conditional only;
    otherwise one forward over ``[cond; uncond]`` (batch 2B) and ``v_u + g (v_c - v_u)``.
    """
    b = ecg_tokens.shape[0]
    if guidance == 1.0:
        return lambda z, t: model(z, t, ecg_tokens, ecg_pooled, None)
    tokens2 = torch.cat([ecg_tokens, ecg_tokens], 0)
    pooled2 = torch.cat([ecg_pooled, ecg_pooled], 0)
    drop2 = torch.cat([torch.zeros(b, dtype=torch.bool), torch.ones(b, dtype=torch.bool)]).to(ecg_tokens.device)

    def velocity(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = model(torch.cat([z, z], 0), torch.cat([t, t], 0), tokens2, pooled2, drop2)
        v_cond, v_uncond = out[:b], out[b:]
        return v_uncond + guidance * (v_cond - v_uncond)

    return velocity
