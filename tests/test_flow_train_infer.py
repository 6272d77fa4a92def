"""Stage 3 training and stage 4 ECG-only inference, end to end on a tiny run folder.

The stage-1 encoder is the real module at a tiny size; the VAE is a fast fake for most tests (they
decode many videos) and the real tiny VAE in ``test_all_real_modules_end_to_end``.
"""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

# the real stage-1/2 modules are imported plainly: a broken import must fail here, not make the
# tests fall back to the fakes or skip the all-real test
from ecgflowcmr.ecg.encoder import load_ecg_encoder  # noqa: F401
from ecgflowcmr.ecg.pamae import PAMAE  # noqa: F401
from ecgflowcmr.flow import generator as _generator
from ecgflowcmr.flow import infer as flow_infer
from ecgflowcmr.flow.generator import CheckpointMismatch, ECGToCine, sample_seed
from ecgflowcmr.utils.checkpoint import file_hash
from ecgflowcmr.vae import VAE3D, load_vae  # noqa: F401
from tests.conftest import EXAMPLE_ECG_DIR, PTBXL_RECORDS
from tests.flow_fakes import build_run, tiny_config, use_bridges

BRIDGES = ("load_stage1_encoder", "encoder_from_spec", "load_stage2_vae", "vae_from_spec")
REAL_BRIDGES = {name: getattr(_generator, name) for name in BRIDGES}


@pytest.fixture(scope="module")
def bridges():
    mp = pytest.MonkeyPatch()
    use_bridges(mp, real_ecg=True, real_vae=False)
    yield
    mp.undo()


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, bridges) -> Path:
    return build_run(tmp_path_factory.mktemp("flowrun") / "run", n=12, real_vae=False)


@pytest.fixture(scope="module")
def trained(base_run, bridges):
    from ecgflowcmr.flow.trainer import train

    cfg = tiny_config(base_run, "flow.epochs=4", "flow.lr=3e-3", "flow.sample_every=4")
    summary = train(cfg)
    return cfg, summary


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("flow", "samples"))
    return dst


def _ecg_dir(tmp_path: Path, records=PTBXL_RECORDS[:2], bad: bool = False) -> Path:
    folder = tmp_path / "ecgs"
    folder.mkdir()
    for rec in records:
        for ext in (".hea", ".mat"):
            shutil.copy(EXAMPLE_ECG_DIR / f"{rec}{ext}", folder / f"{rec}{ext}")
    if bad:
        arr = np.random.default_rng(0).normal(size=(12, 5000)).astype(np.float32)
        arr[3, 100:200] = np.nan
        np.save(folder / "nan_record.npy", arr)
        (folder / "short_record.csv").write_text("I,II\n0.1,0.2\n0.2,0.3\n")
    return folder


def _rows(out: Path) -> dict:
    return flow_infer.read_index(out / "index.csv")


def test_refuses_without_earlier_stages(tmp_path, bridges):
    from ecgflowcmr.flow.trainer import train

    cfg = tiny_config(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="train_ecg.py"):
        train(cfg)
    import train_flow

    assert train_flow.main(["--config", "configs/demo.yaml", f"run_dir={tmp_path / 'empty'}", "device=cpu"]) == 2


def test_tiny_training_lowers_the_loss_and_embeds_everything(trained):
    cfg, summary = trained
    vals = [h["val_loss"] for h in summary["history"]]
    trains = [h["train_loss"] for h in summary["history"]]
    assert vals[-1] < vals[0] and trains[-1] < trains[0], summary["history"]
    flow_dir = cfg.run_path / "flow"
    for name in ("best.pt", "last.pt", "log.jsonl", "train_summary.json", "config.yaml"):
        assert (flow_dir / name).is_file(), name
    assert len(list((flow_dir / "previews").glob("epoch004_*.gif"))) == 2
    ckpt = torch.load(flow_dir / "best.pt", weights_only=True)          # plain tensors / containers only
    for key in ("model", "ema", "optimizer", "dit_arch", "ecg_encoder", "vae", "template", "flow"):
        assert key in ckpt, key
    assert ckpt["flow"]["normalized"] and ckpt["flow"]["alpha"] == cfg.flow.alpha
    assert ckpt["extra"]["vae_hash"] == ckpt["template"]["vae_hash"]
    assert any((flow_dir / "ecg_cache").rglob("tokens.npy"))            # frozen encoder -> cached once


