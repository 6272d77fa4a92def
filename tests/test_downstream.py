"""Synthetic pretraining (downstream.py): metrics, draws, subject sets, errors, and tiny runs end to end."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from ecgflowcmr.config import ConfigError, load_config
from ecgflowcmr.downstream import data as D
from ecgflowcmr.downstream import metrics as M
from ecgflowcmr.downstream.vit import VideoMAE, VideoViT, tube_mask
from tests.conftest import ROOT

CLASSES = ["normal", "normal", "dilated", "hypertrophic"]

TINY_YAML = ROOT / "configs" / "downstream_tiny.yaml"


def tiny(*overrides: str):
    return load_config(TINY_YAML, list(overrides))


# ---------------------------------------------------------------------------------------------- metrics

def test_metrics_against_hand_computed_values():
    assert M.accuracy(np.array(["a", "b", "b", "a"]), np.array(["a", "b", "a", "a"])) == 0.75
    # positives 0.8, 0.4; negatives 0.4, 0.1, 0.5 -> pairs won: (0.8: 3) + (0.4: 1 win, 1 tie) = 4.5 / 6
    assert M.binary_auc(np.array([1, 1, 0, 0, 0]), np.array([0.8, 0.4, 0.4, 0.1, 0.5])) == pytest.approx(0.75)
    assert math.isnan(M.binary_auc(np.array([1, 1]), np.array([0.2, 0.3])))
    probs = np.array([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.1, 0.3, 0.6], [0.5, 0.4, 0.1]])
    true = np.array(["a", "b", "c", "b"])
    # one-vs-rest: a: 0.7 vs (0.2, 0.1, 0.5) -> 1; b: (0.5, 0.4) vs (0.2, 0.3) -> 1; c: 0.6 vs (.1 .3 .1) -> 1
    assert M.macro_auc(true, probs, ["a", "b", "c"]) == 1.0
    probs_b = probs.copy()
    probs_b[:, 1] = [0.6, 0.5, 0.3, 0.4]            # b: (0.5, 0.4) vs (0.6, 0.3) -> 2 of 4 -> 0.5
    assert M.macro_auc(true, probs_b, ["a", "b", "c"]) == pytest.approx((1 + 0.5 + 1) / 3)
    assert M.mae([1, 2, 3], [2, 2, 5]) == pytest.approx(1.0)
    # SS_tot = 2 (mean 2), SS_res = 1 + 0 + 4 = 5 -> 1 - 5/2
    assert M.r2([1, 2, 3], [2, 2, 5]) == pytest.approx(-1.5)
    assert M.r2([1, 2, 3], [1, 2, 3]) == 1.0
    summary = M.fold_summary([0.5, 0.7, float("nan"), 0.9])
    assert summary == {"mean": pytest.approx(0.7), "std": pytest.approx(0.2), "n": 3}
    assert M.fold_summary([0.4]) == {"mean": 0.4, "std": 0.0, "n": 1}


# ---------------------------------------------------------------------------------------------- draws

def test_mixing_ratios_give_the_stated_counts_without_replacement_first():
    assert D.synthetic_count(410, 100) == 410 and D.synthetic_count(410, 300) == 1230
    assert D.synthetic_count(7, 50) == 4                      # round(3.5) -> 4 (banker's rounding: 4)
    # 5 ECGs x 2 samples: 100 % of 4 real -> 4 distinct ECGs, sample 0
    small = D.draw_pool(4, 5, 2, seed=0)
    assert small.shape == (4, 2) and len(set(small[:, 0])) == 4 and set(small[:, 1]) == {0}
    # 12 > 5 x 2: rounds of 5 ECGs each: k = 0, 1, then 0 again (repeats only now)
    big = D.draw_pool(12, 5, 2, seed=0)
    assert big.shape == (12, 2)
    assert sorted(big[:5, 0]) == list(range(5)) and set(big[:5, 1]) == {0}
    assert sorted(big[5:10, 0]) == list(range(5)) and set(big[5:10, 1]) == {1}
    assert len({tuple(r) for r in big[:10]}) == 10 and set(big[10:, 1]) == {0}
    np.testing.assert_array_equal(big[:4], small)            # the ratios nest: a smaller draw is a prefix
    one = D.draw_pool(7, 3, 1, seed=1)                        # one cine per ECG: each ECG before any twice
    assert sorted(one[:3, 0]) == [0, 1, 2] and sorted(one[3:6, 0]) == [0, 1, 2]
    with pytest.raises(D.DownstreamDataError, match="pool is empty"):
        D.draw_pool(3, 0, 1, seed=0)


def test_folds_and_balanced_cohorts():
    classes = np.array(["normal"] * 10 + ["dilated"] * 5 + ["hypertrophic"] * 5)
    fold = D.stratified_folds(classes, len(classes), 5, seed=0)
    assert np.bincount(fold).tolist() == [4, 4, 4, 4, 4]
    for c in ("normal", "dilated", "hypertrophic"):
        assert (np.bincount(fold[classes == c], minlength=5).max()
                - np.bincount(fold[classes == c], minlength=5).min()) <= 1
    cohorts = D.balanced_cohorts(classes, "normal", seed=0)
    assert sorted(cohorts) == ["dilated_vs_normal", "hypertrophic_vs_normal"]
    for task, members in cohorts.items():
        assert (classes[members] == task.split("_vs_")[0]).sum() == 5 and (classes[members] == "normal").sum() == 5
    with pytest.raises(D.DownstreamDataError, match="normal_class 'healthy'"):
        D.balanced_cohorts(classes, "healthy", seed=0)


@pytest.mark.parametrize("sizes, k, fold_sizes", [
    ((3, 3, 3), 4, [3, 2, 2, 2]),       # dealing per class would give 3, 3, 3, 0: an empty fold
    ((7, 4, 2), 3, [5, 4, 4]),          # per class: 3+2+1, 2+1+1, 2+1+0 = 6, 4, 3
    ((1, 1, 1, 1, 1), 5, [1, 1, 1, 1, 1]),
])
def test_folds_are_balanced_in_size_and_in_every_class(sizes, k, fold_sizes):
    """Class sizes where dealing each class from fold 0 again and dealing on across classes differ:
    fold sizes are within one of n / k, and each class is within one of its n_c / k in every fold."""
    names = ["a", "b", "c", "d", "e"][:len(sizes)]
    classes = np.repeat(names, sizes)
    for seed in range(3):
        fold = D.stratified_folds(classes, len(classes), k, seed=seed)
        assert sorted(np.bincount(fold, minlength=k).tolist(), reverse=True) == fold_sizes
        for name, n_c in zip(names, sizes):
            per_fold = np.bincount(fold[classes == name], minlength=k)
            assert set(per_fold.tolist()) <= {n_c // k, -(-n_c // k)}, (name, per_fold)
    # no classes: the subjects dealt as one group
    assert np.bincount(D.stratified_folds(None, 10, 4, seed=0)).tolist() == [3, 3, 2, 2]


# ---------------------------------------------------------------------------------------------- subjects

def _table(n_train=8, n_test=12):
    n = n_train + n_test
    return pd.DataFrame({"index": range(n), "subject_id": [f"S{i:04d}" for i in range(n)],
                         "split": ["train"] * n_train + ["test"] * n_test,
                         "class": [CLASSES[i % 4] for i in range(n)],
                         "ef_area": np.linspace(40, 70, n), "lv_ed_area_mm2": np.linspace(900, 1500, n)})


def test_labelled_subjects_are_never_pretraining_subjects():
    cfg = tiny("downstream.label_splits=[train,test]", "downstream.pretrain_splits=[train]", "downstream.labelled_n=6")
    table = _table()
    s = D.select_subjects(table, cfg.downstream)
    assert len(s.labelled) == 6 and not set(s.labelled) & set(s.pretrain)
    ids = table.subject_id.to_numpy()
    assert set(ids[s.pretrain]) == set(ids[:8]) - set(s.labelled_ids)      # train minus the labelled ones
    assert set(s.labelled_ids) == set(ids[s.labelled])
    with pytest.raises(D.DownstreamDataError, match="labelled_n=50"):
        D.select_subjects(table, tiny("downstream.labelled_n=50").downstream)


def test_real_n_takes_a_seeded_subset_of_the_real_pretraining_cines():
    table = _table(n_train=10)
    full = D.select_subjects(table, tiny("downstream.labelled_n=0").downstream)
    a = D.select_subjects(table, tiny("downstream.real_n=4").downstream)
    b = D.select_subjects(table, tiny("downstream.real_n=4").downstream)
    assert len(a.pretrain) == 4 and set(a.pretrain) < set(full.pretrain)
    np.testing.assert_array_equal(a.pretrain, b.pretrain)                  # seeded
    np.testing.assert_array_equal(a.labelled, full.labelled)               # the labelled set is untouched
    other = D.select_subjects(table, tiny("downstream.real_n=4", "downstream.seed=1").downstream)
    assert not np.array_equal(other.pretrain, a.pretrain)
    assert D.synthetic_count(len(a.pretrain), 300) == 12                   # ratios count from the subset
    with pytest.raises(D.DownstreamDataError, match="real_n=11"):
        D.select_subjects(table, tiny("downstream.real_n=11").downstream)
    with pytest.raises(ConfigError, match="downstream.real_n"):
        tiny("downstream.real_n=-1")
    with pytest.raises(ConfigError, match="downstream.probe"):
        tiny("downstream.probe=knn")


def test_paired_difference_against_hand_computed_values():
    from ecgflowcmr.downstream.finetune import paired_difference

    row = {"folds": {"0": {"n_test": 5, "t": {"acc": 0.8, "auc": 0.9}},
                     "1": {"n_test": 5, "t": {"acc": 0.6, "auc": 0.7}},
                     "2": {"n_test": 5, "t": {"acc": 1.0, "auc": 0.5}}}}
    real = {"folds": {"0": {"n_test": 5, "t": {"acc": 0.7, "auc": 0.9}},
                      "1": {"n_test": 5, "t": {"acc": 0.3, "auc": 0.6}}}}
    diff = paired_difference(row, real)                     # fold 2 is not in the reference: left out
    assert diff["t"]["acc"]["n"] == 2
    assert diff["t"]["acc"]["mean"] == pytest.approx(0.2)   # (0.1 + 0.3) / 2
    assert diff["t"]["acc"]["std"] == pytest.approx(math.sqrt(0.02))
    assert diff["t"]["auc"]["mean"] == pytest.approx(0.05) and "n_test" not in diff
    from ecgflowcmr.downstream.report import _difference_cell

    assert _difference_cell(diff["t"]["acc"], "acc") == "+0.200 ± 0.141*"
    assert _difference_cell({"mean": 0.2, "std": 0.1, "n": 3}, "mae") == "+0.20 ± 0.10"   # a larger error: worse
    assert _difference_cell({"mean": -0.2, "std": 0.1, "n": 3}, "mae") == "-0.20 ± 0.10*"
    from ecgflowcmr.downstream.report import tally

    columns = {"t": {"acc": {"mean": 0.2, "std": 0.1, "n": 3}, "auc": {"mean": 0.05, "std": 0.1, "n": 3}},
               "ef": {"mae": {"mean": 0.3, "std": 0.1, "n": 3}, "r2": {"mean": float("nan"), "std": 0.0, "n": 0}},
               "one": {"acc": {"mean": 0.4, "std": 0.0, "n": 1}}}
    # acc: better beyond; auc: better within; ef mae: worse beyond; r2: unscored; one fold: better, no std
    assert tally(columns) == {"columns": 4, "better": 3, "better_beyond_std": 1, "worse_beyond_std": 1}


def _labelled(features: np.ndarray, classes, phenotypes, folds: int = 4):
    from ecgflowcmr.downstream.finetune import Labelled

    n = len(features)
    cohorts = D.balanced_cohorts(np.asarray(classes), "normal", 0)
    return Labelled(torch.zeros(n, 1, 2, 4, 4), np.asarray(classes), sorted(set(classes)),
                    np.asarray(phenotypes, dtype=np.float64).reshape(n, -1), ["ef_area"],
                    np.arange(n) % folds, cohorts)


def test_linear_probe_recovers_linear_labels():
    """Classes well apart along one feature and a phenotype linear in the features: the probe scores
    them perfectly on held-out folds; a label independent of the features it cannot predict."""
    from ecgflowcmr.downstream.finetune import probe_fold

    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 6))
    kind = np.arange(80) % 3
    x[:, 0] = np.array([-2.0, 0.0, 2.0])[kind] + 0.3 * x[:, 0]          # classes 2 std apart along feature 0
    classes = np.array(["hypertrophic", "normal", "dilated"])[kind]
    ef = 50 + 3 * x[:, 1] - 2 * x[:, 2]
    lab = _labelled(x * 5 + 1, classes, ef)                                # scale and shift: standardised away
    ds = tiny("downstream.probe=linear", "downstream.probe_l2=1e-4").downstream
    folds = [probe_fold(torch.as_tensor(x * 5 + 1), lab, ds, f) for f in range(4)]
    assert min(f["all_classes"]["acc"] for f in folds) == 1.0
    assert min(f["all_classes"]["auc"] for f in folds) == 1.0
    assert min(f["dilated_vs_normal"]["acc"] for f in folds) == 1.0
    assert min(f["ef_area"]["r2"] for f in folds) > 0.999
    assert max(f["ef_area"]["mae"] for f in folds) < 0.05
    noise = _labelled(x, classes, rng.normal(50, 3, size=80))
    r2 = [probe_fold(torch.as_tensor(x), noise, ds, f)["ef_area"]["r2"] for f in range(4)]
    assert np.mean(r2) < 0.1
    again = probe_fold(torch.as_tensor(x * 5 + 1), lab, ds, 0)
    assert again == folds[0]                                                # deterministic


def test_missing_label_column_is_a_clear_error():
    table = _table().drop(columns=["ef_area"])
    with pytest.raises(D.DownstreamDataError, match=r"\['ef_area'\] not in the prepared dataset"):
        D.select_subjects(table, tiny().downstream)
    table = _table().astype({"ef_area": object})
    table.loc[15, "ef_area"] = "n/a"
    s = D.select_subjects(table, tiny().downstream)
    with pytest.raises(D.DownstreamDataError, match="'ef_area' has missing or non-numeric"):
        D.labels_of(table, s.labelled, tiny().downstream)


def test_config_section_is_validated():
    assert load_config(None).downstream.ratios == [0, 100, 200, 300]
    with pytest.raises(ConfigError, match="downstream.nope"):
        load_config(None, ["downstream.nope=1"])
    with pytest.raises(ConfigError, match="downstream.sources"):
        load_config(None, ["downstream.sources=[dreams]"])
    with pytest.raises(ConfigError, match="downstream.image_size"):
        load_config(None, ["downstream.image_size=100"])
    with pytest.raises(ConfigError, match="downstream.mask_ratio"):
        load_config(None, ["downstream.image_size=32", "downstream.mask_ratio=0.9"])   # 4 patches: none visible



def test_phantom_config_reads_the_bench_run():
    bench = load_config(ROOT / "configs" / "phantom_bench.yaml").to_dict()
    cfg = load_config(ROOT / "configs" / "downstream_phantom.yaml")
    assert cfg.run_path == Path(bench["run_dir"])
    for section in ("data", "ecg", "vae", "flow", "infer"):
        assert cfg.to_dict()[section] == bench[section], section
    ds = cfg.downstream
    # 300 % of the 100 real cines draws 300 pool ECGs once each; the other 320 are labelled
    most = D.synthetic_count(ds.real_n, max(ds.ratios))
    assert most == 300 and len(D.undrawn_pool_rows(most, ds.pool_n, ds.seed)) == 320
    # without real_n: 300 % of the 410 train cines = 1230 = 620 pool ECGs x 2 samples, less 10
    assert D.synthetic_count(410, max(ds.ratios)) <= ds.pool_n * ds.samples_per_ecg
    assert load_config(ROOT / "configs" / "ukb.yaml").downstream.image_size == 96

# ---------------------------------------------------------------------------------------------- model

def test_tube_mask_hides_the_same_positions_in_every_frame():
    keep, masked = tube_mask(3, grid_t=4, grid_s=3, ratio=0.7, generator=torch.Generator().manual_seed(0))
    assert keep.shape == (3, 4 * 3) and masked.shape == (3, 4 * 6)       # round(9 * 0.3) = 3 visible
    for b in range(3):
        spatial = keep[b].reshape(4, 3) % 9
        assert (spatial == spatial[0]).all()                              # a tube through time
        assert set(keep[b].tolist()) | set(masked[b].tolist()) == set(range(36))


def test_resized_cines_are_kept_with_the_values_of_a_fresh_batch():
    from types import SimpleNamespace

    from ecgflowcmr.downstream.pretrain import PretrainSet, ResizedCines, batch_tensor

    prepared = SimpleNamespace(cine=np.random.default_rng(0).integers(0, 256, (6, 50, 96, 96), dtype=np.uint8))
    data = PretrainSet(prepared, np.arange(6))
    ds = tiny("downstream.image_size=48", "downstream.patch=8").downstream
    resized = ResizedCines(data, ds)
    for items in ([3, 1, 5], [1, 1, 0, 2], [0, 1, 2, 3, 4, 5]):
        fresh = batch_tensor([data.cine(i) for i in items], ds)
        assert torch.equal(resized.batch(np.array(items)), fresh) and fresh.shape[2:] == (ds.frames, 48, 48)
    assert sorted(resized.memo) == [0, 1, 2, 3, 4, 5]
    assert not ResizedCines(data, ds, limit_bytes=1e3).keep                 # too large: resized per batch


def test_pretraining_resumes_exactly_and_follows_the_shared_schedule(tmp_path):
    """Killed after its first checkpoint and run again, a row ends with the encoder of an
    uninterrupted run; the learning rate is warm-up then cosine to 0 (utils.train.cosine_schedule)."""
    from types import SimpleNamespace

    from ecgflowcmr.downstream.pretrain import PretrainSet, PretrainStage, pretrain

    prepared = SimpleNamespace(cine=np.random.default_rng(1).integers(0, 256, (6, 50, 96, 96), dtype=np.uint8))
    data = PretrainSet(prepared, np.arange(6))
    ds = tiny("downstream.pretrain_steps=5", "downstream.ckpt_every=2", "downstream.pretrain_warmup=2").downstream
    whole = torch.load(pretrain(data, ds, tmp_path / "whole", torch.device("cpu")), weights_only=True)
    cut = pretrain(data, ds, tmp_path / "cut", torch.device("cpu"), stop_after_chunks=1)
    assert cut == tmp_path / "cut" / "encoder.pt"
    assert not (tmp_path / "cut" / "encoder.pt").exists() and (tmp_path / "cut" / "last.pt").is_file()
    again = torch.load(pretrain(data, ds, tmp_path / "cut", torch.device("cpu")), weights_only=True)
    assert whole["steps"] == again["steps"] == 5 and not (tmp_path / "cut" / "last.pt").exists()
    for key, value in whole["encoder"].items():
        assert torch.equal(value, again["encoder"][key]), key
    stage, lr = PretrainStage(data, ds, torch.device("cpu"), "x"), ds.pretrain_lr
    lrs = [lr * stage.scheduler.lr_lambdas[0](step) for step in range(5)]
    assert stage.optimizer.param_groups[0]["lr"] == lrs[0]
    np.testing.assert_allclose(lrs, [lr / 2, lr, lr, lr * 0.5 * (1 + math.cos(math.pi / 3)),
                                     lr * 0.5 * (1 + math.cos(2 * math.pi / 3))], rtol=1e-12)


def test_mae_learns_to_fill_masked_tubes():
    cfg = tiny()
    torch.manual_seed(0)
    mae = VideoMAE.from_config(cfg.downstream)
    cine = torch.randn(2, 1, 50, 96, 96)
    assert mae.encoder.patchify(cine).shape == (2, 5 * 4, 2 * 16 * 16)    # resized to 10 x 32 x 32
    # every 16 x 16 patch holds the same moving pattern: a masked tube is predictable from the rest
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    t = torch.arange(10.0)[:, None, None]
    cine = torch.sin(2 * math.pi * (xx / 16 + yy / 8) + t)[None, None].expand(2, 1, 10, 32, 32).clone()
    opt = torch.optim.Adam(mae.parameters(), lr=3e-3)
    losses = []
    for step in range(40):
        loss = mae(cine, generator=torch.Generator().manual_seed(step))
        losses.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[0] > 0.5 and np.mean(losses[-5:]) < 0.5 * losses[0]
    assert VideoViT.from_config(cfg.downstream)(cine).shape == (2, 20, 16)


# ---------------------------------------------------------------------------------------------- end to end

def _prepared(root: Path, n_train=12, n_test=12, seed=0) -> Path:
    """A prepared dataset whose cines carry their labels (brightness ~ EF, class ~ a blob)."""
    from tests.conftest import write_fake_prepared

    n = n_train + n_test
    write_fake_prepared(root, n=n, seed=seed, masks=False)
    table = _table(n_train, n_test)
    table.to_csv(root / "subjects.csv", index=False)
    cine = np.load(root / "cine.npy", mmap_mode="r+")
    for i in range(n):
        cine[i] = np.clip(cine[i] // 4 + int(table.ef_area[i] * 2), 0, 255)
    cine.flush()
    return root


def _pool(folder: Path, n: int, labelled_id: str, labels: bool = False) -> Path:
    """ECG-only pool manifest (npy ECGs, npy oracle cines; ``labels``: with the label columns); one
    entry has a labelled subject's id, one ECG is unreadable."""
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True)
    rows = []
    for i in range(n):
        sid = labelled_id if i == 0 else f"P{i:03d}"
        ecg = rng.normal(size=(12, 5000)).astype(np.float32) * 0.1
        if i == 1:
            ecg[3, 100:200] = np.nan
        np.save(folder / f"{sid}_ecg.npy", ecg)
        np.save(folder / f"{sid}_cine.npy", rng.uniform(-1, 1, size=(1, 50, 96, 96)).astype(np.float32))
        rows.append({"subject_id": sid, "ecg_path": f"{sid}_ecg.npy", "oracle_cmr_path": f"{sid}_cine.npy"})
        if labels:
            rows[-1].update({"class": CLASSES[i % 4], "ef_area": 40.0 + i, "lv_ed_area_mm2": 900.0 + 10 * i})
    pd.DataFrame(rows).to_csv(folder / "manifest.csv", index=False)
    return folder / "manifest.csv"


