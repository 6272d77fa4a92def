"""The phantom benchmark script's plumbing (its numbers come from running it; see the README)."""
from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from tests.conftest import ROOT


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("phantom_bench", ROOT / "benchmarks" / "phantom.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_table_lists_every_variant_and_hides_private_columns(bench, tmp_path):
    rows = {"full": {"psnr": 20.123456, "ssim": 0.5, "fid": None, "n_videos": 3, "_es_frames": [1, 2, 3]},
            "template_only": {"psnr": 10.0, "ssim": 0.1, "fid": 300.0, "n_videos": 3, "_es_frames": [0, 0, 0]}}
    text = bench.write_table(rows, {"faithfulness": {"n": 3}, "faithfulness_full_3x": {"n": 4}}, tmp_path,
                             "configs/x.yaml")
    lines = text.splitlines()
    assert lines[0] == "# Phantom benchmark (configs/x.yaml, test split, n = 3)"
    full = next(line for line in lines if line.startswith("| full |"))
    assert "| 20.123 | 0.500 | n/a |" in full
    assert any(line.startswith("| template_only |") for line in lines)
    assert (tmp_path / "phantom_bench.md").read_text() == text
    saved = json.loads((tmp_path / "phantom_bench.json").read_text())
    assert saved["rows"]["full"] == {"psnr": 20.123456, "ssim": 0.5, "fid": None, "n_videos": 3}
    assert saved["faithfulness"] == {"n": 3}
    assert "## ECG swap (full)" in text and "## ECG swap (full_3x)" in text


def test_failed_stage_names_the_script_and_shows_its_log(bench, tmp_path):
    log = tmp_path / "logs" / "stage.log"
    with pytest.raises(RuntimeError, match=r"no_such_stage\.py failed \(exit 2\).*stage\.log"):
        bench.run_stage("no_such_stage.py", "configs/demo.yaml", [], log=log, threads=1)
    assert "no_such_stage.py" in log.read_text()


def test_unknown_variant_is_refused_by_name(bench, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["phantom.py", "--config", str(ROOT / "configs" / "demo.yaml"),
                                      "--only", "full,alpha_7"])
    with pytest.raises(SystemExit):
        bench.main()
    assert "alpha_7" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--checkpoint", "full=x.pt"], "not a row of the bench"),
    (["--checkpoint", "big"], "give NAME=PATH"),
    (["--checkpoint", "big=no/such/best.pt"], "no file 'no/such/best.pt'"),
    (["--sample-model", "big"], "--sample-model 'big': not a trained variant"),
])
def test_a_bad_extra_checkpoint_or_model_is_refused_by_name(bench, monkeypatch, capsys, extra, message):
    monkeypatch.setattr(sys, "argv", ["phantom.py", "--config", str(ROOT / "configs" / "demo.yaml"),
                                      "--only", "population_mean", *extra])
    with pytest.raises(SystemExit):
        bench.main()
    assert message in capsys.readouterr().err


def test_every_training_variant_is_a_valid_config_of_the_bench(bench):
    from ecgflowcmr.config import load_config

    base = load_config(str(ROOT / "configs" / "phantom_bench.yaml"))
    no_pamae = load_config(str(ROOT / "configs" / "phantom_bench.yaml"), bench.TRAINED["no_pamae"][0])
    assert (no_pamae.ecg.phase_weight, no_pamae.ecg.cycle_mode) == (0.0, "window")

    def flow_of(name):
        return load_config(str(ROOT / "configs" / "phantom_bench.yaml"), bench.TRAINED[name][0]).flow

    assert (base.flow.anchor, base.flow.alpha, base.flow.motion_weight) == ("ecg", 0.5, bench.MOTION_WEIGHT)
    assert (flow_of("no_template").use_template, flow_of("no_template").anchor) == (False, "template")
    paper = flow_of("paper")
    assert (paper.anchor, paper.alpha, paper.motion_weight) == ("template", 1.0, 0.0)
    # each paper_* row is the paper's flow with its lever switched on, nothing else
    for name in (n for n in bench.TRAINED if n.startswith("paper_")):
        changed = {k for k, v in vars(flow_of(name)).items() if vars(paper)[k] != v}
        assert changed and changed <= {"anchor", "motion_weight", "alpha", "ecg_finetune", "anchor_residual",
                                       "epochs"}, (name, changed)
    alphas = {flow_of(n).alpha for n in bench.TRAINED if n.startswith("alpha_")}
    assert alphas | {base.flow.alpha} == {0.25, 0.5, 1.0}
    for name in (n for n in bench.TRAINED if n.startswith("seed_")):
        cfg = load_config(str(ROOT / "configs" / "phantom_bench.yaml"), bench.TRAINED[name][0])
        assert cfg.seed != base.seed and vars(cfg.flow) == vars(base.flow)
    assert {(s, k) for s, k, _ in bench.SAMPLED.values()} >= {("euler", 1), ("euler", 2), ("euler", 4),
                                                               ("euler", 10), ("heun", 5)}
    assert {g for _, _, g in bench.SAMPLED.values()} == {1.0, 2.0, 3.0, 4.0}
    small = flow_of("anchor_small")
    assert {k for k, v in vars(small).items() if vars(base.flow)[k] != v} == {"anchor_hidden", "anchor_steps"}


