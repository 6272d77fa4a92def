"""Drawing rare phenotypes more often (``flow.balance_by``): the weights, the sampler, and the flow's loader."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from ecgflowcmr.config import ConfigError
from ecgflowcmr.flow.trainer import balance_weights
from ecgflowcmr.utils import dist as udist
from ecgflowcmr.utils.dist import WeightedEpochSampler
from tests.flow_fakes import build_run, tiny_config, use_bridges


@pytest.mark.parametrize("power", [0.0, 0.5, 1.0, 2.0])
def test_each_value_gets_its_count_to_the_power_one_minus_p_of_the_draws(power):
    values = ["normal"] * 12 + ["dilated"] * 3 + [None] * 1 + ["hypertrophic"] * 4
    weights, shares = balance_weights(values, power, "class")
    counts = {"normal": 12, "dilated": 3, "(missing)": 1, "hypertrophic": 4}
    total = sum(c ** (1 - power) for c in counts.values())
    for value, count in counts.items():
        assert shares[value]["subjects"] == count
        assert shares[value]["share"] == pytest.approx(count ** (1 - power) / total, rel=1e-12)
    assert weights.mean() == pytest.approx(1.0) and weights[12] == pytest.approx(weights[13])
    if power == 0:
        np.testing.assert_allclose(weights, 1.0)


def test_a_continuous_column_is_refused_by_name():
    with pytest.raises(ConfigError, match="flow.balance_by: 'ef_volume' has 40 distinct values"):
        balance_weights(np.linspace(20, 60, 40), 1.0, "ef_volume")


def test_the_sampler_draws_in_proportion_to_the_weights_and_never_a_zero_weight_row():
    weights = np.array([1.0, 2.0, 0.0, 5.0, 2.0])
    sampler = WeightedEpochSampler(weights, seed=4)
    counts = np.zeros(5)
    for epoch in range(2000):
        sampler.set_epoch(epoch)
        rows = list(sampler)
        assert len(rows) == len(sampler) == 5
        counts += np.bincount(rows, minlength=5)
    expected = weights / weights.sum() * counts.sum()
    assert counts[2] == 0
    sd = np.sqrt(expected * (1 - weights / weights.sum()))
    assert np.all(np.abs(counts - expected)[expected > 0] < 4 * sd[expected > 0])


def test_the_draw_depends_on_seed_and_epoch_alone_and_ranks_share_it():
    weights = np.arange(1.0, 11.0)
    one = WeightedEpochSampler(weights, seed=2)
    ranks = [WeightedEpochSampler(weights, seed=2, rank=r, world=2) for r in range(2)]
    for epoch in (0, 3):
        one.set_epoch(epoch)
        for s in ranks:
            s.set_epoch(epoch)
        whole, parts = list(one), [list(s) for s in ranks]
        assert list(one) == whole                                   # the same epoch draws the same rows
        assert [r for pair in zip(*parts) for r in pair] == whole   # ranks take strided shares of one draw
    one.set_epoch(0)
    first = list(one)
    one.set_epoch(1)
    assert list(one) != first


@pytest.mark.parametrize("weights, match", [([1.0, -1.0], "non-negative"), ([0.0, 0.0], "positive sum"),
                                            ([1.0, float("nan")], "finite"), ([], "non-empty")])
def test_bad_weights_fail_with_a_clear_message(weights, match):
    with pytest.raises(ValueError, match=match):
        WeightedEpochSampler(weights)


def test_the_loader_refuses_weights_it_cannot_use():
    data = torch.utils.data.TensorDataset(torch.zeros(6, 1))
    with pytest.raises(ValueError, match="3 sampling weights for a dataset of 6 rows"):
        udist.make_loader(data, 2, train=True, weights=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="training loaders"):
        udist.make_loader(data, 2, train=False, weights=np.ones(6))


def test_the_flow_draws_its_training_subjects_by_the_balance_column(tmp_path, monkeypatch):
    from ecgflowcmr.flow import trainer as flow_trainer

    use_bridges(monkeypatch, real_ecg=False, real_vae=False)
    run = build_run(tmp_path / "run", n=16, real_ecg=False, real_vae=False)
    subjects = pd.read_csv(run / "data" / "subjects.csv", dtype={"subject_id": str})
    train_ids = subjects.loc[subjects["split"] == "train", "subject_id"].tolist()
    rare = set(train_ids[:2])                                       # 2 of the 12 training subjects
    subjects["class"] = ["dilated" if s in rare else "normal" for s in subjects["subject_id"]]
    subjects.to_csv(run / "data" / "subjects.csv", index=False)
    loaders = []
    make_loader = udist.make_loader
    monkeypatch.setattr(flow_trainer.udist, "make_loader", lambda *a, **kw: loaders.append(make_loader(*a, **kw))
                        or loaders[-1])
    with pytest.raises(ConfigError, match="no column 'diagnosis' .*class"):
        flow_trainer.train(tiny_config(run, "flow.epochs=1", "flow.balance_by=diagnosis"))
    summary = flow_trainer.train(tiny_config(run, "flow.epochs=1", "flow.balance_by=class"), fresh=True)
    assert summary["balance"]["dilated"] == {"subjects": 2, "share": pytest.approx(0.5)}
    ckpt = torch.load(run / "flow" / "last.pt", weights_only=True)
    assert ckpt["flow"]["balance_by"] == "class" and ckpt["flow"]["balance_power"] == 1.0
    loader, split = loaders[-1], flow_trainer.LatentSplit(run / "latents", "train")
    drawn = []
    for epoch in range(200):
        udist.set_loader_epoch(loader, epoch)
        drawn += [split.subject_ids[r] for r in loader.sampler]
    share = np.mean([s in rare for s in drawn])
    assert 0.45 < share < 0.55                                      # 2 / 12 = 0.17 without balancing
