"""The published weights' networks: converted fake official checkpoints against the official
classes' outputs (tests/data/official/, built by benchmarks/official_fixture.py), the converter's
layouts and errors, the official cycle cut and sampler, the units check, and infer_flow.py end to end."""
import json
import math

import numpy as np
import pytest
import torch

from ecgflowcmr.config import ConfigError, load_config
from ecgflowcmr.convert_official import main as convert_main
from ecgflowcmr.ecg.official import OfficialECGEncoder, official_cut, phase_on_samples
from ecgflowcmr.official.equivalence import TARGETS, max_differences, project_outputs, with_ecgs
from ecgflowcmr.official.fakes import write_official_checkpoints

from .conftest import EXAMPLE_ECG_DIR, ROOT

FIXTURE = ROOT / "tests" / "data" / "official"


def _reference() -> dict:
    return torch.load(FIXTURE / "reference.pt", weights_only=True)


def _size_flags(sizes: dict) -> list[str]:
    flags = []
    for key in ("ecg_dim", "base_filters", "latent_size", "vae_ch", "vae_num_res_blocks", "vae_z_channels",
                "dit_hidden", "dit_depth", "dit_heads"):
        flags += ["--" + key.replace("_", "-"), str(sizes[key])]
    return flags + ["--vae-ch-mult", ",".join(map(str, sizes["vae_ch_mult"]))]


def _convert(files: dict, out, *extra: str, sizes: dict | None = None) -> int:
    sizes = sizes or _reference()["meta"]["sizes"]
    return convert_main(["--ecg", str(files["ecg"]), "--vae", str(files["vae"]), "--flow", str(files["flow"]),
                         "--template", str(files["template"]), "--out", str(out), *_size_flags(sizes), *extra])


@pytest.fixture(scope="module")
def official_files(tmp_path_factory) -> dict:
    """The fixture's fake official checkpoints, recreated in the official formats."""
    return write_official_checkpoints(FIXTURE / "fake_checkpoints.json", tmp_path_factory.mktemp("official"))


