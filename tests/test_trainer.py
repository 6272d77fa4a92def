"""The shared training loop (``utils.trainer``): exact resume, best/last rules, few host syncs."""
from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from ecgflowcmr.utils import dist as udist
from ecgflowcmr.utils.train import EMA, cosine_schedule, optimizer_step
from ecgflowcmr.utils.trainer import LoopSettings, Stage, Trainer


class ToyStage(Stage):
    """A linear regression with noise drawn from the stage's own generator, an EMA and a schedule."""

    name, rng_key, best_key = "toy", "toy_rng", "best_val"

    def __init__(self, scores=None):
        torch.manual_seed(0)
        self.model = torch.nn.Linear(3, 1)
        self.ema = EMA(self.model, 0.9)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=0.05)
        self.scheduler = cosine_schedule(self.optimizer, 2, 12)
        self.rng_seed = 11
        self.generator = torch.Generator().manual_seed(self.rng_seed + udist.rank())
        self.scores = scores

    def train_step(self, batch, step):
        (x,) = batch
        noise = torch.randn(x.shape[0], 1, generator=self.generator)
        loss = (self.model(x) - x.sum(1, keepdim=True) - 0.1 * noise).pow(2).mean()
        grad = optimizer_step(loss, self.optimizer, self.scheduler, self.model.parameters(), 1.0)
        return {"loss": loss.detach(), "grad_norm": grad, "lr": self.scheduler.get_last_lr()[0]}

    def validate(self):
        if self.scores is not None:
            return {"loss": self.scores.pop(0)}
        with torch.no_grad():
            x = torch.linspace(-1, 1, 12).view(4, 3)
            return {"loss": float((self.ema.module(x) - x.sum(1, keepdim=True)).pow(2).mean())}

    def state(self):
        return {"optimizer": self.optimizer, "scheduler": self.scheduler}


def make_trainer(out_dir, stage=None, weights=None, **settings):
    data = torch.utils.data.TensorDataset(torch.randn(12, 3, generator=torch.Generator().manual_seed(1)))
    loader = udist.make_loader(data, batch_size=4, train=True, seed=3, weights=weights)   # 3 steps per epoch
    stage = stage or ToyStage()
    settings = LoopSettings(**{"epochs": 4, "log_every": 2, **settings})
    return Trainer(stage, loader, settings, out_dir, {"seed": 3}, 3, torch.device("cpu"),
                   logging.getLogger("test_trainer")), stage


def weights(path):
    ckpt = torch.load(path, weights_only=True)
    return ckpt, {**{f"model.{k}": v for k, v in ckpt["model"].items()},
                  **{f"ema.{k}": v for k, v in ckpt["ema"].items()}}


@pytest.mark.parametrize("rows", [None, [1.0, 5.0, 0.0, 2.0] * 3])        # each row once / drawn by weight
def test_resume_inside_an_epoch_gives_the_same_weights_as_a_straight_run(tmp_path, rows):
    """12 steps straight == 5 steps (stopped inside epoch 2) + resume for 7 in a fresh object."""
    straight, _ = make_trainer(tmp_path / "a", weights=rows)
    straight.restore(None)
    straight.fit()
    first, _ = make_trainer(tmp_path / "b", weights=rows, max_steps=5)
    first.restore(None)
    first.fit()
    ckpt, _ = weights(tmp_path / "b" / "last.pt")
    assert (ckpt["step"], ckpt["epoch"], ckpt["extra"]["epoch_step"]) == (5, 1, 2)
    torch.manual_seed(123)                                  # a new process: other global RNG, same checkpoint
    second, _ = make_trainer(tmp_path / "b", weights=rows)
    second.restore(ckpt)
    second.fit()
    a, wa = weights(tmp_path / "a" / "last.pt")
    b, wb = weights(tmp_path / "b" / "last.pt")
    assert a["step"] == b["step"] == 12 and a["epoch"] == b["epoch"] == 4
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    assert a["extra"]["best_val"] == b["extra"]["best_val"]
    assert torch.equal(a["extra"]["toy_rng"][0], b["extra"]["toy_rng"][0])
    # the log of the resumed run continues the interrupted one: no record past the checkpoint twice
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert steps == [3, 5, 6, 9, 12]


