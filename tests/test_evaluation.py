"""evaluation.py end to end on a fake prepared dataset and a folder of generated .npy cines."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import evaluation
from ecgflowcmr.metrics.io import from_array, load_folder, parse_sample_key
from ecgflowcmr.metrics.pipeline import evaluate
from ecgflowcmr.metrics.report import write_outputs


def write_config(tmp_path: Path, data_root: Path) -> Path:
    cfg = {"name": "evaltest", "run_dir": str(tmp_path / "run"), "device": "cpu", "seed": 0,
           "data": {"root": str(data_root)}, "eval": {"weights_dir": str(tmp_path / "no_weights")}}
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


PSNR_ONE_LEVEL = 20 * np.log10(255.0)      # every pixel one uint8 level off: 10 log10(2^2 / (2 / 255)^2)


def write_fakes(folder: Path, prepared: Path, subjects: list[str], extra_sample: bool = True) -> None:
    """Generated cines with known PSNR, float32 (1, 50, 96, 96) in [-1, 1]: subject i's sample 0 is
    its real cine (even i: PSNR capped at 100 dB, SSIM 1) or the real cine with every pixel one
    uint8 level off (odd i: ``u ^ 1``, PSNR 20 log10(255) dB); sample 1 the other one."""
    from ecgflowcmr.data.datasets import Prepared, cine_from_uint8

    p = Prepared(prepared)
    ids = p.subject_ids()
    folder.mkdir(parents=True, exist_ok=True)
    for i, s in enumerate(subjects):
        real = np.asarray(p.cine[ids.index(s)])
        exact, off = cine_from_uint8(real)[None], cine_from_uint8(real ^ 1)[None]
        first, second = (exact, off) if i % 2 == 0 else (off, exact)
        np.save(folder / f"{s}.npy", first.astype(np.float32))
        if extra_sample:
            np.save(folder / f"{s}_1.npy", second.astype(np.float32))
    (folder / "index.csv").write_text("subject_id,path\n" + "".join(f"{s},{s}.npy\n" for s in subjects))


def per_video(path: Path) -> dict:
    import csv

    with open(path, newline="") as f:
        return {(r["subject"], int(r["sample"])): r for r in csv.DictReader(f)}


def test_cli_end_to_end_paired(tmp_path, fake_prepared):
    config = write_config(tmp_path, fake_prepared)
    fakes = tmp_path / "samples"
    write_fakes(fakes, fake_prepared, ["S0010", "S0011"])
    rc = evaluation.main(["--config", str(config), "--real", "split:test", "--fake", str(fakes),
                          "--segmenter-steps", "3", "eval.bootstrap=4"])
    assert rc == 0
    out = tmp_path / "run" / "eval"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mode"] == "paired" and metrics["pairs"]["n_pairs"] == 2
    assert metrics["real"]["n_videos"] == 2 and metrics["real"]["n_frames"] == 100
    m = metrics["metrics"]
    # no weights offline: unavailable, with file, URL and folder, and the run still succeeded
    for name in ("fid", "fvd", "lpips"):
        assert m[name]["available"] is False and m[name]["file"] and m[name]["url"].startswith("https://")
        assert m[name]["put_it_in"] == str(tmp_path / "no_weights")
    assert m["fid"]["variant"] == "standard" and m["fvd"]["variant"] == "standard"
    assert m["psnr"]["available"] and m["psnr"]["n_frames"] == 100
    assert m["psnr"]["value"] == pytest.approx((100 + PSNR_ONE_LEVEL) / 2, abs=1e-6)
    rows = per_video(out / "per_video.csv")
    assert float(rows[("S0010", 0)]["psnr"]) == 100 and float(rows[("S0010", 0)]["ssim"]) == pytest.approx(1)
    assert float(rows[("S0011", 0)]["psnr"]) == pytest.approx(PSNR_ONE_LEVEL, abs=1e-6)
    assert float(rows[("S0011", 0)]["ssim"]) < 1 - 1e-6      # one level off everywhere is not identical
    assert m["ssim"]["value"] == pytest.approx((1 + float(rows[("S0011", 0)]["ssim"])) / 2, abs=1e-6)
    assert len(m["ssim"]["ci95"]) == 2
    func = m["functional"]
    assert func["available"] and "dice" in func["segmenter"] and func["generated_vs_real"]["es_frame_error_n"] == 2
    report = (out / "report.md").read_text()
    assert "unavailable" in report and "alexnet-owt-7be5be79.pth" in report and "PSNR" in report
    assert (out / "frames_real_vs_generated.png").is_file() and (out / "lv_area_curves.png").is_file()
    assert (out / "per_video.csv").read_text().startswith("subject,sample")
    assert (out / "segmenter.pt").is_file()


def test_cli_unpaired_and_all_samples(tmp_path, fake_prepared):
    config = write_config(tmp_path, fake_prepared)
    fakes = tmp_path / "samples"
    write_fakes(fakes, fake_prepared, ["S0010", "S0011"])
    rc = evaluation.main(["--config", str(config), "--real", "split:test", "--fake", str(fakes), "--unpaired",
                          "--metrics", "psnr,functional", "--segmenter-steps", "2"])
    assert rc == 0
    metrics = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    assert metrics["mode"] == "unpaired" and metrics["metrics"]["psnr"]["available"] is False
    assert "distributions" in metrics["metrics"]["functional"]
    rc = evaluation.main(["--config", str(config), "--fake", str(fakes), "--samples", "all",
                          "--metrics", "psnr,ssim"])
    assert rc == 0
    metrics = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    assert metrics["pairs"]["n_pairs"] == 4 and metrics["fake"]["n_videos"] == 4
    # every sample is paired with its own subject's real cine: sample 1 swaps exact and one-off
    psnr = {k: float(r["psnr"]) for k, r in per_video(tmp_path / "run" / "eval" / "per_video.csv").items()}
    assert psnr == {("S0010", 0): 100.0, ("S0010", 1): pytest.approx(PSNR_ONE_LEVEL),
                    ("S0011", 0): pytest.approx(PSNR_ONE_LEVEL), ("S0011", 1): 100.0}
    assert metrics["metrics"]["psnr"]["value"] == pytest.approx((100 + PSNR_ONE_LEVEL) / 2)


def test_cli_refuses_missing_samples(tmp_path, fake_prepared, caplog):
    config = write_config(tmp_path, fake_prepared)
    rc = evaluation.main(["--config", str(config), "--fake", str(tmp_path / "nothing_here")])
    assert rc == 1
    assert "infer_flow.py" in caplog.text


def test_sample_keys_and_folder_reading(tmp_path):
    known = {"S1", "S_2"}
    assert parse_sample_key("S1", known) == ("S1", 0)
    assert parse_sample_key("S1_3", known) == ("S1", 3)
    assert parse_sample_key("S_2", known) == ("S_2", 0)  # a subject id with an underscore is not split
    assert parse_sample_key("X_4", known) == ("X_4", 0)
    folder = tmp_path / "f"
    folder.mkdir()
    np.save(folder / "S1.npy", np.zeros((1, 50, 96, 96), np.float32))
    np.save(folder / "S1_1.npy", np.full((50, 96, 96), 255, np.uint8))
    cines = load_folder(folder, known, samples="all")
    assert cines.keys == ["S1", "S1_1"] and cines.cines.dtype == np.uint8
    assert cines.cines[0].max() == 128 and cines.cines[1].min() == 255  # round((0 + 1) * 127.5) = 128
    np.save(folder / "bad.npy", np.full((1, 50, 96, 96), 3.0, np.float32))
    with pytest.raises(ValueError, match="outside the cine contract"):
        load_folder(folder, None)


def test_infer_index_csv_is_followed(tmp_path):
    folder = tmp_path / "samples"
    folder.mkdir()
    for name in ("S1", "S1_1", "S2", "S3"):
        np.save(folder / f"{name}.npy", np.zeros((1, 50, 96, 96), np.float32))
    (folder / "index.csv").write_text(
        "subject,sample,status,reason,nifti,npy\n"
        "S1,0,ok,,S1.nii.gz,S1.npy\n"
        "S1,1,failed,boom,,\n"
        "S2,0,failed,boom,,\n"
        "S2,0,ok,,,S2.npy\n")  # the last row of a (subject, sample) counts; S3 is not listed
    cines = load_folder(folder, {"S1", "S2", "S3"}, samples="all")
    assert cines.keys == ["S1", "S2"]


def test_nifti_samples_are_read_without_cropping(tmp_path):
    import nibabel as nib

    rng = np.random.default_rng(0)
    cine = rng.uniform(-1, 1, (50, 96, 96)).astype(np.float32)
    folder = tmp_path / "nii"
    folder.mkdir()
    nib.save(nib.Nifti1Image(np.transpose(cine, (1, 2, 0))[:, :, None, :], np.eye(4)), str(folder / "S9.nii.gz"))
    loaded = load_folder(folder, {"S9"})
    expected = np.clip(np.rint((cine + 1) * 127.5), 0, 255).astype(np.uint8)
    assert np.array_equal(loaded.cines[0], expected)


def test_evaluate_api_with_arrays_writes_outputs(tmp_path):
    rng = np.random.default_rng(1)
    real = rng.uniform(-1, 1, (3, 1, 50, 32, 32)).astype(np.float32)
    fake = np.clip(real + rng.normal(0, 0.1, real.shape), -1, 1).astype(np.float32)
    result = evaluate(real, fake, device="cpu", metrics=["psnr", "ssim"], bootstrap=5)
    assert result["metrics"]["psnr"]["n_videos"] == 3 and len(result["metrics"]["psnr"]["ci95"]) == 2
    assert result["metrics"]["ssim"]["available"] and result["metrics"]["ssim"]["value"] < 1 - 1e-3
    same = evaluate(real, real, device="cpu", metrics=["psnr", "ssim"])["metrics"]   # known answers
    assert same["psnr"]["value"] == 100.0 and same["ssim"]["value"] == pytest.approx(1.0, abs=1e-12)
    paths = write_outputs(result, tmp_path / "eval")
    data = json.loads(paths["metrics"].read_text())
    assert "_real" not in data and data["bootstrap"]["resamples"] == 5
    renamed = from_array(fake, subjects=[f"other{i}" for i in range(len(fake))])
    with pytest.raises(ValueError, match="no generated cine matches"):
        evaluate(real, renamed, device="cpu", metrics=["psnr"])


# ----------------------------------------------------------------------------------------------
# Functional metrics with a segmenter of known answer: pairing by subject, samples, ground truth
# ----------------------------------------------------------------------------------------------


class BrightIsLV(torch.nn.Module):
    """Stands in for the trained segmenter: LV (label 1) exactly where a pixel is >= 128 (uint8)."""

    def forward(self, x):
        logits = torch.full((x.shape[0], 6, *x.shape[-2:]), -10.0)
        logits[:, 0] = 0.0
        logits[:, 1] = x[:, 0]          # x = u8 / 127.5 - 1 > 0 from 128 on
        return logits


def area_cine(ed: int, es: int, es_frame: int, size: int = 16) -> np.ndarray:
    """uint8 (50, size, size): the first A(t) pixels bright. A = ed except a triangular dip of
    width 5 frames down to ``es`` at ``es_frame`` (no wrap: frame 0 stays ED)."""
    t = np.arange(50)
    areas = np.rint(es + (ed - es) * np.minimum(1.0, np.abs(t - es_frame) / 5.0)).astype(int)
    cine = np.zeros((50, size * size), np.uint8)
    for f, a in enumerate(areas):
        cine[f, :a] = 255
    return cine.reshape(50, size, size)


# (ED area, ES area, ES frame): real subjects A-D; EF = 50, 25, 60, 20
REAL_CURVES = {"A": (200, 100, 15), "B": (160, 120, 20), "C": (100, 40, 18), "D": (250, 200, 22)}
# generated, in shuffled order; B missing, X unknown, C with two samples
FAKE_CURVES = [("D", 0, (200, 100, 20)), ("C", 1, (100, 70, 24)), ("A", 0, (200, 100, 15)),
               ("C", 0, (100, 40, 48)), ("X", 0, (90, 30, 10))]


def functional_sets():
    from types import SimpleNamespace

    from ecgflowcmr.metrics.io import CineSet

    ids = list(REAL_CURVES)
    cines = np.stack([area_cine(*REAL_CURVES[s]) for s in ids])
    gt = {"es_frame": np.array([16.0, 20.0, 17.0, 22.0]), "ef_area": np.array([0.48, 0.25, 0.62, 0.20])}
    masks = (cines >= 128).astype(np.uint8)
    real = CineSet("real", ids, [0] * 4, cines, masks, gt, prepared=SimpleNamespace(masks=masks, root="mem"))
    fake = from_array(np.stack([area_cine(*c) for _, _, c in FAKE_CURVES]),
                      subjects=[s for s, _, _ in FAKE_CURVES], samples=[k for _, k, _ in FAKE_CURVES])
    return real, fake


def test_functional_pairs_by_subject_with_shuffled_missing_and_extra_samples(monkeypatch):
    """Real pipeline from segmentation to summaries, with a segmenter whose curves are known: each
    generated cine is compared with its own subject's real cine, whatever the order."""
    from ecgflowcmr.metrics import functional

    monkeypatch.setattr(functional, "segmenter_for", lambda *a, **k: (BrightIsLV(), {"note": "known answer"}))
    real, fake = functional_sets()
    result = evaluate(real, fake, device="cpu", metrics=["functional"], samples="all")
    assert result["pairs"]["n_pairs"] == 4 and result["pairs"]["unmatched_real"] == ["B"]
    assert result["pairs"]["unmatched_generated"] == ["X"]
    # per pair: circular ES-frame error and |EF difference| against the same subject's real cine
    got = {(r["subject"], r["sample"]): (r["es_frame_error"], r["ef_area_error"]) for r in result["per_video"]}
    expected = {("D", 0): (2, 30), ("C", 1): (6, 30), ("A", 0): (0, 0), ("C", 0): (20, 0)}   # 48 vs 18: 20
    assert got.keys() == expected.keys()
    for key, (es_err, ef_err) in expected.items():
        assert got[key] == (pytest.approx(es_err), pytest.approx(ef_err, abs=1e-9)), key
    func = result["metrics"]["functional"]
    assert func["segmenter_on_eval_real"]["es_frame_error"] == 0 and func["segmenter_on_eval_real"]["dice"]["LV"] == 1
    assert func["generated_vs_real"]["ef_area_error"] == pytest.approx(15.0)
    assert func["generated_vs_real_masks"]["es_frame_error"] == pytest.approx(7.0)
    # against the manifest's ground truth (the phantom benchmark's numbers): ES 16/17/22, EF 48/62/20 %
    vs_gt = func["generated_vs_ground_truth"]
    assert vs_gt["es_frame_error"] == pytest.approx((2 + 7 + 1 + 19) / 4)
    assert vs_gt["ef_area_error"] == pytest.approx((30 + 32 + 2 + 2) / 4)
    assert vs_gt["ef_area_error_n"] == 4
    assert func["real_vs_ground_truth"]["es_frame_error"] == pytest.approx(0.5)
    assert func["real_vs_ground_truth"]["ef_area_error"] == pytest.approx(1.0)
    # samples="first" keeps C's sample 0 only
    first = evaluate(real, fake, device="cpu", metrics=["functional"], samples="first")
    assert {(r["subject"], r["sample"]) for r in first["per_video"]} == {("D", 0), ("A", 0), ("C", 0)}
    assert first["metrics"]["functional"]["generated_vs_real"]["ef_area_error"] == pytest.approx(10.0)
    # unpaired: the two distributions (generated: first samples D, A, C and X, EF 50, 50, 60, 66.7)
    dist = evaluate(real, fake, device="cpu", metrics=["functional"], paired=False)["metrics"]["functional"]
    assert dist["distributions"]["real"]["ef_area_mean"] == pytest.approx((50 + 25 + 60 + 20) / 4)
    assert dist["distributions"]["real"]["es_frame_mean"] == pytest.approx((15 + 20 + 18 + 22) / 4)
    assert dist["distributions"]["generated"]["ef_area_mean"] == pytest.approx((50 + 50 + 60 + 200 / 3) / 4)
    assert dist["distributions"]["generated"]["es_frame_mean"] == pytest.approx((20 + 15 + 48 + 10) / 4)