@pytest.fixture
def seen(monkeypatch):
    """Every real prepared row and pool ECG a pretraining run reads."""
    from ecgflowcmr.downstream import run as run_mod

    record = {"real": set(), "pool": set()}
    real_pretrain = run_mod.pretrain

    def spy(data, *args, **kwargs):
        record["real"] |= {int(i) for i in data.real_rows}
        for source, draws in data.synthetic:
            record["pool"] |= {int(e) for e in draws[:, 0]}
            if hasattr(source, "bank_rows"):
                record["real"] |= {int(source.bank_rows[c]) for c in source.choice}
        return real_pretrain(data, *args, **kwargs)

    monkeypatch.setattr(run_mod, "pretrain", spy)
    return record


def test_tiny_run_end_to_end_and_scored_subjects_never_pretrain(tmp_path, seen, capsys):
    from downstream import main

    data = _prepared(tmp_path / "data")
    manifest = _pool(tmp_path / "pool", 8, labelled_id="S0013")      # S0013 is a labelled (test) subject
    args = ["--config", str(TINY_YAML), f"run_dir={tmp_path / 'run'}", f"data.root={data}",
            f"downstream.pool={manifest}", "downstream.sources=[oracle]"]
    assert main(args) == 0
    out = tmp_path / "run" / "downstream"
    result = json.loads((out / "downstream.json").read_text())
    assert list(result["rows"]) == ["scratch", "real", "oracle_100", "oracle_200"]
    assert result["rows"]["oracle_100"]["counts"]["synthetic"] == 12
    assert result["rows"]["oracle_200"]["counts"]["synthetic"] == 24
    # 6 usable pool ECGs (the labelled id and the NaN ECG dropped): 200 % = 24 = each ECG 4 times
    assert result["rows"]["oracle_200"]["counts"]["oracle_distinct_ecgs"] == 6
    pool_info = json.loads((out / "pool" / "pool.json").read_text())
    assert "S0013" not in pool_info["subjects"] and "P001" not in pool_info["subjects"]
    assert len(pool_info["subjects"]) == 6
    scores = result["rows"]["real"]["scores"]
    assert set(scores) == {"all_classes", "dilated_vs_normal", "hypertrophic_vs_normal", "ef_area", "lv_ed_area_mm2"}
    assert scores["ef_area"]["mae"]["n"] == 3 and scores["all_classes"]["acc"]["n"] == 3
    md = (out / "downstream.md").read_text()
    assert "| MAE + oracle | 200 % (24) |" in md and "ViT from scratch" in md
    assert (out / "downstream.png").is_file()
    # the scored subjects: never a real pretraining cine
    subjects = json.loads((out / "subjects.json").read_text())
    labelled_rows = {int(s[1:]) for s in subjects["labelled"]}
    assert labelled_rows == set(range(12, 24))
    assert seen["real"] == set(range(12)) and not seen["real"] & labelled_rows

    # resumable: a second run trains nothing and gives the same table
    stamps = {p: p.stat().st_mtime_ns for p in (out / "pretrain").rglob("encoder.pt")}
    assert len(stamps) == 3
    assert main(args) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "pretrain").rglob("encoder.pt")} == stamps
    assert json.loads((out / "downstream.json").read_text())["rows"] == result["rows"]
    assert "pretraining done, skipped" in capsys.readouterr().out