def test_stop_after_epochs_then_resume_and_a_finished_run_is_done(tmp_path):
    trainer, _ = make_trainer(tmp_path / "a")
    trainer.restore(None)
    trainer.fit(stop_after_epochs=1)
    ckpt, _ = weights(tmp_path / "a" / "last.pt")
    assert (ckpt["step"], ckpt["epoch"]) == (3, 1)
    again, _ = make_trainer(tmp_path / "a")
    again.restore(ckpt)
    assert not again.done()
    again.fit()
    assert again.done() and (again.state.step, again.state.epoch) == (12, 4)


def test_best_follows_the_lowest_score_and_last_every_epoch(tmp_path):
    trainer, stage = make_trainer(tmp_path, stage=ToyStage(scores=[0.5, 0.3, 0.4, math.nan]))
    trainer.restore(None)
    trainer.fit()
    best, _ = weights(tmp_path / "best.pt")
    last, _ = weights(tmp_path / "last.pt")
    # epoch 4 had nothing to validate on (nan): its weights count as the best there is
    assert (best["epoch"], last["epoch"]) == (4, 4)
    assert best["extra"]["best_val"] == 0.3
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    epochs = [r for r in records if "train_loss" in r]
    assert [r["epoch"] for r in epochs] == [1, 2, 3, 4]
    assert [r["val_loss"] for r in epochs[:3]] == [0.5, 0.3, 0.4]


def test_validation_cadence_and_the_best_of_validated_epochs_only(tmp_path):
    trainer, _ = make_trainer(tmp_path, stage=ToyStage(scores=[0.2, 0.1]), val_every=2)
    trainer.restore(None)
    trainer.fit()
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [("val_loss" in r) for r in records if "train_loss" in r] == [False, True, False, True]
    best, _ = weights(tmp_path / "best.pt")
    assert best["epoch"] == 4 and best["extra"]["best_val"] == 0.1


def test_another_world_size_resumes_from_fresh_streams_with_a_warning(tmp_path, caplog):
    first, _ = make_trainer(tmp_path, max_steps=4)
    first.restore(None)
    first.fit()
    ckpt, _ = weights(tmp_path / "last.pt")
    state = ckpt["extra"]["toy_rng"][0]
    ckpt["extra"]["toy_rng"] = [state, state]                      # as if saved by two processes
    ckpt["extra"]["rng_per_rank"] = ckpt["extra"]["rng_per_rank"] * 2
    second, stage = make_trainer(tmp_path)
    with caplog.at_level(logging.WARNING, logger="test_trainer"):
        second.restore(ckpt)
    assert "not bit-exact" in caplog.text
    fresh = torch.Generator().manual_seed(stage.rng_seed + 0 + 7919 * 4)
    assert torch.equal(stage.generator.get_state(), fresh.get_state())
    second.fit()
    assert second.state.step == 12


def test_step_statistics_stay_on_the_device_between_log_steps(tmp_path, monkeypatch):
    """Only log steps and epoch ends read a statistic (a host sync on CUDA)."""
    reads = []
    real_float = torch.Tensor.__float__

    def counting_float(self):
        reads.append(1)
        return real_float(self)

    trainer, stage = make_trainer(tmp_path, epochs=1, log_every=100)
    stage.validate = lambda: {}
    trainer.restore(None)
    monkeypatch.setattr(torch.Tensor, "__float__", counting_float)
    trainer.fit()
    monkeypatch.undo()
    # the first loss, then one read per epoch mean (loss, grad_norm, lr): none per step
    assert len(reads) == 4, len(reads)
