"""Memory and compute of each stage on a CUDA GPU in bf16, estimated without a GPU.

Memory comes from fake tensors (``torch._subclasses.FakeTensorMode``): the real modules run their
real forward on tensors that have shapes, dtypes and a ``cuda`` device but no data, so nothing is
computed and a 80 GB step is planned in seconds on a laptop. Three things make the estimate
follow what a GPU would do rather than what the CPU would do:

* autocast: ``torch.autocast("cuda", torch.bfloat16)`` applies the CUDA op lists (matmuls and
  convolutions in bf16, layer/group norms and softmax in fp32). PyTorch disables CUDA autocast when
  no driver is present, so its availability probes are answered "yes" while it is constructed
  (only then: weight initialisation would otherwise reach for a real CUDA generator); the fake
  tensors never reach a driver.
* attention: SDPA picks its kernel by probing the device, which fake CUDA tensors cannot answer,
  and would fall back to the math path that saves the whole ``(S, S)`` score matrix in fp32. On a
  real GPU, bf16 attention with head width <= 256 runs the flash kernel, which saves only
  q, k, v, the output and a ``(N, heads, S)`` log-sum-exp; the planner calls that kernel directly.
* saved activations: autograd's saved-tensor hooks see exactly what backward will need. They are
  counted once per storage (views and tensors saved by two nodes share one), parameters excluded
  (counted as static memory), autocast's bf16 weight copies included (they live until backward).

Backward itself cannot run on fake CUDA tensors (the engine asks the driver for a context), so the
training peak is ``static + max(forward peak, saved + 2 x the largest saved tensor)``: while
backward runs, the saved tensors are still held and the gradient of the widest activation and of
its input are in flight at once. With the DiT's activation checkpointing the hooks see only the
blocks' inputs; one block's activations (the plain step's saved tensors / depth) are added for the
block that backward rebuilds. Static memory is fp32 weights, their gradients, AdamW's two
moments, the EMA copy where the stage keeps one, and DDP's gradient buckets (one more gradient
copy). Inference peaks come from a live-storage tracker over the forward (nothing is saved).

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` over forward *and* backward on fake CPU
tensors (backward runs there), so frozen parts count only what they really cost (input gradients,
no weight gradients). Times assume a stated fraction of the bf16 dense peak.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from unittest import mock

import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

GiB = 2 ** 30
# bf16 dense tensor-core peaks (no sparsity), FLOP/s
PEAK_BF16 = {"A100": 312e12, "H100": 989e12}
ADAMW_BYTES = 4 + 4 + 8          # fp32 weight, fp32 gradient, two fp32 moments
DDP_BUCKET_BYTES = 4             # DDP's gradient buckets: one more fp32 gradient copy


def _flash_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
    """What CUDA SDPA runs for bf16 inputs with head width <= 256: the flash kernel."""
    if attn_mask is not None:
        raise ValueError("the planner's flash attention has no mask support")
    return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal,
                                                               False, scale=scale)[0]


def _shape_only_init():
    """Truncated-normal init reads values back (data-dependent), which fake tensors cannot; the
    plan needs shapes only."""
    return mock.patch.object(torch.nn.init, "trunc_normal_", lambda tensor, *a, **k: tensor)


@contextlib.contextmanager
def fake_cuda():
    """Fake tensors on a ``cuda`` device with CUDA autocast rules and flash attention (module doc)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(F, "scaled_dot_product_attention", _flash_sdpa))
        stack.enter_context(_shape_only_init())
        stack.enter_context(FakeTensorMode(allow_non_fake_inputs=False))
        stack.enter_context(torch.device("cuda"))
        yield


def _storage_key(tensor: torch.Tensor) -> int:
    return StorageWeakRef(tensor.untyped_storage()).cdata


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the storages alive at once among those created inside this mode."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = StorageWeakRef(storage).cdata
                if key not in self.live:
                    self.live[key] = (StorageWeakRef(storage), storage.nbytes())
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


