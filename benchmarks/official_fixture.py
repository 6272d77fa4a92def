#!/usr/bin/env python
"""Build the equivalence fixture tests/data/official/ from the official code (not shipped here).

    git clone https://github.com/PKUDigitalHealth/ECGFlowCMR /path/to/official
    python benchmarks/official_fixture.py --official-repo /path/to/official [--out tests/data/official]

The official classes (``models/ecg_encoder.py``, ``models/disentangle_vae3d.py``,
``models/dit_flow.py``, imported from that folder; they need torch, numpy, einops and pillow)
are built at small sizes (``SIZES``), every tensor is given a deterministic random value
(``ecgflowcmr.official.fakes``: the official zero-initialised layers and the BatchNorm running
statistics included), and fake checkpoints are saved in the official formats (the training dicts
of train_ecg.py, train_disentangle_vae3d.py, train_flow.py and the bare template tensor), then
loaded back into the official classes as the official scripts do. Their outputs on fixed inputs go
to ``reference.pt``; the checkpoints themselves go to ``fake_checkpoints.json`` (entries, tensor names,
shapes, dtypes: the smallest official 8x VAE alone is ~5 MB), from which the tests recreate them.

The VAE's training loss (``LPIPSWithDiscriminator``) needs VGG weights from the network; the
fixture's VAE is built with a stand-in loss (``FixtureLoss``: a ``logvar`` and a small
discriminator) so that its checkpoint still carries ``loss.*`` entries for the converter to drop.
Nothing else of the official code is replaced. The VAE's cines are 32 x 32 (latent 4 x 4), so the
end-to-end test decodes in seconds on a CPU; the code paths are those of 96 x 96.

Finally the files are converted with ``ecgflowcmr.convert_official`` and this project's outputs
are compared with the reference (``ecgflowcmr.official.equivalence``): the script prints the max
absolute differences and exits 1 if one exceeds its target.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ecgflowcmr.official.fakes import state_spec, uniform_tensor, write_official_checkpoints  # noqa: E402

SIZES = dict(ecg_dim=24, base_filters=8, num_frames=50, latent_channels=4, latent_size=4, vae_ch=32,
             vae_ch_mult=[1, 1, 1, 2], vae_num_res_blocks=1, vae_z_channels=6, dit_hidden=16, dit_depth=2,
             dit_heads=2, alpha_noise=0.6, inference_steps=10, guidance_scale=2.0)
SEED = 2025
ECG_RECORDS = ["HR06000", "HR06001", "HR06002"]          # examples/ecg, read with this project's reader
SAMPLE_RECORDS = ["HR06000", "HR06003"]                   # whole guided samples (seed 0, as infer_flow.py)
FILES = {"ecg": "checkpoint-best.pth", "vae": "vae_checkpoint-best.pth", "flow": "checkpoint_flow_best.pth",
         "template": "anatomy_template.pt"}


class FixtureLoss(nn.Module):
    """Stands in for ``LPIPSWithDiscriminator`` (whose LPIPS downloads VGG weights): the
    ``loss.logvar`` and ``loss.discriminator.*`` entries of a stage-2 checkpoint."""

    def __init__(self):
        super().__init__()
        self.logvar = nn.Parameter(torch.zeros(()))
        self.discriminator = nn.Sequential(nn.Conv3d(1, 4, (1, 4, 4), stride=(1, 2, 2)), nn.LeakyReLU(0.2),
                                           nn.Conv3d(4, 1, (1, 3, 3)))


def import_official(repo: Path) -> dict:
    sys.path.insert(0, str(repo))
    loss_module = types.ModuleType("official_fixture_loss")
    loss_module.FixtureLoss = FixtureLoss
    sys.modules["official_fixture_loss"] = loss_module
    names = ("ecg_encoder", "disentangle_vae3d", "dit_flow")
    return {name: importlib.import_module(f"models.{name}") for name in names}


def build_official(mods: dict) -> dict:
    s = SIZES
    ecg = mods["ecg_encoder"]
    stage1 = nn.Module()                     # the official MaskedECGTrainer's layout: encoder.*, decoder.*
    stage1.encoder = ecg.ECGEncoder(in_channels=12, base_filters=s["base_filters"], out_dim=s["ecg_dim"],
                                    target_len=s["num_frames"])
    stage1.decoder = ecg.ECGDecoder(in_dim=s["ecg_dim"], out_channels=12, base_filters=s["base_filters"])
    ddconfig = dict(ch=s["vae_ch"], ch_mult=s["vae_ch_mult"], num_res_blocks=s["vae_num_res_blocks"],
                    attn_resolutions=[], dropout=0.0, in_channels=1, out_ch=1, resolution=8 * s["latent_size"],
                    z_channels=s["vae_z_channels"], temp_res=s["num_frames"], f_t=0, use_3d_conv=True)
    vae = mods["disentangle_vae3d"].vae3d(lossconfig={"target": "official_fixture_loss.FixtureLoss"},
                                          ddconfig=ddconfig, embed_dim=s["latent_channels"])
    dit = mods["dit_flow"].ECG_DiT(input_size=s["latent_size"], num_frames=s["num_frames"],
                                   in_channels=s["latent_channels"], hidden_size=s["dit_hidden"],
                                   depth=s["dit_depth"], num_heads=s["dit_heads"], ecg_dim=s["ecg_dim"],
                                   train_num_points=1)
    tuned = ecg.ECGEncoder(base_filters=s["base_filters"], out_dim=s["ecg_dim"], target_len=s["num_frames"])
    return {"stage1": stage1, "vae": vae, "dit": dit, "tuned": tuned}


def _plain(obj):
    """JSON-able copy of an optimiser / scheduler state dict (tuples become lists)."""
    return json.loads(json.dumps(obj))


def describe_checkpoints(models: dict) -> dict:
    """The official training dicts: non-tensor entries as the official scripts build them."""
    def adamw(params, **kw):
        opt = torch.optim.AdamW(params, **kw)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000, eta_min=1e-6)
        return _plain(opt.state_dict()), _plain(sched.state_dict())

    stage1, vae, dit, tuned = models["stage1"], models["vae"], models["dit"], models["tuned"]
    opt1, sch1 = adamw(stage1.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    opt2, sch2 = adamw(vae.parameters(), lr=1e-4)
    opt_d = _plain(torch.optim.Adam(vae.loss.discriminator.parameters(), lr=1e-4).state_dict())
    opt3, sch3 = adamw(list(dit.parameters()) + list(tuned.parameters()), lr=1e-4, weight_decay=1e-4)
    return {
        "seed": SEED, "sizes": SIZES,
        "files": {
            "ecg": {"filename": FILES["ecg"], "states": {"model_state_dict": state_spec(stage1.state_dict())},
                    "layout": {"epoch": 42, "optimizer_state_dict": opt1, "scheduler_state_dict": sch1,
                               "scaler_state_dict": {}, "best_val": 0.0123}},
            "vae": {"filename": FILES["vae"], "states": {"model_state_dict": state_spec(vae.state_dict())},
                    "seed_offset": {"model_state_dict": 1},
                    "layout": {"epoch": 100, "optimizer_state_dict": opt2, "optimizer_d_state_dict": opt_d,
                               "scheduler_state_dict": sch2, "scaler_state_dict": {}, "best_val": 0.0456,
                               "global_step": 123456}},
            "flow": {"filename": FILES["flow"],
                     "states": {"model_state_dict": state_spec(dit.state_dict()),
                                "encoder_state_dict": state_spec(tuned.state_dict())},
                     "seed_offset": {"model_state_dict": 2, "encoder_state_dict": 3},
                     "layout": {"epoch": 9, "optimizer_state_dict": opt3, "scheduler_state_dict": sch3,
                                "val_loss": 0.789}},
            "template": {"filename": FILES["template"],
                         "tensor": ["template", [1, SIZES["latent_channels"], 1, SIZES["latent_size"],
                                                 SIZES["latent_size"]], "float32"]},
        },
    }


def load_like_official(models: dict, paths: dict) -> torch.Tensor:
    """Load the saved files into the official classes as the official scripts do; the template."""
    ckpt = torch.load(paths["ecg"], map_location="cpu", weights_only=True)
    models["stage1"].load_state_dict(ckpt["model_state_dict"], strict=True)
    ckpt = torch.load(paths["vae"], map_location="cpu", weights_only=True)
    models["vae"].load_state_dict(ckpt["model_state_dict"], strict=True)
    ckpt = torch.load(paths["flow"], map_location="cpu", weights_only=True)
    models["dit"].load_state_dict(ckpt["model_state_dict"], strict=True)
    models["tuned"].load_state_dict(ckpt["encoder_state_dict"], strict=True)
    for m in models.values():
        m.eval()
    return torch.load(paths["template"], map_location="cpu", weights_only=True)


def synthetic_cut_phases(positions: int = 625) -> torch.Tensor:
    """(K, 2, P) (sin, cos) exercising each branch of the official cut: many cycles, one jump,
    two jumps 5 positions apart, none, and a noisy sawtooth."""
    p = np.arange(positions, dtype=np.float64)
    close = np.zeros(positions)
    close[300:306] = 3.0                                  # falls to -0.5 after 300 and after 305
    close[301:305] = np.linspace(-0.5, 2.5, 4)
    close[306] = -0.5
    rng = np.random.default_rng(SEED)
    cases = [2 * np.pi * ((p - 37) / 101 % 1.0),                        # cycles of 101 positions
             2 * np.pi * ((p - 20) / 500 % 1.0),                        # one jump
             close,
             np.full(positions, 1.0),                                   # flat: no jump
             2 * np.pi * ((p - 5) / 77 % 1.0) + rng.normal(0, 0.15, positions)]
    return torch.tensor(np.stack([np.stack([np.sin(c), np.cos(c)]) for c in cases]), dtype=torch.float32)


@torch.no_grad()
def official_sample(models: dict, template: torch.Tensor, ecg: torch.Tensor, noise: torch.Tensor):
    """The official inference of one batch (infer_flow.py's loop, fp32): final latent and cine."""
    s = SIZES
    ecg_feat, _ = models["tuned"](ecg)
    x = template + s["alpha_noise"] * noise
    steps = s["inference_steps"]
    for i in range(steps):
        t = torch.full((len(ecg),), (i + 0.5) / steps)
        v_cond = models["dit"].predict_velocity(x, t, ecg_feat)
        v_uncond = models["dit"].predict_velocity(x, t, torch.zeros_like(ecg_feat))
        x = x + (v_uncond + s["guidance_scale"] * (v_cond - v_uncond)) * (1.0 / steps)
    return x, torch.clamp(models["vae"].decode(x), -1, 1)


def sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest()[:16]


@torch.no_grad()
def reference(models: dict, template: torch.Tensor) -> dict:
    from ecgflowcmr.data.ecg_io import read_ecg
    from ecgflowcmr.flow.generator import sample_seed, seeded_noise_batch

    s = SIZES
    stage1 = models["stage1"]
    read = lambda names: torch.from_numpy(np.stack([read_ecg(ROOT / "examples" / "ecg" / f"{n}.hea")  # noqa: E731
                                                    for n in names]))
    ecg, sample_ecg = read(ECG_RECORDS), read(SAMPLE_RECORDS)
    latent_shape = (s["latent_channels"], s["num_frames"], s["latent_size"], s["latent_size"])
    noise = seeded_noise_batch([sample_seed(0, n, 0) for n in SAMPLE_RECORDS], latent_shape)
    inputs = {"ecg": ecg, "cut_sincos": synthetic_cut_phases(),
              "cine": uniform_tensor("input.cine", (2, 1, 3, 8 * s["latent_size"], 8 * s["latent_size"]), SEED, -1, 1),
              "latent": uniform_tensor("input.latent", (2, s["latent_channels"], 3, s["latent_size"], s["latent_size"]),
                                       SEED, -2, 2),
              "dit_z": uniform_tensor("input.dit_z", (2,) + latent_shape, SEED, -2, 2),
              "dit_t": torch.tensor([0.3, 0.85]),
              "dit_ecg": uniform_tensor("input.dit_ecg", (2, s["num_frames"], s["ecg_dim"]), SEED, -1, 1),
              "sample_ecg": sample_ecg, "sample_noise": noise}
    out = {}
    out["ecg_tokens"], out["ecg_phase"] = stage1.encoder(ecg)
    out["ecg_features"], out["ecg_sincos"] = stage1.encoder(ecg, force_indices="return_raw")
    out["ecg_decoded"] = stage1.decoder(out["ecg_features"])[..., ::10]
    out["ecg_tokens_finetuned"] = models["tuned"](ecg)[0]
    cut = stage1.encoder.detect_best_cycle(inputs["cut_sincos"][:, 0], inputs["cut_sincos"][:, 1])
    out["cut_start"] = torch.tensor([a for a, _ in cut])
    out["cut_end"] = torch.tensor([b for _, b in cut])
    posterior = models["vae"].encode_3d(inputs["cine"])
    out["vae_mean"], out["vae_logvar"] = posterior.mean, posterior.logvar
    out["vae_decoded"] = models["vae"].decode(inputs["latent"])
    z, t, e = inputs["dit_z"], inputs["dit_t"], inputs["dit_ecg"]
    out["dit_v_cond"] = models["dit"].predict_velocity(z, t, e)
    out["dit_v_null"] = models["dit"].predict_velocity(z, t, torch.zeros_like(e))
    out["sample_latent"], out["sample_cine"] = official_sample(models, template, sample_ecg, noise)
    ecg_cuts = stage1.encoder.detect_best_cycle(out["ecg_sincos"][:, 0], out["ecg_sincos"][:, 1])
    meta = {"sizes": SIZES, "seed": SEED, "ecg_records": ECG_RECORDS, "sample_records": SAMPLE_RECORDS,
            "steps": s["inference_steps"], "guidance": s["guidance_scale"], "alpha": s["alpha_noise"],
            "ecg_sha": sha(ecg), "sample_ecg_sha": sha(sample_ecg), "noise_sha": sha(noise),
            "ecg_official_cuts": [list(map(int, c)) for c in ecg_cuts], "files": FILES}
    # the ECGs are not stored: the tests read the same files (their hashes are checked)
    stored = {k: v for k, v in inputs.items() if k not in ("ecg", "sample_ecg")}
    return {"meta": meta, "inputs": stored, "outputs": {k: v.detach().float().contiguous() for k, v in out.items()}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official-repo", required=True, help="a local clone of PKUDigitalHealth/ECGFlowCMR")
    parser.add_argument("--out", default=str(ROOT / "tests" / "data" / "official"))
    parser.add_argument("--official-commit", help="the clone's commit, recorded in the fixture (default: git "
                                                  "rev-parse HEAD in --official-repo)")
    args = parser.parse_args(argv)
    repo, out = Path(args.official_repo).resolve(), Path(args.out)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    models = build_official(import_official(repo))
    spec = describe_checkpoints(models)
    commit = args.official_commit or subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"],
                                                    capture_output=True, text=True).stdout.strip()
    spec["official_commit"] = commit or "unknown"
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_official_checkpoints(spec, tmp)
        template = load_like_official(models, paths)
        ref = reference(models, template)
        ref["meta"]["official_commit"] = spec["official_commit"]
        out.mkdir(parents=True, exist_ok=True)
        (out / "fake_checkpoints.json").write_text(json.dumps(spec, separators=(",", ":")))
        torch.save(ref, out / "reference.pt")
        print(f"wrote {out}/fake_checkpoints.json ({(out / 'fake_checkpoints.json').stat().st_size / 1e3:.0f} kB), "
              f"reference.pt ({(out / 'reference.pt').stat().st_size / 1e3:.0f} kB); official cuts of the "
              f"ECG records: {ref['meta']['ecg_official_cuts']}")
        return compare(paths, Path(tmp) / "run", ref)


def compare(paths: dict, run_dir: Path, ref: dict) -> int:
    """Convert the fake files with this project and print its differences from the official outputs."""
    from ecgflowcmr.convert_official import main as convert_main
    from ecgflowcmr.official.equivalence import TARGETS, max_differences, project_outputs, with_ecgs

    s = SIZES
    flags = ["--ecg", str(paths["ecg"]), "--vae", str(paths["vae"]), "--flow", str(paths["flow"]),
             "--template", str(paths["template"]), "--out", str(run_dir)]
    for key in ("ecg_dim", "base_filters", "latent_size", "vae_ch", "vae_num_res_blocks", "vae_z_channels",
                "dit_hidden", "dit_depth", "dit_heads"):
        flags += ["--" + key.replace("_", "-"), str(s[key])]
    flags += ["--vae-ch-mult", ",".join(map(str, s["vae_ch_mult"]))]
    if convert_main(flags) != 0:
        return 1
    diffs = max_differences(ref, project_outputs(run_dir, with_ecgs(ref)))
    bad = 0
    for key, value in diffs.items():
        ok = value <= TARGETS[key]
        bad += not ok
        print(f"{key:<22} max |diff| {value:.3g}  (target {TARGETS[key]:g}){'' if ok else '  EXCEEDED'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