def test_tiny_run_with_a_linear_probe_and_scarce_real_cines(tmp_path, seen):
    from downstream import main

    data = _prepared(tmp_path / "data")
    manifest = _pool(tmp_path / "pool", 8, labelled_id="S0013")
    args = ["--config", str(TINY_YAML), f"run_dir={tmp_path / 'run'}", f"data.root={data}",
            f"downstream.pool={manifest}", "downstream.sources=[oracle]", "downstream.ratios=[0,100]",
            "downstream.real_n=6", "downstream.probe=linear"]
    assert main(args) == 0
    out = tmp_path / "run" / "downstream"
    result = json.loads((out / "downstream.json").read_text())
    assert list(result["rows"]) == ["scratch", "real", "oracle_100"]
    assert result["rows"]["oracle_100"]["counts"]["synthetic"] == 6           # 100 % of the 6 real cines
    assert len(seen["real"]) == 6 and seen["real"] < set(range(12))
    assert sorted(p.name for p in (out / "probe").glob("*.json")) == ["oracle_100.json", "real.json", "scratch.json"]
    assert not (out / "finetune").exists() or not list((out / "finetune").glob("*.json"))
    scores = result["rows"]["real"]["scores"]
    assert scores["ef_area"]["r2"]["n"] == 3 and scores["all_classes"]["auc"]["n"] == 3
    md = (out / "downstream.md").read_text()
    assert "linearly probed" in md and "Paired difference to MAE on real" in md
    assert "| MAE + oracle | 100 % | " in md.split("Against MAE on real")[1]
    # (3 class tasks + 2 phenotypes) x 2 metrics
    assert result["rows"]["oracle_100"]["vs_real_tally"]["columns"] == 10
    assert "vs_real" not in result["rows"]["real"]
    assert result["rows"]["oracle_100"]["vs_real"]["ef_area"]["mae"]["n"] == 3