class SavedBytes:
    """Saved-for-backward tensors of the enclosed forward, once per storage, parameters excluded."""

    def __init__(self, exclude: list[torch.Tensor]):
        self.exclude = {_storage_key(t) for t in exclude}
        self.saved: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda x: x)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        key = _storage_key(tensor)
        if key not in self.exclude:
            self.saved[key] = tensor.untyped_storage().nbytes()
        return tensor

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.saved.values())

    @property
    def largest(self) -> int:
        return max(self.saved.values(), default=0)


@dataclass
class StepMemory:
    """Bytes of one training step (or one inference batch: ``saved`` = 0)."""

    static: int
    forward_peak: int
    saved: int = 0
    largest_saved: int = 0
    recompute: int = 0          # activation checkpointing: one block's activations, rebuilt in backward

    @property
    def activations(self) -> int:
        return max(self.forward_peak, self.saved + self.recompute + 2 * self.largest_saved)

    @property
    def peak(self) -> int:
        return self.static + self.activations


def measure_training_memory(step, params: list[torch.Tensor], static_bytes: int) -> StepMemory:
    """Run ``step()`` (a forward that returns the loss; build its inputs inside) under fake CUDA
    bf16, with ``params`` the module parameters (not activations)."""
    live = LiveBytes()
    with SavedBytes(params) as saved, live:
        loss = step()
    del loss
    return StepMemory(static_bytes, live.peak, saved.total, saved.largest)


def measure_inference_memory(step, static_bytes: int) -> StepMemory:
    live = LiveBytes()
    with torch.no_grad(), live:
        step()
    return StepMemory(static_bytes, live.peak)


def count_flops(step, backward: bool = True) -> int:
    """FLOPs of ``step()`` (returns a scalar loss), forward plus backward when ``backward``."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        loss = step()
        if backward:
            loss.backward()
    return int(counter.get_total_flops())


def seconds(flops: float, gpu: str, utilisation: float) -> float:
    """Wall seconds of ``flops`` at ``utilisation`` of ``gpu``'s bf16 dense peak."""
    return flops / (PEAK_BF16[gpu] * utilisation)


def n_params(*modules) -> int:
    return sum(p.numel() for m in modules if m is not None for p in m.parameters())


@dataclass
class StagePlan:
    """One row of the plan: a training step and, for stage 3, one generation batch."""

    stage: str
    batch: int
    params: int
    train: StepMemory
    train_flops: int                    # per optimiser step on one GPU
    steps_per_epoch: int
    epochs: int
    infer: StepMemory | None = None
    infer_batch: int = 0
    video_flops: int = 0                # per generated video (encoder + ODE + decode)
    notes: list[str] = field(default_factory=list)

    def headroom(self, gpu_bytes: float) -> float:
        peak = max(self.train.peak, self.infer.peak if self.infer else 0)
        return 1.0 - peak / gpu_bytes


def _math_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
    """Attention as two matmuls: what the FLOP counter can see on CPU (the usual accounting)."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    return torch.softmax(query @ key.transpose(-2, -1) * scale, dim=-1) @ value


@contextlib.contextmanager
def fake_cpu():
    """Fake CPU tensors, attention as matmuls (FLOP counting: backward runs there)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with mock.patch.object(F, "scaled_dot_product_attention", _math_sdpa), _shape_only_init(), \
            FakeTensorMode(allow_non_fake_inputs=False):
        yield