def test_resume_continues_exactly(base_run, tmp_path, bridges):
    """A run killed after epoch 1, and one stopped inside epoch 2 by max_steps, both resumed,
    end bit-identical to an uninterrupted run; a finished run is not retrained; another config
    is refused unless fresh."""
    from ecgflowcmr.config import ConfigError
    from ecgflowcmr.flow.trainer import train

    overrides = ("flow.epochs=2", "flow.lr=3e-3")                       # 8 train subjects: 2 steps / epoch
    runs = {name: _copy_run(base_run, tmp_path / name) for name in ("straight", "killed", "max_steps")}
    s_full = train(tiny_config(runs["straight"], *overrides))
    train(tiny_config(runs["killed"], *overrides), stop_after_epochs=1)
    assert torch.load(runs["killed"] / "flow" / "last.pt", weights_only=True)["epoch"] == 1
    train(tiny_config(runs["killed"], *overrides), resume=True)
    train(tiny_config(runs["max_steps"], *overrides, "flow.max_steps=3"))
    mid = torch.load(runs["max_steps"] / "flow" / "last.pt", weights_only=True)
    assert (mid["step"], mid["epoch"], mid["extra"]["epoch_step"]) == (3, 1, 1)
    s_mid = train(tiny_config(runs["max_steps"], *overrides))            # no flag: resumes by itself
    a = torch.load(runs["straight"] / "flow" / "last.pt", weights_only=True)
    for name in ("killed", "max_steps"):
        b = torch.load(runs[name] / "flow" / "last.pt", weights_only=True)
        assert a["step"] == b["step"] == 4 and a["epoch"] == b["epoch"] == 2
        for key in ("model", "ema"):
            for param in a[key]:
                assert torch.equal(a[key][param], b[key][param]), (name, key, param)
    assert s_full["history"][-1]["val_loss"] == s_mid["history"][-1]["val_loss"]
    assert train(tiny_config(runs["straight"], *overrides)).get("skipped")  # complete: nothing to do
    with pytest.raises(ConfigError, match="flow.lr"):
        train(tiny_config(runs["straight"], "flow.epochs=3", "flow.lr=1e-3"))


def test_fine_tuned_encoder_is_the_one_inference_uses(base_run, tmp_path, bridges):
    from ecgflowcmr.flow.generator import module_hash
    from ecgflowcmr.flow.trainer import train

    run = _copy_run(base_run, tmp_path / "ft")
    train(tiny_config(run, "flow.ecg_finetune=true", "flow.ecg_lr=1e-2", "flow.max_steps=2"))
    ckpt = torch.load(run / "flow" / "last.pt", weights_only=True)
    assert not any((run / "flow" / "ecg_cache").rglob("tokens.npy"))         # runs the encoder per batch
    assert ckpt["extra"]["ecg_hash"] != ckpt["extra"]["ecg_source_hash"]     # the weights moved
    pipe = ECGToCine.from_checkpoint(run / "flow" / "last.pt")
    assert module_hash(pipe.encoder) == ckpt["extra"]["ecg_hash"]
    ema_encoder = {k[len("encoder."):]: v for k, v in ckpt["ema"].items() if k.startswith("encoder.")}
    for name, value in pipe.encoder.state_dict().items():
        assert torch.equal(value, ema_encoder[name]), name


def test_checkpoint_refuses_mismatched_template_vae_or_encoder(trained, tmp_path):
    cfg, _ = trained
    best = cfg.run_path / "flow" / "best.pt"
    ECGToCine.from_checkpoint(best)                                       # intact: loads
    ckpt = torch.load(best, weights_only=True)
    tampered = {
        "template": lambda c: c["template"].update(template=c["template"]["template"] + 0.1),
        "VAE": lambda c: next(v.add_(0.1) for v in c["vae"]["state_dict"].values() if v.is_floating_point()),
        "encoder": lambda c: next(v.add_(0.1) for v in c["ecg_encoder"]["state_dict"].values()
                                  if v.is_floating_point()),
    }
    for what, tamper in tampered.items():
        c = torch.load(best, weights_only=True)
        tamper(c)
        path = tmp_path / f"bad_{what}.pt"
        torch.save(c, path)
        with pytest.raises(CheckpointMismatch, match=what):
            ECGToCine.from_checkpoint(path)
    assert ckpt["extra"]["template_hash"]