def test_variants_share_the_base_stages_they_do_not_retrain(bench, tmp_path, monkeypatch):
    from ecgflowcmr.config import load_config

    cfg_path = str(ROOT / "configs" / "phantom_bench.yaml")
    base = load_config(cfg_path)
    for name, (overrides, retrain) in bench.TRAINED.items():
        assert set(retrain) <= {"ecg", "vae"}, name
        cfg = load_config(cfg_path, overrides)
        for stage in ("ecg", "vae"):      # a stage not retrained must be configured as the base run's
            assert (vars(getattr(cfg, stage)) != vars(getattr(base, stage))) == (stage in retrain), (name, stage)
    calls = []
    monkeypatch.setattr(bench, "run_stage", lambda script, cfg_path, run, log=None, threads=None:
                        calls.append((script, next((o for o in run if o.startswith("run_dir=")), None))))
    cfg = load_config(cfg_path, [f"run_dir={tmp_path / 'run'}"])
    names = ["seed_1", "no_pamae", "vae_lr_4e-3"]
    ckpts = bench.train_variants(cfg_path, cfg, names, [])
    run = tmp_path / "run"
    assert ckpts == {n: run / "ablations" / n / "flow" / "best.pt" for n in names}
    trained = {(script, r.split("=", 1)[1].rsplit("/", 1)[-1]) for script, r in calls if r}
    assert trained == {("train_flow.py", n) for n in names} | {("train_ecg.py", "no_pamae"),
                                                               ("train_disentangle_vae3d.py", "vae_lr_4e-3")}
    linked = {n: sorted(p.name for p in (run / "ablations" / n).iterdir() if p.is_symlink()) for n in names}
    assert linked == {"seed_1": ["ecg", "latents", "vae"], "no_pamae": ["latents", "vae"], "vae_lr_4e-3": ["ecg"]}
    assert (run / "ablations" / "vae_lr_4e-3" / "ecg").resolve() == (run / "ecg").resolve()


def test_rescoring_some_variants_keeps_the_other_rows(bench, tmp_path):
    bench.write_table({"full": {"psnr": 1.0, "n_videos": 2}, "euler_1": {"psnr": 2.0, "n_videos": 2}},
                      {"config": "c.yaml", "checkpoints": {"full": "a.pt"}}, tmp_path, "c.yaml")
    text = bench.write_table({"vae_reconstruction": {"psnr": 3.0, "n_videos": 2}, "full": {"psnr": 1.5, "n_videos": 2},
                              "euler_1@seed_1": {"psnr": 2.5, "n_videos": 2}},
                             {"config": "c.yaml", "checkpoints": {}}, tmp_path, "c.yaml")
    names = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ")][1:]
    assert names == ["full", "euler_1", "euler_1@seed_1", "vae_reconstruction"]   # another model's row after its own
    saved = json.loads((tmp_path / "phantom_bench.json").read_text())
    assert saved["rows"]["full"]["psnr"] == 1.5 and saved["checkpoints"] == {"full": "a.pt"}
    # another config's table is replaced, not merged
    bench.write_table({"full": {"psnr": 9.0, "n_videos": 2}}, {"config": "d.yaml"}, tmp_path, "d.yaml")
    assert list(json.loads((tmp_path / "phantom_bench.json").read_text())["rows"]) == ["full"]