def _bf16(on_cuda: bool):
    """CUDA bf16 autocast (module doc: the probes answer "yes" only while it is built), or nothing."""
    if not on_cuda:
        return contextlib.nullcontext()
    with mock.patch("torch.cuda.is_available", lambda: True), \
            mock.patch("torch.cuda.is_bf16_supported", lambda *a, **k: True):
        return torch.autocast("cuda", dtype=torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# The stages. Each ``*_step(cfg, batch, on_cuda)`` builds the stage's real modules and returns
# ``(loss_fn, trained, frozen)``: the step's loss as the training loop computes it, the trained
# modules and the frozen ones held on the GPU while it trains.
# ----------------------------------------------------------------------------------------------


def pamae_step(cfg, batch: int, on_cuda: bool):
    from .ecg.pamae import PAMAE, pamae_losses

    model = PAMAE.from_config(cfg.ecg)

    def loss():
        ecg = torch.randn(batch, 12, int(cfg.data.ecg_fs * cfg.data.ecg_seconds))
        with _bf16(on_cuda):
            out = model(ecg)
        return pamae_losses(out, torch.zeros(out["sincos"].shape), cfg.ecg.phase_weight)["loss"]
    return loss, [model], []


def vae_step(cfg, batch: int, on_cuda: bool):
    """The generator update with the PatchGAN term when ``vae.disc_weight > 0`` (the larger of the
    G and D updates: D sees the same videos without the VAE's graph) and LPIPS when on (random
    weights: its cost does not depend on them). The adaptive GAN weight is a fixed number here:
    its gradient probe needs backward."""
    from .vae.discriminator import PatchDiscriminator3D
    from .vae.losses import framewise_lpips, kl_per_pixel
    from .vae.model import VAE3D

    v = cfg.vae
    vae = VAE3D.from_config(v)
    disc = PatchDiscriminator3D.from_config(v) if v.disc_weight > 0 else None
    lpips_net = None
    if v.perceptual_weight > 0:
        import warnings

        import lpips

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lpips_net = lpips.LPIPS(pretrained=False, net="alex", pnet_rand=True, verbose=False).eval()
        lpips_net.requires_grad_(False)
        for module in lpips_net.modules():      # its input scaling is made with torch.Tensor([...]): CPU
            for key, buf in module._buffers.items():
                if buf is not None and on_cuda:
                    module._buffers[key] = torch.zeros(buf.shape, dtype=buf.dtype)
    if disc is not None:
        disc.requires_grad_(False)              # as in the G step: D is a frozen critic there
    frames = v.clip_frames or cfg.data.num_frames

    def loss():
        x = torch.rand(batch, 1, frames, cfg.data.image_size, cfg.data.image_size) * 2 - 1
        with _bf16(on_cuda):
            x_hat, posterior = vae(x, sample=True)
        x_hat = x_hat.float()
        total = (x_hat - x).abs().mean() + v.kl_weight * kl_per_pixel(posterior, x)
        if lpips_net is not None:
            total = total + v.perceptual_weight * framewise_lpips(lpips_net, x_hat, x, v.perceptual_frames)
        if disc is not None:
            with _bf16(on_cuda):
                total = total - v.disc_weight * disc(x_hat).float().mean()
        return total
    trained = [vae] + ([disc] if disc is not None else [])   # D's weights, grads and AdamW live too
    return loss, trained, [lpips_net] if lpips_net is not None else []


def _flow_parts(cfg):
    from .ecg.encoder import ECGEncoder
    from .flow.dit import build_dit
    from .vae.model import VAE3D

    latent = (cfg.vae.latent_channels, cfg.data.num_frames, cfg.data.image_size // 8, cfg.data.image_size // 8)
    dit = build_dit(cfg.flow, latent, ecg_dim=cfg.ecg.width, ecg_tokens=cfg.ecg.num_tokens)
    return latent, dit, ECGEncoder.from_config(cfg.ecg), VAE3D.from_config(cfg.vae)


def flow_step(cfg, batch: int, on_cuda: bool):
    """A flow-matching step on cached ECG tokens (the frozen encoder is not on the GPU then; the
    VAE is, for previews)."""
    from .flow.transport import TemplateAnchor, flow_matching_loss

    latent, dit, _, vae = _flow_parts(cfg)
    anchor = TemplateAnchor(torch.zeros(latent[0], 1, *latent[2:]), cfg.flow.alpha, cfg.flow.use_template)
    dit.requires_grad_(True)

    def loss():
        z1 = torch.randn(batch, *latent)
        tokens = torch.randn(batch, cfg.ecg.num_tokens, cfg.ecg.width)
        with _bf16(on_cuda):
            return flow_matching_loss(dit, z1, anchor, torch.rand(batch), torch.randn(batch, *latent),
                                      drop=torch.rand(batch) < cfg.flow.cfg_drop, ecg_tokens=tokens,
                                      ecg_pooled=tokens.mean(1)).float()
    return loss, [dit], [vae]


def generation_batch(cfg, batch: int, on_cuda: bool, steps: int | None = None):
    """Generation of ``batch`` videos: encoder, ``infer.steps`` ODE evaluations (conditional and
    unconditional rows in one forward when guidance != 1; Heun and midpoint cost two per step),
    then the VAE decode in chunks of 4 (``ECGToCine.decode``)."""
    latent, dit, encoder, vae = _flow_parts(cfg)
    inf = cfg.infer
    evals = (inf.steps if steps is None else steps) * (1 if inf.sampler == "euler" else 2)
    rows = batch * (2 if inf.guidance != 1 else 1)

    def run():
        ecg = torch.randn(batch, 12, int(cfg.data.ecg_fs * cfg.data.ecg_seconds))
        with _bf16(on_cuda):
            feats = encoder.features(ecg)
            tokens = feats[:, :cfg.ecg.num_tokens]      # ROI-Align's cost is negligible beside the DiT
            z = torch.randn(rows, *latent)
            for _ in range(evals):
                v = dit(z, torch.rand(rows), tokens.repeat(rows // batch, 1, 1),
                        tokens.mean(1).repeat(rows // batch, 1))
                z = (z + 0.1 * v.float())[:rows]
            for lo in range(0, batch, 4):
                vae.decode(z[lo:lo + 4]).float()
        return z.sum()
    return run, [dit, encoder, vae]


# ----------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------

STAGES = (("stage 1 PA-MAE", "ecg", pamae_step), ("stage 2 VAE", "vae", vae_step),
          ("stage 3 flow DiT", "flow", flow_step))


def _static_bytes(trained, frozen, ema: bool, ddp: bool) -> int:
    per_param = ADAMW_BYTES + (4 if ema else 0) + (DDP_BUCKET_BYTES if ddp else 0)
    return n_params(*trained) * per_param + n_params(*frozen) * 4


def plan_stage(cfg, name: str, section: str, step_fn, train_subjects: int, gpus: int = 1,
               flops: bool = True) -> StagePlan:
    """Memory (fake CUDA, bf16) and FLOPs (fake CPU; 0 unless ``flops``) of one stage's training
    step at its batch size, and for the flow stage of one generation batch."""
    sec = getattr(cfg, section)
    batch = sec.batch_size
    with fake_cuda():
        loss, trained, frozen = step_fn(cfg, batch, True)
        static = _static_bytes(trained, frozen, ema=section == "flow", ddp=gpus > 1)
        params = [p for m in trained + frozen for p in m.parameters()]
        memory = measure_training_memory(loss, params, static)
    if section == "flow" and cfg.flow.grad_checkpoint:
        # the hooks see only the blocks' inputs then; backward rebuilds one block at a time
        plain = copy.deepcopy(cfg)
        plain.flow.grad_checkpoint = False
        with fake_cuda():
            loss, trained, frozen = step_fn(plain, batch, True)
            saved = measure_training_memory(loss, [p for m in trained + frozen for p in m.parameters()], 0).saved
        memory.recompute = saved // cfg.flow.depth
    train_flops = 0
    if flops:
        with fake_cpu():
            loss, _, _ = step_fn(cfg, batch, False)
            train_flops = count_flops(loss)
    stage = StagePlan(name, batch, n_params(*trained), memory, train_flops,
                      steps_per_epoch=max(1, train_subjects // (batch * gpus)), epochs=sec.epochs)
    if section == "flow":
        with fake_cuda():
            # the peak of one ODE evaluation is that of all: each frees its intermediates
            run, modules = generation_batch(cfg, cfg.infer.batch_size, True, steps=1)
            stage.infer = measure_inference_memory(run, n_params(*modules) * 4)
            stage.infer_batch = cfg.infer.batch_size
        if flops:
            with fake_cpu():
                run, _ = generation_batch(cfg, 1, False)
                stage.video_flops = count_flops(run, backward=False)
    return stage


def plan(cfg, subjects: int, gpus: int = 1, flops: bool = True) -> list[StagePlan]:
    """Every training stage of ``cfg`` with ``subjects`` paired subjects (train share from
    ``data.split_fractions``) on ``gpus`` GPUs."""
    train_subjects = int(subjects * cfg.data.split_fractions[0])
    return [plan_stage(cfg, name, section, fn, train_subjects, gpus, flops) for name, section, fn in STAGES]


def format_table(stages: list[StagePlan], gpu_gib: float, utilisation: float) -> str:
    """A markdown table: one row per stage, then one for generation."""
    head = ("| stage | batch/GPU | params (M) | static (GiB) | activations (GiB) | peak (GiB) | "
            f"headroom of {gpu_gib:.0f} GB | TFLOP/step | A100 s/step | H100 s/step | "
            "A100 h/run | H100 h/run |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    gpu_bytes = gpu_gib * 1e9
    for s in stages:
        run_steps = s.steps_per_epoch * s.epochs
        rows.append(
            f"| {s.stage} | {s.batch} | {s.params / 1e6:.1f} | {s.train.static / GiB:.2f} | "
            f"{s.train.activations / GiB:.2f} | {s.train.peak / GiB:.2f} | "
            f"{1 - s.train.peak / gpu_bytes:.0%} | {s.train_flops / 1e12:.2f} | "
            f"{seconds(s.train_flops, 'A100', utilisation):.3f} | {seconds(s.train_flops, 'H100', utilisation):.3f} | "
            f"{seconds(s.train_flops, 'A100', utilisation) * run_steps / 3600:.1f} | "
            f"{seconds(s.train_flops, 'H100', utilisation) * run_steps / 3600:.1f} |")
        if s.infer is not None:
            rows.append(
                f"| generation (per video) | {s.infer_batch} | | {s.infer.static / GiB:.2f} | "
                f"{s.infer.activations / GiB:.2f} | {s.infer.peak / GiB:.2f} | "
                f"{1 - s.infer.peak / gpu_bytes:.0%} | {s.video_flops / 1e12:.3f} | "
                f"{seconds(s.video_flops, 'A100', utilisation):.3f} | "
                f"{seconds(s.video_flops, 'H100', utilisation):.3f} | | |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------------------------
# The same steps on a real GPU (benchmarks/gpu_plan.py --measure, benchmarks/gpu_smoke.sh)
# ----------------------------------------------------------------------------------------------


def measure_cuda(cfg, section: str, step_fn, steps: int = 10, warmup: int = 2) -> dict:
    """Run a stage's step (forward, backward, AdamW) on the current CUDA device with random inputs:
    steps/s, samples/s and the allocator's peak, to set beside the plan."""
    import time

    batch = getattr(cfg, section).batch_size
    with torch.device("cuda"):
        loss_fn, trained, _ = step_fn(cfg, batch, True)
        params = [p for m in trained for p in m.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
        torch.cuda.reset_peak_memory_stats()
        for i in range(warmup + steps):
            if i == warmup:
                torch.cuda.synchronize()
                start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss_fn().backward()
            optimizer.step()
        torch.cuda.synchronize()
    seconds_per_step = (time.perf_counter() - start) / steps
    return {"steps_per_s": 1 / seconds_per_step, "samples_per_s": batch / seconds_per_step,
            "peak_gib": torch.cuda.max_memory_allocated() / GiB}


def measure_cuda_generation(cfg, batches: int = 2) -> dict:
    """Generation of ``infer.batch_size`` videos (encoder, ODE, decode) on the current CUDA device."""
    import time

    with torch.device("cuda"), torch.no_grad():
        run, _ = generation_batch(cfg, cfg.infer.batch_size, True)
        run()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(batches):
            run()
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / batches
    return {"videos_per_s": cfg.infer.batch_size / seconds, "peak_gib": torch.cuda.max_memory_allocated() / GiB}
