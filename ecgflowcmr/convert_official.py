"""Convert the published ECGFlowCMR weights (official code, UK Biobank) into a run folder of this project.

    python -m ecgflowcmr.convert_official --ecg ECG.pth --vae VAE.pth --flow FLOW.pth \\
        --template anatomy_template.pt --out runs/official [--ecg-scale mV|uV|adc|auto|<x>] \\
        [--check-units examples/ecg] [--encoder flow|stage1] [--cycle-mode official|median|...] [sizes]

Writes ``<out>/{ecg,vae,flow}/best.pt`` (this project's checkpoint format: plain dicts that load
with ``torch.load(weights_only=True)``), ``<out>/latents/template.pt``, ``<out>/config.yaml`` and
``<out>/conversion.json``; then ``infer_flow.py --config <out>/config.yaml --ecg ...``,
``evaluation.py`` and ``downstream.py`` run on them unchanged.

Sizes come from the command line (defaults: the published ones, which are the official scripts'
defaults and ``config/disentangle_vae3d.yaml``); a file that does not fit them stops naming the
keys. ``--check-units PATH`` (a file, folder or manifest of ECGs) tries the plausible input
scalings with the stage-1 decoder and reports which one the weights expect (with ``--ecg`` alone it
only reports; ``--ecg-scale auto`` converts with the winner). See docs/official_weights.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

from .config import ConfigError, config_from_dict, save_config
from .ecg.official import CYCLE_MODES, OfficialECGEncoder, OfficialPAMAE
from .flow.official import OfficialDiT
from .official.checkpoints import (
    OfficialCheckpointError,
    load_into,
    read_stage1,
    read_stage2,
    read_stage3,
    read_template,
)
from .official.units import SCALINGS, check_units, format_table, parse_scale, recommend
from .utils.checkpoint import atomic_save, file_hash
from .vae.official import OfficialVAE3D

# The published sizes: the official scripts' argparse defaults and config/disentangle_vae3d.yaml.
DEFAULTS = dict(ecg_dim=768, base_filters=64, num_frames=50, latent_channels=4, latent_size=12,
                vae_ch=64, vae_ch_mult=[1, 2, 4, 4], vae_num_res_blocks=2, vae_z_channels=4,
                dit_hidden=512, dit_depth=8, dit_heads=8, alpha_noise=0.6, inference_steps=10, guidance_scale=2.0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ecgflowcmr.convert_official", description=__doc__.splitlines()[0])
    files = p.add_argument_group("the official files")
    files.add_argument("--ecg", help="stage-1 checkpoint (train_ecg.py: encoder + decoder)")
    files.add_argument("--vae", help="stage-2 checkpoint (train_disentangle_vae3d.py)")
    files.add_argument("--flow", help="stage-3 checkpoint (train_flow.py: DiT + fine-tuned ECG encoder)")
    files.add_argument("--template", help="anatomy template tensor (1, C, 1, h, w)")
    p.add_argument("--out", default="runs/official", help="run folder to write (default runs/official)")
    p.add_argument("--name", help="experiment name in the config (default: the folder's name)")
    p.add_argument("--encoder", choices=("flow", "stage1"), default="flow",
                   help="ECG encoder for generation: flow = the fine-tuned one the flow checkpoint carries (the "
                        "DiT trained with it; the stage-1 one if it carries none), stage1 = the stage-1 "
                        "checkpoint's (what the official infer_flow.py loads)")
    p.add_argument("--cycle-mode", choices=CYCLE_MODES, default="official",
                   help="ECG cycle: official = the official mid-beat cut the flow was trained on (default); "
                        "median / ensemble / window = this project's R-to-R cycles")
    p.add_argument("--ecg-scale", default="mV",
                   help="factor from mV to the units the weights expect: mV (1), uV (1000), adc (200, UK Biobank "
                        "counts at 5 uV/LSB), a number, or auto (the --check-units winner)")
    p.add_argument("--check-units", metavar="ECGS", help="an ECG file, folder or manifest: report which scaling "
                   "the stage-1 weights expect (reconstruction error, R-peaks)")
    p.add_argument("--device", default="cpu", help="device for --check-units (default cpu)")
    sizes = p.add_argument_group("sizes (default: the published weights)")
    for key in ("ecg_dim", "base_filters", "num_frames", "latent_channels", "latent_size", "vae_ch",
                "vae_num_res_blocks", "vae_z_channels", "dit_hidden", "dit_depth", "dit_heads", "inference_steps"):
        sizes.add_argument("--" + key.replace("_", "-"), type=int, default=None, help=f"default {DEFAULTS[key]}")
    sizes.add_argument("--vae-ch-mult", default=None, help="comma-separated, default 1,2,4,4")
    sizes.add_argument("--vae-config", help="the official VAE YAML (model.params.ddconfig, embed_dim): sets the "
                                            "--vae-* sizes and --latent-channels it names")
    sizes.add_argument("--alpha-noise", type=float, default=None,
                       help="z0 = template + alpha * noise at inference (default 0.6; training used 0.8)")
    sizes.add_argument("--guidance-scale", type=float, default=None, help="default 2.0")
    return p


def resolve_sizes(args: argparse.Namespace) -> dict:
    """The sizes: command line, else the official VAE YAML, else the published defaults."""
    sizes = dict(DEFAULTS)
    if args.vae_config:
        import yaml

        params = (yaml.safe_load(Path(args.vae_config).read_text()) or {}).get("model", {}).get("params", {})
        dd = params.get("ddconfig", {})
        if dd.get("f_t", 0) != 0:
            raise ConfigError(f"{args.vae_config}: f_t={dd['f_t']} compresses time; the published VAE keeps the "
                              "50 frames (f_t 0) and so does this converter")
        for ours, theirs in (("vae_ch", "ch"), ("vae_ch_mult", "ch_mult"), ("vae_num_res_blocks", "num_res_blocks"),
                             ("vae_z_channels", "z_channels")):
            if theirs in dd:
                sizes[ours] = list(dd[theirs]) if ours == "vae_ch_mult" else int(dd[theirs])
        if "embed_dim" in params:
            sizes["latent_channels"] = int(params["embed_dim"])
    for key in DEFAULTS:
        value = getattr(args, key, None)
        if value is not None:
            sizes[key] = [int(m) for m in value.split(",")] if key == "vae_ch_mult" else value
    return sizes


def build_config(sizes: dict, out: Path, name: str, cycle_mode: str, input_scale: float):
    """The run's ``Config``: official archs at these sizes, the official sampling."""
    return config_from_dict({
        "name": name, "run_dir": str(out),
        "ecg": {"arch": "official", "width": sizes["ecg_dim"], "base_filters": sizes["base_filters"],
                "num_tokens": sizes["num_frames"], "cycle_mode": cycle_mode, "input_scale": input_scale},
        "vae": {"arch": "official", "latent_channels": sizes["latent_channels"], "base_channels": sizes["vae_ch"],
                "channel_mult": sizes["vae_ch_mult"], "num_res_blocks": sizes["vae_num_res_blocks"],
                "z_channels": sizes["vae_z_channels"]},
        "flow": {"arch": "official", "hidden": sizes["dit_hidden"], "depth": sizes["dit_depth"],
                 "heads": sizes["dit_heads"], "patch_size": 1, "alpha": sizes["alpha_noise"], "anchor": "template"},
        "infer": {"sampler": "euler_mid", "steps": sizes["inference_steps"], "guidance": sizes["guidance_scale"]},
    })