@pytest.fixture(scope="module")
def converted(official_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "official"
    assert _convert(official_files, out) == 0
    return out


@pytest.fixture(scope="module")
def differences(converted) -> dict:
    reference = with_ecgs(_reference())
    return max_differences(reference, project_outputs(converted, reference))


# ----------------------------------------------------------------------------------------------
# Equivalence with the official classes
# ----------------------------------------------------------------------------------------------


def test_fixture_is_small_and_complete():
    size = sum(p.stat().st_size for p in FIXTURE.iterdir())
    assert size < 2_000_000, f"tests/data/official is {size / 1e6:.1f} MB"
    assert set(_reference()["outputs"]) == set(TARGETS)


@pytest.mark.parametrize("group", ["ecg", "cut", "vae", "dit", "sample"])
def test_converted_networks_reproduce_the_official_outputs(differences, group):
    """ECG features / phase, VAE encode / decode, DiT velocity (ECG and null) <= 1e-5; the whole
    guided 10-step sample, decoded, <= 1e-4; the official cycle cut exactly."""
    over = {k: v for k, v in differences.items() if k.startswith(group) and v > TARGETS[k]}
    assert not over, f"beyond the targets: {over}"


def test_converted_files_are_plain_checkpoints_of_this_project(converted):
    for stage in ("ecg", "vae", "flow"):
        ckpt = torch.load(converted / stage / "best.pt", weights_only=True)
        assert ckpt["config"]["ecg"]["arch"] == "official" and "model" in ckpt
    flow = torch.load(converted / "flow" / "best.pt", weights_only=True)
    assert flow["dit_arch"]["arch"] == "official" and flow["ecg_encoder"]["config"]["cycle_mode"] == "official"
    assert flow["flow"]["alpha"] == pytest.approx(0.6)
    assert torch.equal(flow["flow"]["latent_norm"]["std"], torch.ones(4))      # official latents are unscaled
    vae = torch.load(converted / "vae" / "best.pt", weights_only=True)["model"]
    assert not any(k.startswith("loss.") or ".temb_proj." in k for k in vae)
    cfg = load_config(converted / "config.yaml")
    assert (cfg.infer.sampler, cfg.infer.steps, cfg.infer.guidance) == ("euler_mid", 10, 2.0)
    record = json.loads((converted / "conversion.json").read_text())
    assert record["ecg_encoder"].startswith("flow") and record["official"]["vae"]["info"]["epoch"] == 100


def test_infer_flow_runs_on_the_converted_fixture(converted, tmp_path):
    """From the converted fake official weights: infer_flow.py on examples/ecg, unchanged; the
    cines of the fixture's sample records equal the official pipeline's; evaluation.py reads them."""
    import evaluation
    import infer_flow

    reference = _reference()
    out = tmp_path / "samples"
    args = ["--config", str(converted / "config.yaml"), "device=cpu"]
    assert infer_flow.main(args + ["--ecg", str(EXAMPLE_ECG_DIR), "--out", str(out)]) == 0
    size = 8 * reference["meta"]["sizes"]["latent_size"]
    for i, name in enumerate(reference["meta"]["sample_records"]):
        cine = torch.from_numpy(np.load(out / f"{name}.npy"))
        assert cine.shape == (1, 50, size, size)
        assert (cine - reference["outputs"]["sample_cine"][i]).abs().max() <= 1e-4
    assert len(list(out.glob("HR0600*.npy"))) == 5
    real = tmp_path / "official"                      # the official pipeline's cines as the "real" ones
    real.mkdir()
    for i, name in enumerate(reference["meta"]["sample_records"]):
        np.save(real / f"{name}.npy", reference["outputs"]["sample_cine"][i].numpy())
    assert evaluation.main(args + ["--real", str(real), "--fake", str(out), "--metrics", "psnr,ssim",
                                   "--out", str(tmp_path / "eval")]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]
    assert metrics["psnr"]["value"] > 60


# ----------------------------------------------------------------------------------------------
# The converter: layouts, choices, errors
# ----------------------------------------------------------------------------------------------


def _resave(files: dict, tmp_path, transform) -> dict:
    """The same files, each checkpoint dict rewritten by ``transform(name, obj)``."""
    out = dict(files)
    for name in ("ecg", "vae", "flow"):
        obj = torch.load(files[name], weights_only=True)
        out[name] = tmp_path / f"{name}.pth"
        torch.save(transform(name, obj), out[name])
    return out


def _weights(run) -> dict:
    flow = torch.load(run / "flow" / "best.pt", weights_only=True)
    return {"dit": flow["model"], "encoder": flow["ecg_encoder"]["state_dict"], "vae": flow["vae"]["state_dict"]}


def _same(a: dict, b: dict) -> bool:
    return all(a[k].keys() == b[k].keys() and all(torch.equal(a[k][n], b[k][n]) for n in a[k]) for k in a)


def test_bare_state_dicts_and_module_prefixes_convert_to_the_same_weights(official_files, converted, tmp_path):
    def bare_with_prefix(name, obj):
        state = {f"module.{k}": v for k, v in obj["model_state_dict"].items()}
        if name == "flow":     # a bare DiT state dict carries no encoder: keep the training dict, prefixed
            return {"model_state_dict": state, "encoder_state_dict": {f"module.{k}": v for k, v in
                                                                     obj["encoder_state_dict"].items()}}
        return state

    files = _resave(official_files, tmp_path, bare_with_prefix)
    assert _convert(files, tmp_path / "run") == 0
    assert _same(_weights(tmp_path / "run"), _weights(converted))


def test_flow_without_an_encoder_uses_the_stage1_one_and_says_so(official_files, tmp_path, capsys):
    files = _resave(official_files, tmp_path, lambda name, obj: obj["model_state_dict"] if name == "flow" else obj)
    assert _convert(files, tmp_path / "run") == 0
    assert "carries no 'encoder_state_dict'" in capsys.readouterr().out
    stage1 = torch.load(tmp_path / "run" / "ecg" / "best.pt", weights_only=True)["model"]
    used = _weights(tmp_path / "run")["encoder"]
    assert all(torch.equal(used[k], stage1[f"encoder.{k}"]) for k in used)
    assert _convert(official_files, tmp_path / "run2", "--encoder", "stage1") == 0
    assert "--encoder stage1" in capsys.readouterr().out


def test_unknown_layout_names_what_it_found_and_expected(official_files, tmp_path, capsys):
    files = dict(official_files)
    files["vae"] = tmp_path / "odd.pth"
    torch.save({"weights": {"a": torch.zeros(1)}, "step": 3}, files["vae"])
    assert _convert(files, tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert "'weights' (dict), 'step' (int)" in err and "expected the stage-2 training dict" in err
    files["vae"] = official_files["flow"]                       # the flow file given as the VAE
    assert _convert(files, tmp_path / "run") == 2
    assert "found keys 'blocks.0." in capsys.readouterr().err


def test_sizes_that_do_not_fit_name_the_keys_and_the_flags(official_files, tmp_path, capsys):
    sizes = dict(_reference()["meta"]["sizes"], dit_depth=3, vae_ch_mult=[1, 1, 2, 2])
    assert _convert(official_files, tmp_path / "run", sizes=sizes) == 2
    err = capsys.readouterr().err
    assert "keys missing: 'blocks.2." in err and "--dit-depth" in err
    sizes = dict(_reference()["meta"]["sizes"], ecg_dim=32)
    assert _convert(official_files, tmp_path / "run", sizes=sizes) == 2
    assert ("shapes differ: 'feature_proj.weight' (24, 64, 1) in the file, (32, 64, 1) expected"
            in capsys.readouterr().err)


def test_template_shapes(official_files, tmp_path, capsys):
    files = dict(official_files)
    template = torch.load(official_files["template"], weights_only=True)
    files["template"] = tmp_path / "t.pt"
    torch.save(template[0, :, 0], files["template"])           # (C, h, w) is accepted
    assert _convert(files, tmp_path / "run") == 0
    saved = torch.load(tmp_path / "run" / "latents" / "template.pt", weights_only=True)["template"]
    assert torch.equal(saved, template[0])
    torch.save(template[:, :3], files["template"])
    assert _convert(files, tmp_path / "run") == 2
    assert "anatomy template): found a tensor of shape (1, 3, 1, 4, 4)" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Cycles, sampler, config keys
# ----------------------------------------------------------------------------------------------


def _sincos(angle: np.ndarray) -> torch.Tensor:
    return torch.tensor(np.stack([np.sin(angle), np.cos(angle)]), dtype=torch.float32)[None]


def test_official_cut_known_answers():
    p = np.arange(625, dtype=np.float64)
    # phase 0 at R-peaks every 100 positions from 10; it is pi at 60, 160, ..., 560, so atan2 falls
    # from +pi to -pi between those positions and the next: 6 falls, the middle pair the 3rd and 4th
    start, end, fallback = official_cut(_sincos(2 * np.pi * ((p - 10) / 100 % 1.0)))
    assert (int(start), int(end), bool(fallback)) == (261, 361, False)
    start, end, fallback = official_cut(_sincos(np.ones(625)))
    assert (int(start), int(end), bool(fallback)) == (208, 416, True)


def test_r_to_r_cycle_with_the_official_encoder_reads_positions_at_8p():
    """Feature p = p and R-peaks at samples 800, 1600, ...: the median cycle's first token is the
    feature of the R-peak's position (sample 8p, not 8p + 3.5)."""
    enc = OfficialECGEncoder(out_dim=1, base_filters=8, cycle_mode="median").eval()
    samples = np.arange(5000) / 8.0 * 8
    phase = 2 * np.pi * (samples / 800 % 1.0)
    sincos = _sincos(phase[::8])
    feats = torch.arange(625, dtype=torch.float32)[None, None]
    enc.raw = lambda ecg: (feats, sincos)
    assert torch.allclose(phase_on_samples(sincos, 5000)[0, ::8], torch.tensor(phase[::8] % (2 * math.pi),
                                                                                dtype=torch.float32), atol=1e-5)
    out = enc(torch.zeros(1, 12, 5000))
    assert out.start.item() % 800 == 0 and not out.fallback.item()
    assert out.tokens[0, 0, 0].item() == pytest.approx(out.start.item() / 8, abs=1e-3)
    assert out.tokens[0, 25, 0].item() == pytest.approx(out.start.item() / 8 + 50, abs=1e-3)   # half a cycle


def test_euler_mid_sampler_is_exact_for_a_linear_velocity():
    from ecgflowcmr.flow.samplers import integrate, nfe_per_step

    z0 = torch.zeros(1, 1)
    v = lambda z, t: t[:, None].expand_as(z)                    # noqa: E731  dz/dt = t -> z(1) = 1/2
    assert integrate(v, z0, 10, "euler_mid").item() == pytest.approx(0.5, abs=1e-7)
    assert integrate(v, z0, 10, "euler").item() == pytest.approx(0.45, abs=1e-7)
    assert nfe_per_step("euler_mid") == 1


@pytest.mark.parametrize("override, key", [
    ("ecg.arch=resnet", "ecg.arch"), ("vae.arch=1", "vae.arch"), ("flow.archs=official", "flow.archs"),
    ("ecg.cycle_mode=official", "ecg.cycle_mode"), ("ecg.input_scale=1000", "ecg.input_scale"),
    ("vae.z_channels=4", "vae.z_channels"), ("ecg.base_filters=x", "ecg.base_filters"),
])
def test_config_keys_are_validated(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_official_config_checks_and_training_refuses_the_official_archs():
    cfg = load_config(None, ["ecg.arch=official", "ecg.cycle_mode=official", "ecg.input_scale=200",
                             "vae.arch=official", "vae.base_channels=32", "vae.z_channels=4",
                             "flow.arch=official", "infer.sampler=euler_mid"])
    with pytest.raises(ConfigError, match="vae.channel_mult"):
        load_config(None, ["vae.arch=official", "vae.channel_mult=[1,2,2]"])
    with pytest.raises(ConfigError, match="vae.base_channels"):
        load_config(None, ["vae.arch=official", "vae.base_channels=16"])
    with pytest.raises(ConfigError, match="flow.patch_size"):
        load_config(None, ["flow.arch=official", "flow.patch_size=2"])
    from ecgflowcmr.ecg.pamae import PAMAE
    from ecgflowcmr.flow.dit import build_dit
    from ecgflowcmr.vae import VAE3D

    for build in (lambda: PAMAE.from_config(cfg.ecg), lambda: VAE3D.from_config(cfg.vae),
                  lambda: build_dit(cfg.flow, (4, 50, 12, 12), 768)):
        with pytest.raises(ConfigError, match="arch"):
            build()


# ----------------------------------------------------------------------------------------------
# Units
# ----------------------------------------------------------------------------------------------


class _SaturatingAutoencoder(torch.nn.Module):
    """Reconstructs its input while |x| < 5 (a model trained in mV) and predicts the phase of the
    record's true R-peaks: the check must name mV."""

    def __init__(self, rpeaks: list):
        super().__init__()
        from ecgflowcmr.data.phase import phase_from_rpeaks

        self.encoder = torch.nn.Module()
        self.encoder.input_scale = 1.0
        phases = np.stack([phase_from_rpeaks(r, 5000) for r in rpeaks])[:, ::8]
        sincos = torch.tensor(np.stack([np.sin(phases), np.cos(phases)], 1), dtype=torch.float32)
        self.encoder.raw = lambda x: (x.clamp(-5, 5), sincos[: len(x)])
        self.decoder = lambda feats: feats


def test_units_check_picks_the_scaling_that_reconstructs():
    from ecgflowcmr.data.ecg_io import read_ecg
    from ecgflowcmr.official.units import check_units, recommend, reference_rpeaks

    ecgs = np.stack([read_ecg(EXAMPLE_ECG_DIR / f"HR0600{i}.hea") for i in range(2)])
    rows = check_units(_SaturatingAutoencoder(reference_rpeaks(ecgs)), ecgs)
    by_name = {r["name"]: r for r in rows}
    assert by_name["mV"]["rec_error"] < 1e-3 < by_name["uV"]["rec_error"]
    assert by_name["mV"]["sensitivity"] == 1.0 and by_name["mV"]["ppv"] == 1.0
    assert recommend(rows)[0]["name"] == "mV"


def test_units_check_from_the_command_line(official_files, tmp_path, capsys):
    code = convert_main(["--ecg", str(official_files["ecg"]), "--check-units", str(EXAMPLE_ECG_DIR / "HR06000.hea"),
                         *_size_flags(_reference()["meta"]["sizes"])])
    out = capsys.readouterr().out
    assert code == 0 and "units check on 1 ECGs" in out and "adc" in out and "->" in out
    files = dict(official_files)
    assert _convert(files, tmp_path / "run", "--ecg-scale", "auto") == 2
    assert "--check-units" in capsys.readouterr().err
    assert _convert(files, tmp_path / "run", "--ecg-scale", "uV") == 0
    assert load_config(tmp_path / "run" / "config.yaml").ecg.input_scale == 1000


def test_dit_without_an_ecg_projection_and_the_masked_stage1_forward():
    """ecg_dim == hidden: the official DiT has no ecg_proj weights (Identity); the stage-1 model's
    masked forward gives the PAMAE.forward fields."""
    from ecgflowcmr.ecg.official import OfficialPAMAE
    from ecgflowcmr.flow.official import OfficialDiT

    dit = OfficialDiT(latent_channels=4, num_frames=5, latent_size=2, ecg_dim=8, hidden=8, depth=1, heads=2).eval()
    assert not any(k.startswith("ecg_proj") for k in dit.state_dict())
    v = dit(torch.randn(2, 4, 5, 2, 2), torch.rand(2), torch.randn(2, 5, 8), None, torch.tensor([False, True]))
    assert v.shape == (2, 4, 5, 2, 2)
    out = OfficialPAMAE(out_dim=8, base_filters=4)(torch.randn(2, 12, 5000), mask_ratio=0.5,
                                                    generator=torch.Generator().manual_seed(0))
    assert out["recon"].shape == (2, 12, 5000) and out["sincos"].shape == (2, 625, 2)
    assert out["mask"].shape == (2, 625) and 0.4 < out["mask"].float().mean() < 0.6
