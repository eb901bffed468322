"""`validate`: parity and Dice of the engine against PyTorch, every failure listed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from click.testing import CliRunner
from factories import make_model_folder

from tucker_export.cli import cli
from tucker_export.errors import BundleError, ConfigurationError
from tucker_export.validation.validate import validate_bundle


@pytest.fixture(scope="module")
def exported_bundle(tmp_path_factory) -> tuple[Path, Path]:
    from tucker_export.exporter.decompose import decompose_model
    from tucker_export.exporter.onnx_export import export_bundle
    from tucker_export.exporter.ranks import RankPolicy

    root = tmp_path_factory.mktemp("validate")
    model_dir = make_model_folder(root / "model", folds=(0, 1), features=(16, 32, 64))
    bundle = decompose_model(model_dir, root / "bundle", policy=RankPolicy(mode="relative", factor=0.5),
                             progress=False)
    export_bundle(bundle, precisions=("fp32",), progress=False)
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        image = sitk.GetImageFromArray(rng.normal(0, 300, (20, 30, 25)).astype(np.int16))
        image.SetSpacing((1.2, 1.0, 1.5))
        sitk.WriteImage(image, str(images / f"case{i}_0000.nii.gz"))
    return root / "bundle", images


def test_engine_matches_decomposed_pytorch(exported_bundle, tmp_path: Path) -> None:
    bundle, images = exported_bundle
    report = validate_bundle(bundle, images, backend="ort", against="decomposed", use_mirroring=False,
                             min_dice=0.99, max_abs_logit=1e-3, report_path=tmp_path / "r.json", progress=False)
    assert report.failures == []
    assert report.backend == "ort"
    for fold in ("0", "1"):
        assert report.parity[fold]["max_abs"] < 1e-4
        assert report.parity[fold]["tiles"] == 8  # 4 tiles x 2 cases
    saved = json.loads((tmp_path / "r.json").read_text())
    assert set(saved["cases"]) == {"case0", "case1"}
    assert saved["cases"]["case0"]["engine_vs_reference"]["1"]["status"] in ("present", "absent")


def test_every_failure_is_listed_and_exit_is_1(exported_bundle, tmp_path: Path) -> None:
    bundle, images = exported_bundle
    labels = tmp_path / "labels"
    labels.mkdir()  # no label files: each case is a listed failure too
    result = CliRunner().invoke(cli, ["-q", "validate", "-b", str(bundle), "-i", str(images), "--backend", "ort",
                                      "--against", "decomposed", "--disable-tta", "--min-dice", "1.01",
                                      "--labels", str(labels)])
    assert result.exit_code == 1
    listed = [line for line in result.output.splitlines() if line.startswith("  - ")]
    assert any("no reference label file case0.nii.gz" in line for line in listed)
    assert any("no reference label file case1.nii.gz" in line for line in listed)
    dice_failures = [line for line in listed if "Dice engine vs reference" in line]
    assert {line.split(",")[0] for line in dice_failures} == {"  - case case0", "  - case case1"}
    assert f"{len(listed)} validation check(s) failed" in result.output


def test_ground_truth_comparison(exported_bundle, tmp_path: Path) -> None:
    bundle, images = exported_bundle
    labels = tmp_path / "labels"
    labels.mkdir()
    for i in range(2):
        source = sitk.ReadImage(str(images / f"case{i}_0000.nii.gz"))
        truth = sitk.GetImageFromArray((sitk.GetArrayFromImage(source) > 0).astype(np.uint8))
        truth.CopyInformation(source)
        sitk.WriteImage(truth, str(labels / f"case{i}.nii.gz"))
    report = validate_bundle(bundle, images, labels_dir=labels, backend="ort", against="decomposed",
                             use_mirroring=False, progress=False)
    assert "engine_vs_truth_mean_dice" in report.summary
    assert report.summary["engine_vs_truth_mean_dice"] == pytest.approx(report.summary["reference_vs_truth_mean_dice"])


def test_bad_options(exported_bundle, tmp_path: Path) -> None:
    bundle, images = exported_bundle
    with pytest.raises(ConfigurationError, match="Dice bar must be >= 0.*min_dice"):
        validate_bundle(bundle, images, min_dice=-1, progress=False)
    with pytest.raises(BundleError, match="is not a tucker-export bundle"):
        validate_bundle(images, images, progress=False)


def test_against_original_compares_with_the_recorded_model_folder(exported_bundle, tmp_path: Path) -> None:
    """The default reference: the undecomposed model the bundle records; the Tucker 0.5 network differs from it."""
    bundle, images = exported_bundle
    report = validate_bundle(bundle, images, backend="ort", against="original", use_mirroring=False,
                             report_path=tmp_path / "r.json", progress=False)
    assert report.against == "original" and report.failures == []
    decomposed = validate_bundle(bundle, images, backend="ort", against="decomposed", use_mirroring=False,
                                 progress=False)
    for fold in ("0", "1"):  # random weights: the factorization moves the logits far more than the export does
        assert report.parity[fold]["max_abs"] > 100 * decomposed.parity[fold]["max_abs"]


def test_against_original_without_the_model_folder_names_the_fix(exported_bundle, tmp_path: Path) -> None:
    import shutil

    bundle, images = exported_bundle
    moved = tmp_path / "moved-model"
    from tucker_export.bundle import Bundle

    source = Path(Bundle.load(bundle).source["model_dir"])
    shutil.copytree(source, moved)
    shutil.rmtree(source)
    try:
        with pytest.raises(BundleError, match=r"is not here.*\(reference_model\)") as raised:
            validate_bundle(bundle, images, backend="ort", against="original", use_mirroring=False, progress=False)
        assert str(source) in str(raised.value)
        result = CliRunner().invoke(cli, ["-q", "validate", "-b", str(bundle), "-i", str(images), "--backend", "ort",
                                          "--disable-tta"])
        assert result.exit_code == 1 and "(--reference-model)" in result.output
        report = validate_bundle(bundle, images, backend="ort", against="original", reference_model=moved,
                                 use_mirroring=False, progress=False)
        assert report.failures == []
    finally:
        shutil.copytree(moved, source)


def test_only_contoured_structures_are_scored_against_clinical_labels(demo_crops, tmp_path: Path) -> None:
    """A structure missing from a case's contours is unknown there: not scored with --only-contoured."""
    import shutil

    from factories import decomposed_demo_bundle

    bundle = decomposed_demo_bundle(demo_crops, tmp_path, rank_factor=0.3)
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    case = sorted(demo_crops.test_images_dir.glob("*_0000.nii.gz"))[0]
    shutil.copy(case, images / case.name)
    name = case.name.replace("_0000", "")
    truth = sitk.ReadImage(str(demo_crops.test_labels_dir / name))
    array = sitk.GetArrayFromImage(truth)
    array[array == 5] = 0  # the planner "did not contour" the mandible
    clinical = sitk.GetImageFromArray(array)
    clinical.CopyInformation(truth)
    sitk.WriteImage(clinical, str(labels / name))
    common = dict(labels_dir=labels, backend="ort", use_mirroring=False, parity_tiles=1, progress=False)
    every = validate_bundle(bundle, images, **common)
    contoured = validate_bundle(bundle, images, only_contoured=True, **common)
    case_name = name.replace(".nii.gz", "")
    assert "5" in every.cases[case_name]["reference_vs_truth"]
    assert "5" not in contoured.cases[case_name]["reference_vs_truth"]
    assert set(contoured.summary["reference_vs_truth_dice_per_class"]) == {"1", "2", "3", "4"} & set(
        contoured.cases[case_name]["reference_vs_truth"])
    assert contoured.settings["only_contoured"] is True