def _hint(stage: str) -> str:
    return {"ecg": "--ecg-dim, --base-filters",
            "vae": "--vae-ch, --vae-ch-mult, --vae-num-res-blocks, --vae-z-channels, --latent-channels "
                   "(or --vae-config)",
            "flow": "--dit-hidden, --dit-depth, --num-frames, --latent-size, --latent-channels, --ecg-dim"}[stage]


def read_ecgs(spec: str) -> tuple[np.ndarray, list[str]]:
    """ECGs (N, 12, 5000) in mV from a file, folder or manifest (the readers of infer_flow.py)."""
    from .config import Config
    from .data.ecg_io import read_ecg
    from .flow.infer import collect_inputs

    items = [it for it in collect_inputs(spec, Config()) if it.path is not None]
    ecgs, names = [], []
    for item in items:
        try:
            ecgs.append(read_ecg(item.path))
            names.append(item.subject)
        except (ValueError, OSError) as err:
            print(f"units check: skipped {item.path}: {err}", file=sys.stderr)
    if not ecgs:
        raise ValueError(f"--check-units '{spec}': no readable ECG")
    return np.stack(ecgs).astype(np.float32), names


def units_report(pamae: OfficialPAMAE, spec: str, device: str, log=print) -> tuple[list[dict], dict]:
    ecgs, names = read_ecgs(spec)
    rows = check_units(pamae, ecgs, SCALINGS, device)
    best, note = recommend(rows)
    log(f"units check on {len(names)} ECGs ({spec}):\n{format_table(rows)}\n-> {note}")
    return rows, best