def test_undrawn_pool_subjects_join_the_labelled_set_and_are_never_drawn(tmp_path, seen, capsys):
    from downstream import main

    data = _prepared(tmp_path / "data")
    manifest = _pool(tmp_path / "pool", 12, labelled_id="S0013", labels=True)    # 10 usable pool ECGs
    args = ["--config", str(TINY_YAML), f"run_dir={tmp_path / 'run'}", f"data.root={data}",
            f"downstream.pool={manifest}", "downstream.sources=[oracle]", "downstream.ratios=[0,50,100]",
            "downstream.real_n=6", "downstream.probe=linear", "downstream.label_pool=true"]
    # only the 50 % row first: the labelled set still leaves out the 6 ECGs the 100 % row will draw
    assert main(args + ["--only", "oracle_50"]) == 0
    out = tmp_path / "run" / "downstream"
    subjects = json.loads((out / "subjects.json").read_text())["labelled"]
    assert main(args + ["--only", "oracle_100"]) == 0
    assert main(args + ["--only", "scratch,real"]) == 0
    assert json.loads((out / "subjects.json").read_text())["labelled"] == subjects
    # the table keeps the plan's order, whatever ran first
    assert (list(json.loads((out / "downstream.json").read_text())["rows"])
            == ["scratch", "real", "oracle_50", "oracle_100"])
    pool_ids = json.loads((out / "pool" / "pool.json").read_text())["subjects"]
    assert len(pool_ids) == 10
    drawn = {pool_ids[e] for e in seen["pool"]}
    from_pool = [s for s in subjects if s.startswith("P")]
    assert len(drawn) == 6 and len(from_pool) == 4 and len(subjects) == 12 + 4
    assert not drawn & set(from_pool) and set(from_pool) | drawn == set(pool_ids)
    assert not seen["real"] & {int(s[1:]) for s in subjects if s.startswith("S")}
    # their true cines and the manifest's labels are scored: the probe sees 16 subjects over 3 folds
    result = json.loads((out / "downstream.json").read_text())
    assert result["setup"]["labelled subjects"] == "16 (4 from the pool)"
    record = json.loads((out / "probe" / "real.json").read_text())
    assert record["key"]["labelled"] == subjects and len(record["folds"]) == 3
    oracle_done = np.load(out / "pool" / "oracle.done.npy")[:, 0]
    assert oracle_done.all()                                # 6 drawn + 4 labelled
    # the largest draw leaves no pool ECG to label; a pool without the label columns
    assert main(args + ["downstream.ratios=[0,200]", f"downstream.out_dir={tmp_path / 'b'}"]) == 2
    assert "none is left to label" in capsys.readouterr().err
    bare = _pool(tmp_path / "bare", 12, labelled_id="S0013")
    assert main(args + [f"downstream.pool={bare}", f"downstream.out_dir={tmp_path / 'c'}"]) == 2
    assert "['class', 'ef_area', 'lv_ed_area_mm2'] not in pool manifest" in capsys.readouterr().err


