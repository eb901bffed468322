"""`infer` end to end on small models: stock-identical outputs, resume, bad cases, DICOM, atomic writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from click.testing import CliRunner
from factories import make_model_folder, write_dicom_series

from tucker_export.cli import cli
from tucker_export.errors import ConfigurationError, InputImageError
from tucker_export.inference import run_inference


def _write_ct(path: Path, shape=(20, 30, 25), spacing=(1.2, 1.0, 1.5), seed: int = 0) -> sitk.Image:
    rng = np.random.default_rng(seed)
    image = sitk.GetImageFromArray(rng.normal(0, 300, shape).astype(np.int16))
    image.SetSpacing(spacing)
    image.SetOrigin((10.0, -5.0, 3.0))
    image.SetDirection((0, 1, 0, 1, 0, 0, 0, 0, 1))
    sitk.WriteImage(image, str(path))
    return image


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_model_folder(tmp_path_factory.mktemp("model"), folds=(0, 1))


@pytest.fixture
def input_dir(tmp_path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    _write_ct(folder / "a_0000.nii.gz", seed=1)
    _write_ct(folder / "b.nii.gz", seed=2)  # plain single-channel naming
    return folder


def _stock_predict(model_dir: Path, input_dir: Path, out: Path) -> None:
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    out.mkdir()
    predictor = nnUNetPredictor(device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model_dir), use_folds=(0, 1))
    files = sorted(input_dir.glob("*.nii.gz"))
    names = [f.name.removesuffix(".nii.gz").removesuffix("_0000") for f in files]
    predictor.predict_from_files_sequential([[str(f)] for f in files], [str(out / n) for n in names])


def test_torch_outputs_equal_stock_nnunet(model_dir: Path, input_dir: Path, tmp_path: Path) -> None:
    report = run_inference(input_dir, tmp_path / "ours", model_dir=model_dir, backend="torch", progress=False)
    assert [r.status for r in report.results] == ["done", "done"]
    _stock_predict(model_dir, input_dir, tmp_path / "stock")
    for name in ("a", "b"):
        ours = sitk.ReadImage(str(tmp_path / "ours" / f"{name}.nii.gz"))
        stock = sitk.ReadImage(str(tmp_path / "stock" / f"{name}.nii.gz"))
        assert np.array_equal(sitk.GetArrayFromImage(ours), sitk.GetArrayFromImage(stock))
        source = sitk.ReadImage(str(next(input_dir.glob(f"{name}*.nii.gz"))))
        assert ours.GetSize() == source.GetSize()
        assert np.allclose(ours.GetSpacing(), source.GetSpacing())
        assert np.allclose(ours.GetOrigin(), source.GetOrigin())
        assert np.allclose(ours.GetDirection(), source.GetDirection())
        assert ours.GetPixelID() == stock.GetPixelID()


def test_batch_size_3_equals_batch_1(model_dir: Path, input_dir: Path, tmp_path: Path) -> None:
    run_inference(input_dir, tmp_path / "b1", model_dir=model_dir, backend="torch", progress=False)
    run_inference(input_dir, tmp_path / "b3", model_dir=model_dir, backend="torch", progress=False, batch_size=3)
    for name in ("a", "b"):
        one = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "b1" / f"{name}.nii.gz")))
        three = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "b3" / f"{name}.nii.gz")))
        assert (one == three).mean() >= 0.999


def test_rerun_skips_finished_cases_unless_overwrite(model_dir: Path, input_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_inference(input_dir, out, model_dir=model_dir, backend="torch", progress=False, use_mirroring=False)
    stamp = (out / "a.nii.gz").stat().st_mtime_ns
    again = run_inference(input_dir, out, model_dir=model_dir, backend="torch", progress=False)
    assert [r.status for r in again.results] == ["skipped", "skipped"]
    assert (out / "a.nii.gz").stat().st_mtime_ns == stamp
    redo = run_inference(input_dir, out, model_dir=model_dir, backend="torch", progress=False,
                         overwrite=True, use_mirroring=False)
    assert [r.status for r in redo.results] == ["done", "done"]


def test_bad_cases_are_reported_and_the_rest_finish(model_dir: Path, input_dir: Path, tmp_path: Path) -> None:
    (input_dir / "corrupt.nii.gz").write_bytes(b"not a nifti file at all")
    flat = sitk.GetImageFromArray(np.zeros((30, 25), np.int16))
    sitk.WriteImage(flat, str(input_dir / "flat.nii.gz"))
    _write_ct(input_dir / "two_0000.nii.gz")
    _write_ct(input_dir / "two_0001.nii.gz")
    out = tmp_path / "out"
    result = CliRunner().invoke(
        cli, ["-q", "infer", "-i", str(input_dir), "-o", str(out), "-m", str(model_dir), "--backend", "torch",
              "--disable-tta"],
    )
    assert result.exit_code == 1
    assert "2 segmented, 0 skipped (already done), 3 failed" in result.output
    assert "FAILED corrupt: corrupt.nii.gz cannot be read" in result.output
    assert "FAILED flat: flat.nii.gz is a 2D image, the model is 3D" in result.output
    assert "FAILED two: it has 2 channel file(s), the model needs 1" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["a.nii.gz", "b.nii.gz"]  # no partial files


def test_empty_or_missing_input_is_one_error(model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputImageError, match="holds no .nii.gz or .nii images and no DICOM series"):
        run_inference(tmp_path / "empty", tmp_path / "out", model_dir=model_dir, backend="torch", progress=False)
    result = CliRunner().invoke(cli, ["infer", "-i", str(tmp_path / "nope"), "-o", str(tmp_path / "o"),
                                      "-m", str(model_dir), "--backend", "torch"])
    assert result.exit_code == 1 and "does not exist" in result.output and "Traceback" not in result.output


def test_bundle_and_model_are_exclusive(model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="exactly one"):
        run_inference(tmp_path, tmp_path / "o", progress=False)


@pytest.mark.parametrize("fast_export", [True, False])
def test_interrupted_export_leaves_no_file(model_dir: Path, input_dir: Path, tmp_path: Path, monkeypatch,
                                           fast_export: bool) -> None:
    """Ctrl-C while writing (in the export worker thread): no file, partial or whole, is left."""
    import nnunetv2.inference.export_prediction as export_module

    import tucker_export.nnunet.fast_export as fast_module

    def crash(*args, **kwargs):
        partial = next(a for a in args if isinstance(a, str))  # the truncated output name, the only str argument
        Path(partial + ".nii.gz").write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(export_module, "export_prediction_from_logits", crash)
    monkeypatch.setattr(fast_module, "export_segmentation", crash)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_inference(input_dir, out, model_dir=model_dir, backend="torch", progress=False, use_mirroring=False,
                      fast_export=fast_export)
    assert list(out.iterdir()) == []


def test_dicom_series_folders(model_dir: Path, tmp_path: Path) -> None:
    volume = (np.random.default_rng(3).normal(0, 300, (12, 24, 20))).astype(np.int16)
    volume[:, :2, :2] = np.arange(12, dtype=np.int16)[:, None, None] * 100  # slice-order fingerprint
    write_dicom_series(tmp_path / "series" / "patient1", volume)
    from tucker_export.nnunet.cases import discover_cases, read_dicom_series

    cases = discover_cases(tmp_path / "series", num_channels=1)
    assert [(c.name, c.problem) for c in cases] == [("patient1", None)]
    read = sitk.GetArrayFromImage(read_dicom_series(cases[0].dicom_dir))
    assert np.array_equal(read[:, 0, 0], np.arange(12) * 100)  # ordered by position, not file name
    report = run_inference(tmp_path / "series", tmp_path / "out", model_dir=model_dir, backend="torch",
                           progress=False, use_mirroring=False)
    assert [r.status for r in report.results] == ["done"]
    seg = sitk.ReadImage(str(tmp_path / "out" / "patient1.nii.gz"))
    assert seg.GetSize() == (20, 24, 12)


def test_real_ct_runs_through_infer(shared_ct_dir: Path, demo_model, tmp_path: Path) -> None:
    """The real CT (3 mm, 122x101x30) goes through reading, preprocessing and export unchanged in geometry."""
    report = run_inference(shared_ct_dir / "example_ct_sm.nii.gz", tmp_path / "out", model_dir=demo_model.model_dir,
                           backend="torch", progress=False, use_mirroring=False, folds=[0])
    assert [r.status for r in report.results] == ["done"]
    seg = sitk.ReadImage(str(tmp_path / "out" / "example_ct_sm.nii.gz"))
    source = sitk.ReadImage(str(shared_ct_dir / "example_ct_sm.nii.gz"))
    assert seg.GetSize() == source.GetSize()
    assert np.allclose(seg.GetSpacing(), source.GetSpacing())


def test_model_folder_through_onnx_runtime(model_dir: Path, input_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """-m with the ort backend makes (once, in the cache) an undecomposed bundle and its ONNX, then runs it."""
    monkeypatch.setenv("TUCKER_EXPORT_CACHE", str(tmp_path / "cache"))
    report = run_inference(input_dir, tmp_path / "ort", model_dir=model_dir, backend="ort", progress=False,
                           use_mirroring=False)
    assert report.backend == "ort"
    run_inference(input_dir, tmp_path / "torch", model_dir=model_dir, backend="torch", progress=False,
                  use_mirroring=False)
    for name in ("a", "b"):
        ort_seg = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "ort" / f"{name}.nii.gz")))
        torch_seg = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "torch" / f"{name}.nii.gz")))
        assert (ort_seg == torch_seg).mean() >= 0.999
    cached = [p for p in (tmp_path / "cache" / "bundles").iterdir() if not p.name.startswith(".")]  # not the lock
    assert len(cached) == 1 and (cached[0] / "onnx" / "fold_0.fp32.onnx").is_file()
    again = run_inference(input_dir, tmp_path / "ort", model_dir=model_dir, backend="ort", progress=False)
    assert [r.status for r in again.results] == ["skipped", "skipped"]


@pytest.mark.slow
def test_demo_ort_matches_stock_nnunetv2_predict(demo_crops, tmp_path: Path, monkeypatch) -> None:
    """infer -m --backend ort vs stock nnUNetv2_predict on the real-CT model, same settings, Dice >= 0.99 per class."""
    import os
    import subprocess
    import sys

    monkeypatch.setenv("TUCKER_EXPORT_CACHE", str(tmp_path / "cache"))
    folds = [str(f) for f in demo_crops.folds]
    result = CliRunner().invoke(cli, ["-q", "infer", "-i", str(demo_crops.test_images_dir), "-o", str(tmp_path / "ours"),
                                      "-m", str(demo_crops.model_dir), "--backend", "ort", "--disable-tta",
                                      "-f", ",".join(folds)])
    assert result.exit_code == 0, result.output
    env = dict(os.environ, nnUNet_results=str(demo_crops.results_dir),
               nnUNet_extTrainer=str(demo_crops.trainer_search_path),
               nnUNet_raw=str(tmp_path), nnUNet_preprocessed=str(tmp_path))
    subprocess.run(
        [str(Path(sys.executable).parent / "nnUNetv2_predict"), "-i", str(demo_crops.test_images_dir),
         "-o", str(tmp_path / "stock"), "-d", demo_crops.dataset_name, "-tr", demo_crops.trainer_name,
         "-p", demo_crops.plans_name, "-c", demo_crops.configuration, "-f", *folds, "--disable_tta",
         "-device", "cpu"],
        env=env, check=True, capture_output=True,
    )
    from tucker_export.validation.metrics import compute_class_metrics

    outputs = sorted((tmp_path / "stock").glob("*.nii.gz"))
    assert outputs
    for stock_path in outputs:
        stock = sitk.ReadImage(str(stock_path))
        ours = sitk.ReadImage(str(tmp_path / "ours" / stock_path.name))
        assert ours.GetSize() == stock.GetSize()
        assert ours.GetPixelID() == stock.GetPixelID()
        assert np.allclose(ours.GetSpacing(), stock.GetSpacing())
        assert np.allclose(ours.GetOrigin(), stock.GetOrigin())
        assert np.allclose(ours.GetDirection(), stock.GetDirection())
        metrics = compute_class_metrics(sitk.GetArrayFromImage(ours), sitk.GetArrayFromImage(stock),
                                        list(range(1, 6)), tuple(reversed(stock.GetSpacing())))
        for label, m in metrics.items():
            if m.status != "absent":
                assert m.dice >= 0.99, (stock_path.name, label, m)


def test_auto_batch_size_feeds_engines_the_mirror_variants() -> None:
    from tucker_export.errors import ConfigurationError
    from tucker_export.inference import auto_batch_size, parse_batch_size

    assert auto_batch_size("torch", mirror_variants=8, patch_size=(32, 48, 48)) == 1  # nnU-Net's numbers
    assert auto_batch_size("openvino", mirror_variants=8, patch_size=(32, 48, 48)) == 8
    assert auto_batch_size("ort", mirror_variants=1, patch_size=(32, 48, 48)) == 1  # TTA off
    assert auto_batch_size("openvino", mirror_variants=8, patch_size=(128, 128, 128)) == 1  # memory cap
    assert auto_batch_size("trt", mirror_variants=8, patch_size=(96, 96, 96)) == 2
    assert parse_batch_size("4") == 4
    with pytest.raises(ConfigurationError, match="'big' is not 'auto' or a whole number"):
        parse_batch_size("big")
    with pytest.raises(ConfigurationError, match="at least 1"):
        parse_batch_size(0)


def test_no_per_tile_bars_in_a_log_file(model_dir: Path, input_dir: Path, tmp_path: Path, capsys) -> None:
    # pytest's captured stderr is not a terminal, like a log file: one cases bar, no tile bars.
    run_inference(input_dir, tmp_path / "out", model_dir=model_dir, backend="torch", progress=True,
                  use_mirroring=False)
    err = capsys.readouterr().err
    assert "tiles" not in err and err.count("cases:") <= 3