def _stage1(args: argparse.Namespace, sizes: dict, log) -> tuple:
    """The stage-1 file as an ``OfficialPAMAE`` (decoder when present) and, with ``--check-units``,
    the units check: (pamae, decoder state or None, checkpoint facts, units record or None)."""
    enc_state, dec_state, ecg_info = read_stage1(args.ecg)
    pamae = OfficialPAMAE(sizes["ecg_dim"], sizes["base_filters"], sizes["num_frames"])
    load_into(pamae.encoder, enc_state, args.ecg, "stage-1 ECG encoder", _hint("ecg"))
    if dec_state is not None:
        load_into(pamae.decoder, dec_state, args.ecg, "stage-1 ECG decoder", _hint("ecg"))
    units = None
    if args.check_units:
        if dec_state is None:
            raise OfficialCheckpointError(f"'{args.ecg}' holds no decoder.* weights: the units check needs them")
        rows, best = units_report(pamae, args.check_units, args.device, log)
        units = {"ecgs": args.check_units, "rows": rows, "best": best["name"]}
    return pamae, dec_state, ecg_info, units


def _generation_encoder(args: argparse.Namespace, cfg, pamae: OfficialPAMAE, tuned_state) -> tuple:
    """The encoder generation uses: the flow checkpoint's fine-tuned one (the DiT was trained with
    it) unless ``--encoder stage1`` or the checkpoint has none. Returns (encoder, why)."""
    encoder = OfficialECGEncoder.from_config(cfg.ecg)
    if args.encoder == "flow" and tuned_state is not None:
        load_into(encoder, tuned_state, args.flow, "fine-tuned ECG encoder", _hint("ecg"))
        return encoder, ("flow: the fine-tuned encoder of the flow checkpoint ('encoder_state_dict'), "
                         "trained with the DiT")
    encoder.load_state_dict(pamae.encoder.state_dict())
    return encoder, ("stage1: the stage-1 encoder (--encoder stage1, what the official infer_flow.py loads)"
                     if args.encoder == "stage1" else
                     "stage1: the flow checkpoint carries no 'encoder_state_dict', so the stage-1 encoder")


