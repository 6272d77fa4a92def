"""The GPU planner: fake CUDA tensors under CUDA's bf16 autocast rules, known answers on small
modules, and configs/ukb.yaml within 80 GB with 10 % headroom."""
import torch

from ecgflowcmr import gpu_plan
from ecgflowcmr.config import load_config

from .conftest import ROOT


def test_linear_step_saves_its_bf16_operands_and_counts_flops():
    with gpu_plan.fake_cuda():
        layer = torch.nn.Linear(256, 512)
        seen = {}

        def step():
            x = torch.randn(8, 256, requires_grad=True)      # as inside a network: the weight is saved too
            with gpu_plan._bf16(True):
                out = layer(x)
            seen["dtype"], seen["device"] = out.dtype, out.device.type
            return out.float().pow(2).sum()
        memory = gpu_plan.measure_training_memory(step, list(layer.parameters()), static_bytes=0)
    assert seen == {"dtype": torch.bfloat16, "device": "cuda"}     # CUDA autocast really applied
    # addmm keeps the bf16 input (8*256*2) and bf16 weight copy (512*256*2); pow keeps fp32 out (8*512*4)
    assert memory.saved == 8 * 256 * 2 + 512 * 256 * 2 + 8 * 512 * 4
    assert memory.largest_saved == 512 * 256 * 2
    with gpu_plan.fake_cpu():
        layer = torch.nn.Linear(256, 512)
        flops = gpu_plan.count_flops(lambda: layer(torch.randn(8, 256)).sum())
    assert flops == 2 * (2 * 8 * 256 * 512)                      # forward + weight gradient (the input needs none)


def test_attention_is_planned_as_flash_without_the_score_matrix():
    n, heads, s, d = 4, 2, 128, 64
    with gpu_plan.fake_cuda():
        def step():
            q, k, v = (torch.randn(n, heads, s, d, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
            return torch.nn.functional.scaled_dot_product_attention(q, k, v).float().sum()
        memory = gpu_plan.measure_training_memory(step, [], static_bytes=0)
    qkvo = 4 * n * heads * s * d * 2
    lse = n * heads * s * 4                                         # fp32 log-sum-exp; no (S, S) scores,
    assert qkvo + lse <= memory.saved <= qkvo + lse + 64            # which would add n*heads*s*s*4


def test_ukb_fits_80_gb_with_headroom():
    cfg = load_config(ROOT / "configs" / "ukb.yaml")
    fl = cfg.flow                                         # the paper's flow recipe
    assert (fl.batch_size, fl.lr, fl.weight_decay, fl.epochs) == (4, 1e-4, 1e-4, 10)
    stages = gpu_plan.plan(cfg, subjects=42000, flops=False)
    assert [s.stage for s in stages] == [name for name, _, _ in gpu_plan.STAGES]
    for stage in stages:
        assert stage.train.saved > 0 and stage.train.static > 0
        assert stage.headroom(80e9) >= 0.10, (stage.stage, stage.train.peak / 2 ** 30)
    flow = stages[-1]
    assert flow.batch == 4 and flow.infer is not None and flow.infer.peak < 80e9


def test_ukb_flow_batch_32_fits_only_with_activation_checkpointing():
    cfg = load_config(ROOT / "configs" / "ukb.yaml")
    ckpt = gpu_plan.plan_stage(load_config(ROOT / "configs" / "ukb.yaml", ["flow.batch_size=32",
                                                                          "flow.grad_checkpoint=true"]),
                               "flow", "flow", gpu_plan.flow_step, 1000, flops=False)
    without = ckpt.train.static + ckpt.train.recompute * cfg.flow.depth   # the plain step's saved tensors
    assert without > 0.9 * 80e9 and ckpt.headroom(80e9) >= 0.10
    assert ckpt.train.saved < ckpt.train.recompute * cfg.flow.depth / 4