def test_jobs_pretrain_rows_in_worker_processes_with_the_same_data(tmp_path):
    from downstream import main

    data = _prepared(tmp_path / "data")
    manifest = _pool(tmp_path / "pool", 8, labelled_id="S0013")
    base = ["--config", str(TINY_YAML), f"data.root={data}", f"downstream.pool={manifest}",
            "downstream.sources=[oracle]", "downstream.probe=linear"]
    assert main(base + [f"run_dir={tmp_path / 'seq'}"]) == 0
    assert main(base + [f"run_dir={tmp_path / 'par'}", "--jobs", "2"]) == 0
    seq, par = tmp_path / "seq" / "downstream", tmp_path / "par" / "downstream"
    logs = sorted((par / "logs").glob("worker_*.log"))
    assert len(logs) == 2                                   # rows real, oracle_100, oracle_200 dealt to 2 workers
    assert "real: pretraining 3 steps" in logs[0].read_text() and "oracle_200: pretraining" in logs[0].read_text()
    assert "oracle_100: pretraining" in logs[1].read_text() and "real: pretraining" not in logs[1].read_text()

    def fingerprints(out):
        return {p.parent.name: torch.load(p, weights_only=True)["fingerprint"]
                for p in (out / "pretrain").rglob("encoder.pt")}

    assert fingerprints(par) == fingerprints(seq) and len(fingerprints(par)) == 3
    rows = json.loads((par / "downstream.json").read_text())["rows"]
    assert list(rows) == ["scratch", "real", "oracle_100", "oracle_200"]
    assert {k: v["counts"] for k, v in rows.items()} == \
        {k: v["counts"] for k, v in json.loads((seq / "downstream.json").read_text())["rows"].items()}