def convert(args: argparse.Namespace, log=print) -> dict:
    """Read the official files, write the run folder; returns the conversion record."""
    sizes = resolve_sizes(args)
    out = Path(args.out)
    if args.ecg_scale == "auto" and not args.check_units:
        raise ConfigError("--ecg-scale auto needs --check-units ECGS (the ECGs to decide on)")
    pamae, dec_state, ecg_info, units = _stage1(args, sizes, log)
    if not (args.vae or args.flow or args.template):
        return {"units": units}
    missing = [f"--{k}" for k in ("vae", "flow", "template") if not getattr(args, k)]
    if missing:
        raise ConfigError(f"converting needs {', '.join(missing)} as well (only --ecg and --check-units: report only)")
    scale = SCALINGS[units["best"]] if args.ecg_scale == "auto" else parse_scale(args.ecg_scale)
    cfg = build_config(sizes, out, args.name or out.name, args.cycle_mode, scale)
    ecg_section, vae_section = dataclasses.asdict(cfg.ecg), dataclasses.asdict(cfg.vae)

    # -- stage 3: the DiT and the encoder it was trained with
    dit_state, tuned_state, flow_info = read_stage3(args.flow)
    dit = OfficialDiT(sizes["latent_channels"], sizes["num_frames"], sizes["latent_size"], sizes["ecg_dim"],
                      sizes["dit_hidden"], sizes["dit_depth"], sizes["dit_heads"])
    load_into(dit, dit_state, args.flow, "stage-3 DiT", _hint("flow"))
    encoder, source = _generation_encoder(args, cfg, pamae, tuned_state)
    log(f"ECG encoder for generation: {source}")

    # -- stage 2 and the template
    vae_state, vae_info = read_stage2(args.vae)
    vae = OfficialVAE3D.from_config(vae_section)
    load_into(vae, vae_state, args.vae, "stage-2 VAE", _hint("vae"))
    log(f"VAE: {vae_info['dropped_keys']} unused entries dropped (loss.*: LPIPS, discriminator, logvar; "
        "the residual blocks' temb_proj)")
    template = read_template(args.template, sizes["latent_channels"], sizes["latent_size"])

    # -- write
    from .flow.transport import LatentNorm, template_hash

    vae_hash, ecg_hash = vae.state_hash(), encoder.state_hash()
    template_dict = {"template": template, "mean": torch.zeros(template.shape[0]),
                     "std": torch.ones(template.shape[0]), "vae_hash": vae_hash, "n_subjects": 0}
    sources = {k: {"path": str(getattr(args, k)), "sha256": file_hash(getattr(args, k))}
               for k in ("ecg", "vae", "flow", "template")}
    sources["ecg"]["info"], sources["vae"]["info"], sources["flow"]["info"] = ecg_info, vae_info, flow_info
    converted = {"official": sources, "ecg_encoder": source.split(":")[0]}
    base = {"config": cfg.to_dict(), "step": 0, "epoch": 0}
    pamae_state = {f"encoder.{k}": v for k, v in pamae.encoder.state_dict().items()}
    if dec_state is not None:
        pamae_state.update({f"decoder.{k}": v for k, v in pamae.decoder.state_dict().items()})
    atomic_save({**base, "model": pamae_state, "epoch": int(ecg_info.get("epoch", 0)),
                 "extra": {"encoder_hash": pamae.encoder.state_hash(), "converted": converted}},
                out / "ecg" / "best.pt")
    atomic_save({**base, "model": vae.state_dict(), "epoch": int(vae_info.get("epoch", 0)),
                 "extra": {"vae_hash": vae_hash, "converted": converted}}, out / "vae" / "best.pt")
    atomic_save(template_dict, out / "latents" / "template.pt")
    latent_shape = [sizes["latent_channels"], sizes["num_frames"], sizes["latent_size"], sizes["latent_size"]]
    atomic_save({
        **base, "epoch": int(flow_info.get("epoch", 0)),
        "model": {f"dit.{k}": v for k, v in dit.state_dict().items()}, "ema": None,
        "dit_arch": dict(dit.arch),
        "ecg_encoder": {"config": ecg_section, "state_dict": encoder.state_dict(), "hash": ecg_hash},
        "vae": {"config": vae_section, "state_dict": vae.state_dict(), "hash": vae_hash},
        "template": template_dict,
        # official latents are the VAE's own: an identity normalisation
        "flow": {"latent_norm": LatentNorm.identity(sizes["latent_channels"]).to_dict(),
                 "alpha": sizes["alpha_noise"], "use_template": True, "latent_shape": latent_shape,
                 "normalized": False, "t_sampling": "uniform", "cfg_drop": 0.1, "anchor": "template",
                 "residual_input": False, "motion_weight": 0.0},
        "extra": {"template_hash": template_hash(template_dict), "vae_hash": vae_hash, "ecg_hash": ecg_hash,
                  "ecg_source_hash": pamae.encoder.state_hash(), "ecg_finetune": source.startswith("flow"),
                  "converted": converted},
    }, out / "flow" / "best.pt")
    save_config(cfg, out / "config.yaml")
    record = {"out": str(out), "sizes": sizes, "ecg_encoder": source, "ecg_scale": scale,
              "cycle_mode": args.cycle_mode, "sampling": {"sampler": "euler_mid", "steps": sizes["inference_steps"],
                                                         "guidance": sizes["guidance_scale"],
                                                         "alpha": sizes["alpha_noise"]},
              "hashes": {"ecg": ecg_hash, "vae": vae_hash, "template": template_hash(template_dict)},
              "official": sources, "units": units}
    (out / "conversion.json").write_text(json.dumps(record, indent=1, default=float))
    log(f"wrote {out}/{{ecg,vae,flow}}/best.pt, latents/template.pt, config.yaml; generate with\n"
        f"  python infer_flow.py --config {out / 'config.yaml'} --ecg examples/ecg")
    return record


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.ecg:
        parser.error("--ecg is required (the stage-1 checkpoint)")
    try:
        convert(args)
    except (ConfigError, OfficialCheckpointError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
