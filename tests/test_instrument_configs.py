"""Version 2 is the instrument (demo, bench, downstream); version 1 stays reproducible bit for bit.

``tests/data/resolved_configs_v1_era.json`` holds ``load_config(...).to_dict()`` of configs/demo.yaml,
phantom_bench.yaml, phantom_bench_v2.yaml and downstream_phantom.yaml as they were before version 2
became the default. The ``*_v1`` configs must resolve to exactly those dicts, read as this version
reads a stored config (keys added since take their defaults, which change nothing).
"""
import json

import pytest

from ecgflowcmr.config import config_from_dict, load_config

from .conftest import ROOT

BEFORE = {name: config_from_dict(values).to_dict()
          for name, values in json.loads(
              (ROOT / "tests" / "data" / "resolved_configs_v1_era.json").read_text()).items()}


def resolved(name: str) -> dict:
    return load_config(ROOT / "configs" / f"{name}.yaml").to_dict()


@pytest.mark.parametrize("new, old", [("demo_v1", "demo"), ("phantom_bench_v1", "phantom_bench"),
                                      ("phantom_bench_v2", "phantom_bench_v2"),
                                      ("downstream_phantom_v1", "downstream_phantom")])
def test_history_configs_resolve_as_before(new, old):
    assert resolved(new) == BEFORE[old]


@pytest.mark.parametrize("name, n, phantom_seed, flow_epochs", [("demo_v1", 128, 0, 90),
                                                                ("phantom_bench_v1", 512, 1, 20)])
def test_version1_keys_that_decide_the_data(name, n, phantom_seed, flow_epochs):
    cfg = resolved(name)
    d = cfg["data"]
    assert d["phantom_version"] == 1 and d["crop_mm"] == 0.0
    assert (d["phantom_n"], d["phantom_seed"], d["split_seed"], cfg["seed"]) == (n, phantom_seed, 0, 0)
    assert d["split_fractions"] == [0.8, 0.1, 0.1]
    assert cfg["flow"]["epochs"] == flow_epochs and cfg["infer"]["steps"] == 2


def test_version2_is_the_default_instrument():
    demo, bench, down = resolved("demo"), resolved("phantom_bench"), resolved("downstream_phantom")
    for cfg in (demo, bench, down):
        assert cfg["data"]["phantom_version"] == 2 and cfg["data"]["crop_mm"] == 160.0
        assert cfg["data"]["phantom_prevalence"] == [0.8, 0.1, 0.1]
        assert cfg["data"]["split_fractions"] == [0.8, 0.1, 0.1]
    assert (demo["data"]["phantom_n"], demo["data"]["phantom_seed"]) == (128, 0)
    assert (bench["data"]["phantom_n"], bench["data"]["phantom_seed"]) == (512, 1)
    # the version-2 bench is the former phantom_bench_v2 run, under the bench's name
    assert {**bench, "name": "phantom_bench_v2"} == BEFORE["phantom_bench_v2"]
    # apart from the phantom and a budget trimmed to 20 minutes on 2 cores, the demo trains what it did before
    old, budget = BEFORE["demo"], {"epochs", "val_every", "sample_every"}
    for section in ("ecg", "vae", "flow", "infer"):
        keep = {k: v for k, v in old[section].items() if section == "ecg" or k not in budget}
        assert {k: demo[section][k] for k in keep} == keep, section
    assert (demo["vae"]["epochs"], demo["flow"]["epochs"]) == (20, 40)
    assert down["run_dir"] == bench["run_dir"]


def test_eval_phantom_is_held_out_and_enriched():
    ev, bench = resolved("phantom_eval_v2"), resolved("phantom_bench")
    d = ev["data"]
    assert d["phantom_seed"] not in (0, bench["data"]["phantom_seed"])   # not the demo's nor the bench's subjects
    assert d["split_fractions"] == [0.0, 0.0, 1.0] and d["phantom_n"] >= 200
    assert d["phantom_prevalence"] == [0.6, 0.25, 0.15]
    assert ev["run_dir"] != bench["run_dir"]
    # the same preparation as the bench's data
    for key in ("phantom_version", "crop_mm", "num_frames", "image_size", "ecg_fs", "ecg_seconds"):
        assert d[key] == bench["data"][key], key
