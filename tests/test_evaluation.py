"""evaluation.py end to end on a fake prepared dataset and a folder of generated .npy cines."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
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


def write_fakes(folder: Path, prepared: Path, subjects: list[str], extra_sample: bool = True) -> None:
    """Generated cines = the real ones plus noise, float32 (1, 50, 96, 96) in [-1, 1]."""
    from ecgflowcmr.data.datasets import Prepared, cine_from_uint8

    p = Prepared(prepared)
    ids = p.subject_ids()
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for s in subjects:
        real = cine_from_uint8(np.asarray(p.cine[ids.index(s)]))[None]
        fake = np.clip(real + rng.normal(0, 0.05, real.shape), -1, 1).astype(np.float32)
        np.save(folder / f"{s}.npy", fake)
        if extra_sample:
            np.save(folder / f"{s}_1.npy", np.clip(real + rng.normal(0, 0.1, real.shape), -1, 1).astype(np.float32))
    (folder / "index.csv").write_text("subject_id,path\n" + "".join(f"{s},{s}.npy\n" for s in subjects))


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
    assert m["psnr"]["available"] and 20 < m["psnr"]["value"] < 40 and m["psnr"]["n_frames"] == 100
    assert m["ssim"]["available"] and 0 < m["ssim"]["value"] < 1 and len(m["ssim"]["ci95"]) == 2
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
    assert result["metrics"]["ssim"]["available"]
    paths = write_outputs(result, tmp_path / "eval")
    data = json.loads(paths["metrics"].read_text())
    assert "_real" not in data and data["bootstrap"]["resamples"] == 5
    renamed = from_array(fake, subjects=[f"other{i}" for i in range(len(fake))])
    with pytest.raises(ValueError, match="no generated cine matches"):
        evaluate(real, renamed, device="cpu", metrics=["psnr"])