def test_infer_from_ecg_files_alone(trained, tmp_path):
    cfg, _ = trained
    ckpt = tmp_path / "only" / "flow.pt"                                  # nothing but the checkpoint
    ckpt.parent.mkdir()
    shutil.copy(cfg.run_path / "flow" / "best.pt", ckpt)
    lone = tiny_config(tmp_path / "no_run_here")
    out = tmp_path / "samples"
    settings = flow_infer.settings_from(lone, str(ckpt), str(out))
    report = flow_infer.run(lone, str(_ecg_dir(tmp_path, bad=True)), settings, log=lambda *_: None)
    assert report.generated == 2 and report.bad == 2
    rows = _rows(out)
    assert {k[0] for k, r in rows.items() if r["status"] == "ok"} == set(PTBXL_RECORDS[:2])
    bad = {k[0]: r for k, r in rows.items() if r["status"] == "skipped"}
    assert set(bad) == {"nan_record", "short_record"} and all(r["reason"] for r in bad.values())
    row = rows[(PTBXL_RECORDS[0], 0)]
    expected = {"checkpoint_hash": file_hash(ckpt), "checkpoint": str(ckpt), "seed": "0",
                "sample_seed": str(sample_seed(0, PTBXL_RECORDS[0], 0)), "steps": "2", "sampler": "euler",
                "guidance": "1.0", "alpha": str(cfg.flow.alpha), "use_template": "True"}
    assert {key: row[key] for key in expected} == expected
    start, end = int(row["cycle_start"]), int(row["cycle_end"])
    assert float(row["rr_ms"]) == pytest.approx((end - start) * 2.0)        # 500 Hz: 2 ms per sample
    if row["fallback"] == "True":               # no complete cycle found: the centre 1 s window
        assert (start, end) == (2250, 2750)
    else:
        assert row["fallback"] == "False" and 0 <= start < end <= 5000
    video = np.load(out / f"{PTBXL_RECORDS[0]}.npy")
    assert video.shape == (1, 50, 96, 96) and video.dtype == np.float32 and np.abs(video).max() <= 1
    img = nib.load(str(out / f"{PTBXL_RECORDS[0]}.nii.gz"))
    assert img.shape == (96, 96, 1, 50)
    assert np.allclose(img.header.get_zooms()[:3], (1.8, 1.8, 6.0))
    rr = float(row["rr_ms"])
    assert np.isclose(img.header.get_zooms()[3], rr / 50, atol=0.01)
    assert np.allclose(np.asarray(img.dataobj)[:, :, 0, :].transpose(2, 0, 1), video[0])
    assert (out / "previews" / f"{PTBXL_RECORDS[0]}.gif").is_file()


def test_same_seed_same_video_other_seed_different(trained, tmp_path):
    cfg, _ = trained
    ecgs = str(_ecg_dir(tmp_path, records=PTBXL_RECORDS[:3]))
    outs = {}
    for name, overrides in {"a": ("infer.batch_size=3",), "b": ("infer.batch_size=1", "infer.previews=false"),
                            "c": ("infer.seed=1",)}.items():
        c = tiny_config(cfg.run_path, *overrides)
        flow_infer.run(c, ecgs, flow_infer.settings_from(c, out=str(tmp_path / name)), log=lambda *_: None)
        outs[name] = {r: np.load(tmp_path / name / f"{r}.npy") for r in PTBXL_RECORDS[:3]}
    for r in PTBXL_RECORDS[:3]:
        assert np.allclose(outs["a"][r], outs["b"][r], atol=1e-5)       # batching does not matter
        assert not np.allclose(outs["a"][r], outs["c"][r], atol=1e-3)   # another seed, another video