def test_vae_study_variants_are_valid_configs_and_its_table_merges(tmp_path):
    from ecgflowcmr.config import load_config

    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("vae_study", ROOT / "benchmarks" / "vae_study.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    base = load_config(str(ROOT / "configs" / "phantom_bench.yaml")).vae
    for name, overrides in study.VARIANTS.items():
        changed = {k for k, v in vars(load_config(str(ROOT / "configs" / "phantom_bench.yaml"), overrides).vae).items()
                   if vars(base)[k] != v}
        assert (name == "bench") == (not changed), (name, changed)
    study.write_table({"bench": {"psnr": 23.5, "train_seconds": 600.0}}, tmp_path, "c.yaml")
    text = study.write_table({"steps_2x": {"psnr": 24.0, "train_seconds": 1200.0}}, tmp_path, "c.yaml")
    assert "| bench | (bench VAE) | 600.0 |" in text and "| steps_2x | vae.epochs=20 | 1200.0 |" in text
    assert list(json.loads((tmp_path / "vae_study.json").read_text())["rows"]) == ["bench", "steps_2x"]


def test_demo_spread_averages_runs_and_names_a_missing_one(tmp_path):
    spec = importlib.util.spec_from_file_location("demo_spread", ROOT / "benchmarks" / "demo_spread.py")
    spread = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(spread)
    runs = []
    for i, (fid, ef) in enumerate([(200.0, 10.0), (220.0, 14.0)]):
        run = tmp_path / f"demo_seed{i}"
        (run / "eval").mkdir(parents=True)
        metrics = {"fid": {"available": True, "value": fid}, "psnr": {"available": False, "reason": "x"},
                   "functional": {"generated_vs_ground_truth": {"ef_area_error": ef}}}
        (run / "eval" / "metrics.json").write_text(json.dumps({"metrics": metrics}))
        runs.append(run)
    text = spread.table(runs)
    assert "| FID (standard TF Inception, 10 frames/video) | 210 +- 14 | 200 | 220 |" in text
    assert "| area-EF error vs ground truth (points) | 12 +- 2.8 | 10 | 14 |" in text
    assert "| PSNR (dB, paired with the real cine) | n/a | n/a | n/a |" in text
    with pytest.raises(SystemExit, match="demo_seed9"):
        spread.table([tmp_path / "demo_seed9"])


def test_instrument_columns_per_class_and_diversity_sections(bench, tmp_path):
    per_class = {"dilated": {"n": 2, "ef_area_gen": 30.0, "ef_area_true": 20.0, "lv_ed_area_gen": 1500.0,
                             "lv_ed_area_true": 2000.0, "wall_mm_gen": 7.0, "wall_mm_true": 6.5}}
    rows = {"full": {"psnr": 1.0, "n_videos": 2, "lowef_auc": 0.75, "precision": 0.5, "recall": 0.25,
                     "per_class": per_class, "_ef_area": [30.0, 31.0]}}
    extra = {"config": "c.yaml", "test_config": "configs/phantom_eval_v2.yaml",
             "diversity": {"samples": 4, "ef_area_sd_per_ecg_mean": 2.0, "_ef_area": [[1.0]]}}
    text = bench.write_table(rows, extra, tmp_path, "c.yaml")
    assert text.splitlines()[0] == "# Phantom benchmark (c.yaml, test split of configs/phantom_eval_v2.yaml, n = 2)"
    header = next(line for line in text.splitlines() if line.startswith("| variant | psnr"))
    assert header.endswith("| lowef_auc | precision | recall |")
    assert "| full | dilated | 2 | 30.0 | 20.0 | 1500 | 2000 | 7.00 | 6.50 |" in text
    assert "## Diversity (full)" in text and '"ef_area_sd_per_ecg_mean": 2.0' in text and "_ef_area" not in text
    saved = json.loads((tmp_path / "phantom_bench.json").read_text())
    assert "_ef_area" not in saved["diversity"] and "_ef_area" not in saved["rows"]["full"]
    per = json.loads((tmp_path / "per_subject.json").read_text())
    assert per["full"] == {"_ef_area": [30.0, 31.0]} and per["diversity"] == {"_ef_area": [[1.0]]}


def test_ed_readouts_ring_rule(bench):
    import numpy as np

    labels = np.zeros((1, 2, 40, 40), dtype=np.uint8)
    yy, xx = np.mgrid[:40, :40]
    r = np.hypot(yy - 20, xx - 20)
    labels[0, 0][r < 14] = 5          # myocardium ring from radius 10 to 14
    labels[0, 0][r < 10] = 1          # LV cavity of radius 10
    out = bench.ed_readouts(labels, mm_per_px=2.0)
    assert out["lv_ed_area_mm2"][0] == pytest.approx((r < 10).sum() * 4.0)
    assert out["wall_mm"][0] == pytest.approx(2.0 * 4.0, rel=0.05)   # 4 px of wall, 2 mm a pixel
