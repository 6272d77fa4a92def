"""Config: YAML + dotted overrides, errors that name the key, round trip through checkpoints."""
import pytest
import torch

from ecgflowcmr.config import Config, ConfigError, config_from_dict, load_config, parse_overrides, save_config

from .conftest import ROOT


@pytest.mark.parametrize("name", ["demo", "ukb"])
def test_shipped_configs_load(name):
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    assert cfg.name == name
    assert cfg.data.num_frames == 50 and cfg.data.image_size == 96


def test_ukb_has_paper_sizes():
    cfg = load_config(ROOT / "configs" / "ukb.yaml")
    assert (cfg.flow.hidden, cfg.flow.depth, cfg.flow.heads) == (512, 8, 8)
    assert cfg.ecg.width == 768 and cfg.vae.latent_channels == 4 and cfg.flow.alpha == 1.0


def test_overrides_apply_and_coerce():
    cfg = load_config(ROOT / "configs" / "demo.yaml", ["flow.lr=2e-4", "flow.depth=3", "device=cpu",
                                                      "data.split_fractions=[0.5,0.25,0.25]"])
    assert cfg.flow.lr == pytest.approx(2e-4) and isinstance(cfg.flow.lr, float)
    assert cfg.flow.depth == 3 and cfg.device == "cpu"
    assert cfg.data.split_fractions == [0.5, 0.25, 0.25]


@pytest.mark.parametrize("override, key", [
    (["flow.lrr=1"], "flow.lrr"),
    (["nonsense=1"], "nonsense"),
    (["flow.depth=abc"], "flow.depth"),
    (["flow.depth=2.5"], "flow.depth"),
    (["vae.attention=3"], "vae.attention"),
    (["flow.patch_size=3"], "flow.patch_size"),
    (["ecg.width=130"], "ecg.width"),
    (["ecg.mask_ratio=1.0"], "ecg.mask_ratio"),
    (["data.split_fractions=[0.5,0.5,0.5]"], "data.split_fractions"),
    (["infer.sampler=rk45"], "infer.sampler"),
    (["device=tpu"], "device"),
    (["data.num_frames=32"], "data.num_frames"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("[", r"\[")):
        load_config(ROOT / "configs" / "demo.yaml", override)


def test_unknown_key_in_yaml_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("flow:\n  hiden: 64\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*flow\.hiden"):
        load_config(path)


def test_missing_file_and_malformed_override(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_overrides(["flow.lr"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(ROOT / "configs" / "demo.yaml", ["flow.alpha=0.5"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again.to_dict() == cfg.to_dict()
    # A checkpoint stores cfg.to_dict(): plain containers that load with weights_only=True.
    torch.save({"config": cfg.to_dict()}, tmp_path / "c.pt")
    stored = torch.load(tmp_path / "c.pt", weights_only=True)["config"]
    assert config_from_dict(stored).to_dict() == cfg.to_dict()


def test_derived_paths():
    cfg = Config(name="x")
    assert str(cfg.run_path) == "runs/x" and str(cfg.data_root) == "runs/x/data"
    assert str(cfg.manifest_path) == "runs/x/phantom/manifest.csv"
    cfg = load_config(None, ["run_dir=/tmp/r", "data.root=/d"])
    assert str(cfg.stage_dir("flow")) == "/tmp/r/flow" and str(cfg.data_root) == "/d"


def test_base_chains_and_merges_sections(tmp_path):
    (tmp_path / "a.yaml").write_text("name: a\nflow:\n  hidden: 32\n  depth: 3\ninfer:\n  steps: 4\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.yaml").write_text("base: ../a.yaml\nname: b\nflow:\n  depth: 5\n")
    (tmp_path / "c.yaml").write_text("base: sub/b.yaml\ninfer:\n  steps: 1\n")
    cfg = load_config(tmp_path / "c.yaml", ["flow.hidden=48"])
    assert (cfg.name, cfg.flow.hidden, cfg.flow.depth, cfg.infer.steps) == ("b", 48, 5, 1)
    assert "base" not in cfg.to_dict()                     # the resolved config is complete and flat


def test_base_errors_name_the_file(tmp_path):
    (tmp_path / "loop1.yaml").write_text("base: loop2.yaml\n")
    (tmp_path / "loop2.yaml").write_text("base: loop1.yaml\n")
    with pytest.raises(ConfigError, match="base loop"):
        load_config(tmp_path / "loop1.yaml")
    (tmp_path / "orphan.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"nowhere\.yaml.*base of"):
        load_config(tmp_path / "orphan.yaml")
    (tmp_path / "bad.yaml").write_text("base: 3\n")
    with pytest.raises(ConfigError, match="'base'"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "typo.yaml").write_text("base: bad_base.yaml\n")
    (tmp_path / "bad_base.yaml").write_text("flow:\n  hiden: 3\n")
    with pytest.raises(ConfigError, match="flow.hiden"):
        load_config(tmp_path / "typo.yaml")


def test_shipped_configs_state_differences_only():
    """The bench builds on the demo and the version-2 bench on the bench: each sets what differs."""
    demo, bench = load_config(ROOT / "configs/demo.yaml"), load_config(ROOT / "configs/phantom_bench.yaml")
    v2 = load_config(ROOT / "configs/phantom_bench_v2.yaml")
    assert bench.flow.hidden == demo.flow.hidden and bench.flow.epochs != demo.flow.epochs
    assert v2.flow.epochs == bench.flow.epochs and v2.data.phantom_n == bench.data.phantom_n
    assert (v2.data.phantom_version, v2.run_dir) == (2, "runs/phantom_bench_v2")