def test_shards_and_resume_cover_exactly_the_unsharded_run(trained, tmp_path):
    cfg, _ = trained
    c = tiny_config(cfg.run_path, "infer.previews=false")
    ecgs = str(EXAMPLE_ECG_DIR)
    full, sharded = tmp_path / "full", tmp_path / "sharded"
    quiet = lambda *_: None                                               # noqa: E731
    r_full = flow_infer.run(c, ecgs, flow_infer.settings_from(c, out=str(full)), log=quiet)
    assert r_full.generated == len(PTBXL_RECORDS)
    n_shard = 0
    for i in range(2):
        n_shard += flow_infer.run(c, ecgs, flow_infer.settings_from(c, out=str(sharded), shard=f"{i}/2"),
                                  log=quiet).generated
    ok = lambda out: {k for k, r in _rows(out).items() if r["status"] == "ok"}   # noqa: E731
    assert n_shard == len(PTBXL_RECORDS) and ok(full) == ok(sharded)
    for rec in PTBXL_RECORDS:
        assert np.allclose(np.load(full / f"{rec}.npy"), np.load(sharded / f"{rec}.npy"), atol=1e-5)
    again = flow_infer.run(c, ecgs, flow_infer.settings_from(c, out=str(full)), log=quiet)
    assert again.generated == 0 and again.skipped_done == len(PTBXL_RECORDS)
    more = flow_infer.run(c, ecgs, flow_infer.settings_from(c, out=str(full), num_samples=2), log=quiet)
    assert more.generated == len(PTBXL_RECORDS)                           # only the new k = 1 samples
    assert ok(full) == {(r, k) for r in PTBXL_RECORDS for k in (0, 1)}
    assert (full / f"{PTBXL_RECORDS[0]}_1.npy").is_file()
    with open(full / "index.csv") as f:                                   # compacted: one row per pair
        assert len(list(csv.DictReader(f))) == 2 * len(PTBXL_RECORDS)
    with pytest.raises(ValueError, match="shard"):
        flow_infer.parse_shard("2/2")


def test_all_real_modules_end_to_end(tmp_path, monkeypatch):
    """Real tiny PA-MAE encoder and real tiny 3D-VAE: train_flow.py then infer_flow.py (CLI)."""
    import infer_flow
    import train_flow

    for name, fn in REAL_BRIDGES.items():                 # undo the module's fake VAE
        monkeypatch.setattr(_generator, name, fn)
    from ecgflowcmr.config import save_config

    run = build_run(tmp_path / "run", n=8, real_ecg=True, real_vae=True)
    save_config(tiny_config(run, "flow.hidden=16", "flow.max_steps=1", "infer.steps=1"), tmp_path / "tiny.yaml")
    args = ["--config", str(tmp_path / "tiny.yaml")]
    assert train_flow.main(args) == 0
    out = tmp_path / "samples"
    assert infer_flow.main(args + ["--ecg", str(EXAMPLE_ECG_DIR / f"{PTBXL_RECORDS[0]}.hea"),
                                   "--out", str(out)]) == 0
    assert np.load(out / f"{PTBXL_RECORDS[0]}.npy").shape == (1, 50, 96, 96)
    assert _rows(out)[(PTBXL_RECORDS[0], 0)]["status"] == "ok"


def test_best_checkpoint_is_the_epoch_of_lowest_validation_loss(tmp_path, bridges, monkeypatch):
    """Validation losses 0.5, 0.3, 0.4 (scripted: training noise cannot reorder them): best.pt
    holds epoch 2, its step and the EMA weights that were validated then."""
    import json

    from ecgflowcmr.flow import trainer

    scripted, snapshots = iter([0.5, 0.3, 0.4]), []

    def validation_loss(model, *args, unconditional=False, **kw):
        if unconditional:
            return 1.0
        snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return next(scripted)

    monkeypatch.setattr(trainer, "validation_loss", validation_loss)
    run = build_run(tmp_path / "run", n=6, real_vae=False)               # 2 train subjects: 1 step / epoch
    trainer.train(tiny_config(run, "flow.epochs=3", "flow.lr=3e-3"))
    records = [json.loads(line) for line in (run / "flow" / "log.jsonl").read_text().splitlines()]
    validated = [r for r in records if "val_loss" in r]
    assert [r["val_loss"] for r in validated] == [0.5, 0.3, 0.4]
    lowest = min(validated, key=lambda r: r["val_loss"])
    best = torch.load(run / "flow" / "best.pt", weights_only=True)
    last = torch.load(run / "flow" / "last.pt", weights_only=True)
    assert (best["epoch"], best["step"]) == (lowest["epoch"], lowest["step"]) == (2, 2)
    assert best["extra"]["best_val"] == 0.3 and last["extra"]["best_val"] == 0.3 and last["epoch"] == 3
    for name, value in snapshots[1].items():
        assert torch.equal(best["ema"][name], value), name
    assert any(not torch.equal(last["ema"][n], v) for n, v in snapshots[1].items())   # the weights moved on