def test_missing_pool_or_flow_checkpoint_is_a_clear_error(tmp_path, capsys):
    from downstream import main

    data = _prepared(tmp_path / "data")
    base = ["--config", str(TINY_YAML), f"run_dir={tmp_path / 'run'}", f"data.root={data}"]
    assert main(base + ["downstream.sources=[oracle]"]) == 2
    assert "no ECG-only pool" in capsys.readouterr().err
    assert main(base + [f"downstream.pool={tmp_path / 'nowhere'}"]) == 2
    assert "does not exist" in capsys.readouterr().err
    pool = _pool(tmp_path / "pool", 4, labelled_id="X")
    pd.read_csv(pool).drop(columns=["oracle_cmr_path"]).to_csv(pool, index=False)
    assert main(base + [f"downstream.pool={pool}", "downstream.sources=[oracle]"]) == 2
    assert "needs the true cines" in capsys.readouterr().err
    assert main(base + [f"downstream.pool={pool}", "downstream.sources=[generator]"]) == 2
    assert "train_flow.py" in capsys.readouterr().err
    assert main(base + ["downstream.regression_columns=[lvm]", "downstream.sources=[]", "downstream.ratios=[0]"]) == 2
    assert "['lvm'] not in the prepared dataset" in capsys.readouterr().err


