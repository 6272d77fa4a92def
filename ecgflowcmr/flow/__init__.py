"""Stages 3 and 4: the Anatomy-Motion Disentangled Flow and ECG-only generation.

    dit.py        FlowDiT: factorised spatial/temporal attention over latent patches, ECG
                  cross-attention, adaLN-Zero on (flow time + pooled ECG), learned null condition
    transport.py  template-anchored straight path on per-channel normalised latents, t sampling,
                  flow-matching loss, deterministic validation pieces
    samplers.py   euler / heun / midpoint ODE solvers, classifier-free guidance in one forward
    generator.py  ECGToCine: one flow checkpoint (embedding encoder, VAE, template) -> cines;
                  NIfTI / npy writers; per-sample seeds
    trainer.py    train_flow.py's loop (cached latents, cached frozen-encoder tokens, EMA, resume)
    infer.py      infer_flow.py's batch generation (files / folders / manifests / splits, shards,
                  resume, previews, index.csv)

    from ecgflowcmr.flow import ECGToCine
    pipe = ECGToCine.from_checkpoint("runs/demo/flow/best.pt", "cpu")
    out = pipe.generate(ecg, seeds=[0], sampler="euler", steps=10, guidance=1.0)   # out.cine (1, 1, 50, 96, 96)
"""
from .dit import FlowDiT, build_dit
from .generator import CheckpointMismatch, ECGToCine, sample_seed
from .samplers import guided_velocity, integrate
from .transport import LatentNorm, TemplateAnchor, flow_matching_loss

__all__ = ["FlowDiT", "build_dit", "ECGToCine", "CheckpointMismatch", "sample_seed", "integrate",
           "guided_velocity", "LatentNorm", "TemplateAnchor", "flow_matching_loss"]
