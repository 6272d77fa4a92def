"""This project's side of the equivalence fixture (``tests/data/official/reference.pt``).

``benchmarks/official_fixture.py`` runs the official classes on fixed inputs and stores their
outputs; ``project_outputs`` computes the same quantities from a run folder that
``convert_official`` wrote from the same (fake) official files, through this project's loaders
and pipeline. ``max_differences`` compares them; ``TARGETS`` are the tolerances (float32, CPU).

Reference keys (inputs -> outputs); ``ecg`` and ``sample_ecg`` are records of ``examples/ecg``,
stored by name and hash (``with_ecgs`` reads them):

    ecg (N, 12, 5000) mV           -> ecg_tokens (N, T, E), ecg_phase (N, T)   official forward
                                      ecg_features (N, E, P), ecg_sincos (N, 2, P)   raw outputs
                                      ecg_decoded (N, 12, 5000)[..., ::10]           stage-1 decoder
                                      ecg_tokens_finetuned (N, T, E)  the flow checkpoint's encoder
    cut_sincos (K, 2, P)           -> cut_start, cut_end (K,)        the official cycle cut
    cine (B, 1, T', H, W)          -> vae_mean, vae_logvar           VAE encode
    latent (B, C, T', h, w)        -> vae_decoded                    VAE decode
    dit_z, dit_t, dit_ecg          -> dit_v_cond, dit_v_null         DiT velocity, ECG / zeroed ECG
    sample_ecg, sample_noise       -> sample_latent, sample_cine     template + alpha noise, 10 guided
                                                                     Euler steps at (i + 0.5) / 10, decode
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

TARGETS = {"ecg_tokens": 1e-5, "ecg_phase": 1e-5, "ecg_features": 1e-5, "ecg_sincos": 1e-5, "ecg_decoded": 1e-5,
           "ecg_tokens_finetuned": 1e-5, "cut_start": 0, "cut_end": 0, "vae_mean": 1e-5, "vae_logvar": 1e-5,
           "vae_decoded": 1e-5, "dit_v_cond": 1e-5, "dit_v_null": 1e-5, "sample_latent": 1e-4, "sample_cine": 1e-4}


EXAMPLE_ECGS = Path(__file__).resolve().parents[2] / "examples" / "ecg"


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest()[:16]


def with_ecgs(reference: dict, folder: str | Path = EXAMPLE_ECGS) -> dict:
    """``reference`` with its ECG inputs read from ``folder`` (the fixture stores only their names
    and hashes): ``ecg`` and ``sample_ecg`` (N, 12, 5000) in mV, as this project's reader gives them."""
    from ..data.ecg_io import read_ecg

    meta = reference["meta"]
    inputs = dict(reference["inputs"])
    for key, names in (("ecg", meta["ecg_records"]), ("sample_ecg", meta["sample_records"])):
        ecg = torch.from_numpy(np.stack([read_ecg(Path(folder) / f"{n}.hea") for n in names]))
        if _sha(ecg) != meta[f"{key}_sha"]:
            raise ValueError(f"the ECGs {names} read from {folder} are not those of the fixture (hash "
                             f"{_sha(ecg)} != {meta[f'{key}_sha']}): the reader or the files changed; rebuild "
                             "the fixture with benchmarks/official_fixture.py")
        inputs[key] = ecg
    return {**reference, "inputs": inputs}


@torch.no_grad()
def project_outputs(run_dir: str | Path, reference: dict, sampler: str = "euler_mid") -> dict:
    """Every output of ``reference["outputs"]``, computed from the converted ``run_dir``."""
    from ..ecg.encoder import load_pamae
    from ..ecg.official import official_cut
    from ..flow.generator import ECGToCine
    from ..vae import load_vae

    run_dir = Path(run_dir)
    x, meta = reference["inputs"], reference["meta"]
    out = {}
    pamae, _ = load_pamae(run_dir / "ecg" / "best.pt")
    out["ecg_tokens"], out["ecg_phase"] = pamae.encoder.official_forward(x["ecg"])
    out["ecg_features"], out["ecg_sincos"] = pamae.encoder.raw(x["ecg"])
    out["ecg_decoded"] = pamae.decoder(out["ecg_features"])[..., ::10]
    start, end, _ = official_cut(x["cut_sincos"])
    out["cut_start"], out["cut_end"] = start, end

    vae = load_vae(run_dir / "vae" / "best.pt")
    posterior = vae.encode(x["cine"])
    out["vae_mean"], out["vae_logvar"] = posterior.mean, posterior.logvar
    out["vae_decoded"] = vae.decode(x["latent"])

    pipe = ECGToCine.from_checkpoint(run_dir / "flow" / "best.pt", "cpu")
    out["ecg_tokens_finetuned"] = pipe.encoder.official_forward(x["ecg"])[0]
    z, t, e = x["dit_z"], x["dit_t"], x["dit_ecg"]
    out["dit_v_cond"] = pipe.dit(z, t, e, None, None)
    out["dit_v_null"] = pipe.dit(z, t, e, None, torch.ones(len(z), dtype=torch.bool))
    cycle = pipe.encode(x["sample_ecg"])
    latents = pipe.sample_latents(cycle.tokens, cycle.pooled, x["sample_noise"], sampler, int(meta["steps"]),
                                  float(meta["guidance"]))
    out["sample_cine"], out["sample_latent"] = pipe.decode(latents)
    return out


def max_differences(reference: dict, outputs: dict) -> dict[str, float]:
    """Max absolute difference per reference output (float64)."""
    return {k: float((outputs[k].double() - ref.double()).abs().max()) for k, ref in reference["outputs"].items()}


def within_targets(diffs: dict[str, float]) -> dict[str, bool]:
    return {k: v <= TARGETS[k] for k, v in diffs.items()}