def test_flow_sources_generator_nearest_template(tmp_path, monkeypatch, seen, capsys):
    """The three sources that read a flow checkpoint, on a tiny trained flow (fake VAE)."""
    from downstream import main
    from ecgflowcmr.flow.generator import ECGToCine
    from ecgflowcmr.flow.trainer import train
    from tests.flow_fakes import build_run, tiny_config, use_bridges

    use_bridges(monkeypatch, real_ecg=True, real_vae=False)
    run = build_run(tmp_path / "run", n=12, real_vae=False)
    train(tiny_config(run, "flow.epochs=1"))
    _table(6, 6).to_csv(run / "data" / "subjects.csv", index=False)       # 6 pretraining, 6 labelled
    manifest = _pool(tmp_path / "pool", 8, labelled_id="S0007")
    args = ["--config", str(TINY_YAML), f"run_dir={run}", f"downstream.pool={manifest}",
            "downstream.sources=[generator,nearest,template]", "downstream.ratios=[200]",
            "downstream.samples_per_ecg=2", "downstream.scratch=false"]
    assert main(args) == 0
    out = run / "downstream"
    result = json.loads((out / "downstream.json").read_text())
    assert list(result["rows"]) == ["generator_200", "nearest_200", "template_200"]
    assert {r["counts"]["synthetic"] for r in result["rows"].values()} == {12}
    # 6 usable pool ECGs x 2 samples = 12: every generated sample once
    done = np.load(out / "pool" / "generator.done.npy")
    assert done.shape == (6, 2) and done.all()
    generated = np.load(out / "pool" / "generator.npy")
    assert not np.array_equal(generated[0, 0], generated[0, 1])           # two samples of one ECG differ
    flow = ECGToCine.from_checkpoint(run / "flow" / "best.pt", "cpu")
    pool_ecg = torch.from_numpy(np.load(out / "pool" / "ecg.npy")[:1])
    subject = json.loads((out / "pool" / "pool.json").read_text())["subjects"][0]
    from ecgflowcmr.data.datasets import cine_to_uint8
    from ecgflowcmr.flow.generator import sample_seed

    again = flow.generate(pool_ecg, [sample_seed(0, subject, 1)], steps=1).cine[0, 0].numpy()
    np.testing.assert_array_equal(cine_to_uint8(again), generated[0, 1])    # sample k of that ECG, as infer_flow
    # nearest: real pretraining cines only (never a labelled subject's)
    assert seen["real"] == set(range(6))
    # another flow checkpoint (or sampler) must not reuse these cines
    key = json.loads((out / "pool" / "generator.key.json").read_text())
    assert key["steps"] == 1 and len(key["flow"]) == 16
    assert main(args + ["infer.steps=2"]) == 2
    assert "holds cines made with" in capsys.readouterr().err
    # template: the decoded template, whatever the ECG
    from ecgflowcmr.downstream.sources import build_source

    template = build_source("template", load_config(TINY_YAML), None, None, None, out, flow)
    np.testing.assert_array_equal(template.cine(3, 0), cine_to_uint8(flow.template_video()[0, 0].numpy()))


