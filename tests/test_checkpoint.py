"""Atomic save + exact resume: a resumed run takes the same next step as an uninterrupted one."""
import numpy as np
import pytest
import torch

from ecgflowcmr.utils.checkpoint import atomic_save, load_checkpoint, make_checkpoint, restore_checkpoint, state_hash
from ecgflowcmr.utils.seed import rng_state, seed_everything, set_cuda_rng_states, set_rng_state
from ecgflowcmr.utils.train import EMA, build_optimizer, cosine_schedule


def _build():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.3), torch.nn.Linear(16, 1))
    opt = build_optimizer(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = cosine_schedule(opt, warmup_steps=3, total_steps=20)
    return model, opt, sched, EMA(model, decay=0.9)


def _step(model, opt, sched, ema):
    # Data and dropout both draw from the global RNGs, so resume must restore them too.
    x = torch.randn(4, 8)
    y = torch.from_numpy(np.random.randn(4, 1).astype(np.float32))
    loss = torch.nn.functional.mse_loss(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    ema.update(model)
    return loss.item()


def test_resume_gives_same_next_steps(tmp_path):
    seed_everything(0)
    model, opt, sched, ema = _build()
    for _ in range(5):
        _step(model, opt, sched, ema)
    atomic_save(make_checkpoint(model, opt, sched, ema=ema, step=5, config={"a": 1}), tmp_path / "last.pt")
    expected = [_step(model, opt, sched, ema) for _ in range(3)]

    seed_everything(123)  # a fresh process with other state
    model2, opt2, sched2, ema2 = _build()
    step, epoch = restore_checkpoint(load_checkpoint(tmp_path / "last.pt"), model2, opt2, sched2, ema=ema2)
    assert step == 5 and epoch == 0
    resumed = [_step(model2, opt2, sched2, ema2) for _ in range(3)]
    assert resumed == expected  # bitwise: same data, dropout masks, lr and moments
    assert state_hash(model.state_dict()) == state_hash(model2.state_dict())
    assert state_hash(ema.state_dict()) == state_hash(ema2.state_dict())


def test_checkpoint_loads_weights_only_and_is_atomic(tmp_path, monkeypatch):
    model, opt, sched, ema = _build()
    path = tmp_path / "ckpt.pt"
    atomic_save(make_checkpoint(model, opt, sched, ema=ema, step=1, config={"name": "x"}), path)
    ckpt = torch.load(path, weights_only=True)  # no pickled code anywhere
    assert ckpt["config"] == {"name": "x"} and ckpt["step"] == 1

    # A save that dies mid-way leaves the previous file intact and no temp file behind.
    def boom(obj, f):
        raise RuntimeError("disk full")
    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        atomic_save({"x": 1}, path)
    assert torch.load(path, weights_only=True)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def test_missing_checkpoint_names_file_and_stage(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.pt.*train_ecg\.py"):
        load_checkpoint(tmp_path / "nope.pt", stage_hint="train_ecg.py")


def test_rng_state_round_trip():
    seed_everything(7)
    state = rng_state()
    a = (torch.rand(3), np.random.rand(3), __import__("random").random())
    torch.manual_seed(99)
    set_rng_state(state)
    b = (torch.rand(3), np.random.rand(3), __import__("random").random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


@pytest.mark.parametrize("saved, visible, restored", [(4, 2, [0, 1]), (2, 4, [0, 1]), (3, 3, [0, 1, 2]), (1, 0, [])])
def test_cuda_rng_states_follow_the_visible_devices(saved, visible, restored):
    # a run saved on `saved` GPUs resumed on `visible` ones: restore what overlaps, never IndexError
    calls = []
    states = [torch.full((4,), i, dtype=torch.uint8) for i in range(saved)]
    n = set_cuda_rng_states(states, device_count=visible, setter=lambda st, index: calls.append((int(st[0]), index)))
    assert n == len(restored) and calls == [(i, i) for i in restored]


def test_cosine_schedule_shape():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = cosine_schedule(opt, warmup_steps=4, total_steps=14)
    lrs = []
    for _ in range(14):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0) and lrs[9] == pytest.approx(0.5)
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))


def test_checkpoint_to_resume_follows_the_resume_and_fresh_flags(tmp_path):
    from ecgflowcmr.config import ConfigError
    from ecgflowcmr.utils.checkpoint import atomic_save, checkpoint_to_resume

    last = tmp_path / "last.pt"
    assert checkpoint_to_resume(last, resume=False, fresh=False, script="train_x.py") is None
    with pytest.raises(FileNotFoundError, match=r"last\.pt.*train_x\.py \(nothing to resume\)"):
        checkpoint_to_resume(last, resume=True, fresh=False, script="train_x.py")
    atomic_save({"step": 7}, last)
    assert checkpoint_to_resume(last, resume=False, fresh=False, script="train_x.py") == {"step": 7}
    assert checkpoint_to_resume(last, resume=True, fresh=False, script="train_x.py") == {"step": 7}
    assert checkpoint_to_resume(last, resume=False, fresh=True, script="train_x.py") is None
    with pytest.raises(ConfigError, match="--resume and --fresh contradict each other"):
        checkpoint_to_resume(last, resume=True, fresh=True, script="train_x.py")