def test_rerun_regenerates_when_settings_or_checkpoint_change(trained, tmp_path):
    """index.csv skips a finished subject only under the same steps, guidance, seed and checkpoint."""
    cfg, _ = trained
    ecgs = str(_ecg_dir(tmp_path, records=PTBXL_RECORDS[:1]))
    out, name = tmp_path / "samples", PTBXL_RECORDS[0]
    other_ckpt = tmp_path / "other.pt"                                    # same pipeline, other DiT weights
    ckpt = torch.load(cfg.run_path / "flow" / "best.pt", weights_only=True)
    for key in ckpt["ema"]:
        if key.startswith("dit.") and ckpt["ema"][key].is_floating_point():
            ckpt["ema"][key] = ckpt["ema"][key] + 0.05
    torch.save(ckpt, other_ckpt)

    def run(*overrides, checkpoint=None):
        c = tiny_config(cfg.run_path, "infer.previews=false", "infer.steps=1", *overrides)
        report = flow_infer.run(c, ecgs, flow_infer.settings_from(c, checkpoint=checkpoint, out=str(out)),
                                log=lambda *_: None)
        return report, np.load(out / f"{name}.npy"), _rows(out)[(name, 0)]

    first, video, _ = run()
    assert first.generated == 1
    again, same, _ = run()
    assert (again.generated, again.skipped_done) == (0, 1) and np.array_equal(same, video)
    overrides, checkpoint = [], None                                     # one more change per run
    for change, column, value in (("infer.steps=2", "steps", "2"), ("infer.guidance=2.0", "guidance", "2.0"),
                                  ("infer.seed=5", "seed", "5"),
                                  (None, "checkpoint_hash", file_hash(other_ckpt))):
        if change:
            overrides.append(change)
        else:
            checkpoint = str(other_ckpt)
        report, new, row = run(*overrides, checkpoint=checkpoint)
        assert report.generated == 1 and report.skipped_done == 0, column
        assert row[column] == value and not np.allclose(new, video, atol=1e-4), column
        video = new
    again, same, _ = run(*overrides, checkpoint=checkpoint)              # identical settings: skipped
    assert (again.generated, again.skipped_done) == (0, 1) and np.array_equal(same, video)


def test_manifest_paths_are_relative_to_the_manifest_folder(trained, tmp_path, monkeypatch):
    """Run from another working directory that holds a decoy (a NaN ECG) under the same relative
    name: the manifest's own folder wins."""
    from ecgflowcmr.data.ecg_io import read_ecg

    cfg, _ = trained
    manifest_dir, elsewhere = tmp_path / "study", tmp_path / "elsewhere"
    (manifest_dir / "ecg").mkdir(parents=True)
    (elsewhere / "ecg").mkdir(parents=True)
    for i, rec in enumerate(PTBXL_RECORDS[:2]):
        np.save(manifest_dir / "ecg" / f"r{i}.npy", read_ecg(EXAMPLE_ECG_DIR / f"{rec}.hea"))
        np.save(elsewhere / "ecg" / f"r{i}.npy", np.full((12, 5000), np.nan, np.float32))
    (manifest_dir / "manifest.csv").write_text("subject_id,ecg_path\nP1,ecg/r0.npy\nP2,ecg/r1.npy\n")
    monkeypatch.chdir(elsewhere)
    c = tiny_config(cfg.run_path, "infer.previews=false")
    out = tmp_path / "samples"
    report = flow_infer.run(c, str(manifest_dir / "manifest.csv"), flow_infer.settings_from(c, out=str(out)),
                            log=lambda *_: None)
    assert (report.generated, report.bad) == (2, 0)
    rows = _rows(out)
    for i, subject in enumerate(("P1", "P2")):
        assert rows[(subject, 0)]["status"] == "ok"
        assert Path(rows[(subject, 0)]["source"]) == manifest_dir / "ecg" / f"r{i}.npy"