@pytest.mark.parametrize("change", ["infer.guidance=2.5", "infer.steps=2", "infer.sampler=heun", "infer.seed=1"])
def test_generated_cines_are_keyed_by_every_sampling_setting(tmp_path, change):
    """Cines generated with one setting are never reused for another: the second cache opens with
    another key and is refused; the same setting opens the same cache again."""
    from types import SimpleNamespace

    from ecgflowcmr.downstream.sources import Pool, build_source

    checkpoint = tmp_path / "flow.pt"
    checkpoint.write_bytes(b"flow weights")
    flow = SimpleNamespace(info={"checkpoint": str(checkpoint), "vae_hash": "v", "ecg_hash": "e"})
    pool = Pool(["P0", "P1"], np.zeros((2, 12, 5000), np.float32), None, "pool")
    out = tmp_path / "downstream"
    build_source("generator", tiny(), pool, None, None, out, flow)
    first = json.loads((out / "pool" / "generator.key.json").read_text())
    assert (first["guidance"], first["steps"], first["sampler"], first["seed"]) == (1.0, 1, "euler", 0)
    with pytest.raises(D.DownstreamDataError, match="holds cines made with"):
        build_source("generator", tiny(change), pool, None, None, out, flow)
    build_source("generator", tiny(), pool, None, None, out, flow)       # the same key: reopened
    fresh = tmp_path / "other"
    build_source("generator", tiny(change), pool, None, None, fresh, flow)
    assert json.loads((fresh / "pool" / "generator.key.json").read_text()) != first
