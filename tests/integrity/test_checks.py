"""Case checks before segmentation: DICOM series, NaN voxels, memory, and `infer`/`check` refusing broken scans."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from click.testing import CliRunner
from factories import make_model_folder, write_ct, write_dicom_series

from tucker_export.cli import cli
from tucker_export.integrity.checks import ModelNeeds, check_case, check_inputs
from tucker_export.integrity.volume import estimate_peak_bytes, nonfinite_problems
from tucker_export.nnunet.cases import discover_cases

NEEDS = ModelNeeds(num_channels=1, spatial_dims=3, ct_model=True, classes=4, target_spacing=(1.5, 1.0, 1.0))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_model_folder(tmp_path_factory.mktemp("model"), folds=(0,))


def _volume(slices: int = 12) -> np.ndarray:
    return np.random.default_rng(3).normal(0, 300, (slices, 24, 20)).astype(np.int16)


def _only_case(path: Path):
    (case,) = discover_cases(path, num_channels=1)
    return case


def test_dicom_series_with_a_slice_removed(tmp_path: Path) -> None:
    write_dicom_series(tmp_path / "gap", _volume(), skip_slices=(5,))
    check = check_case(_only_case(tmp_path / "gap"), NEEDS)
    (error,) = check.errors
    assert error.startswith("gap/: between slices ")
    assert "(at 6.00 and 9.00 mm) the step is 3.00 mm, 2.0x the median 1.50 mm: about 1 slice(s) missing" in error


def test_sound_dicom_series_passes_with_its_shape(tmp_path: Path) -> None:
    write_dicom_series(tmp_path / "ok", _volume())
    check = check_case(_only_case(tmp_path / "ok"), NEEDS)
    assert check.ok and not check.warnings
    assert check.shape == (20, 24, 12) and np.allclose(check.spacing, (1.0, 1.2, 1.5))


def test_two_series_in_one_folder_are_refused(tmp_path: Path) -> None:
    write_dicom_series(tmp_path / "mixed", _volume(), series_uid="1.2.3.4.1001")
    write_dicom_series(tmp_path / "mixed", _volume(), series_uid="1.2.3.4.1002")
    check = check_case(_only_case(tmp_path / "mixed"), NEEDS)
    assert check.errors == ["mixed/ holds 2 DICOM series; put each series in its own folder"]


def test_mixed_thickness_and_orientation(tmp_path: Path) -> None:
    from tucker_export.integrity.dicom import DicomSlice, series_findings

    def slices(thickness=(1.5, 1.5, 1.5), last_orientation=(1, 0, 0, 0, 1, 0)):
        orientations = [(1, 0, 0, 0, 1, 0)] * 2 + [last_orientation]
        return [DicomSlice(Path(f"s{i}.dcm"), (0, 0, 1.5 * i), orientations[i], thickness[i], "CT") for i in range(3)]

    assert series_findings(slices(), ct_model=True).errors == []
    assert "different thicknesses (1.5, 3 mm)" in series_findings(slices((1.5, 3.0, 1.5)), ct_model=True).errors[0]
    tilted = series_findings(slices(last_orientation=(1, 0, 0, 0, 0.9, 0.436)), ct_model=True).errors[0]
    assert tilted.startswith("slice s2.dcm is oriented (1, 0, 0, 0, 0.9, 0.436)")


def test_non_ct_modality_warns_and_strict_refuses(tmp_path: Path) -> None:
    write_dicom_series(tmp_path / "mr", _volume(), modality="MR")
    case = _only_case(tmp_path / "mr")
    relaxed = check_case(case, NEEDS)
    assert relaxed.ok and relaxed.warnings == ["mr/: its modality is MR, the model was trained on CT"]
    strict = check_case(case, NEEDS, strict=True)
    assert strict.errors == ["mr/: its modality is MR, the model was trained on CT (refused in strict mode)"]


def test_nonfinite_voxels_are_counted_per_channel() -> None:
    data = np.zeros((2, 4, 4, 4), np.float32)
    data[1, 0, 0, :3] = np.nan
    data[1, 1, 1, 1] = np.inf
    assert nonfinite_problems(data, [Path("a_0000.nii.gz"), Path("a_0001.nii.gz")]) == [
        "a_0001.nii.gz: 3 NaN and 1 infinite voxels of 64; readers turn them into made-up intensities "
        "(SimpleITK reads NaN as 0)"
    ]
    assert nonfinite_problems(np.zeros((1, 4), np.int16), [Path("a")]) == []


def test_memory_estimate_grows_with_classes_and_resolution() -> None:
    scan = ((512, 512, 300), (0.8, 0.8, 1.5), (1.5, 1.5, 1.5))
    model_voxels = 512 * 512 * 300 * (0.8 * 0.8 / 1.5**2)
    stock = estimate_peak_bytes(*scan, channels=1, classes=118, stock_export=True)
    # stock's export holds every class's logits in float64 at the model's spacing
    assert stock >= 118 * model_voxels * 8
    chunked = estimate_peak_bytes(*scan, channels=1, classes=118)
    assert 118 * model_voxels * 2 <= chunked < stock / 3  # the fp16 accumulators dominate
    assert estimate_peak_bytes(*scan, channels=1, classes=2) < chunked / 4


def test_a_case_too_large_for_memory_is_refused_before_work(tmp_path: Path) -> None:
    write_ct(tmp_path / "big.nii.gz")
    check = check_case(_only_case(tmp_path / "big.nii.gz"), NEEDS, available_memory=lambda: 1_000)
    (error,) = check.errors
    assert error.startswith("segmenting it needs about 0.0 GiB at its peak (25x30x20 voxels, resampled to 1.5x1x1 mm, "
                            "4 classes) and this machine has 0.0 GiB available")
    assert "crop the scan" in error
    assert check_case(_only_case(tmp_path / "big.nii.gz"), NEEDS, available_memory=lambda: None).ok


def _broken_folder(folder: Path) -> dict[str, str]:
    """A good case and one of each broken kind; returns the sentence expected for each broken one."""
    folder.mkdir()
    write_ct(folder / "good.nii.gz", seed=1)
    write_ct(folder / "cut.nii.gz", seed=2)
    data = (folder / "cut.nii.gz").read_bytes()
    (folder / "cut.nii.gz").write_bytes(data[: len(data) // 2])
    write_ct(folder / "nan.nii.gz", seed=3, dtype=np.float32)
    image = sitk.ReadImage(str(folder / "nan.nii.gz"))
    array = sitk.GetArrayFromImage(image)
    array[3, 4, 5:9] = np.nan
    broken = sitk.GetImageFromArray(array)
    broken.CopyInformation(image)
    sitk.WriteImage(broken, str(folder / "nan.nii.gz"))
    write_ct(folder / "flat.nii.gz", seed=4)
    raw = bytearray(gzip.decompress((folder / "flat.nii.gz").read_bytes()))
    raw[88:92] = np.array([0.0], "<f4").tobytes()  # pixdim[3]: zero slice spacing
    (folder / "flat.nii.gz").write_bytes(gzip.compress(bytes(raw)))
    write_dicom_series(folder / "gappy", _volume(), skip_slices=(7,))
    write_ct(folder / "short.nii", seed=5)  # uncompressed, with its last 1000 bytes lost
    (folder / "short.nii").write_bytes((folder / "short.nii").read_bytes()[:-1000])
    write_dicom_series(folder / "mixed", _volume(), series_uid="1.2.3.4.1001")
    write_dicom_series(folder / "mixed", _volume(), series_uid="1.2.3.4.1002")
    return {
        "cut": f"cut.nii.gz: the gzip stream ends after {len(data) // 2:,} bytes, before its end marker",
        "nan": "nan.nii.gz: 4 NaN and 0 infinite voxels of 15,000; readers turn them into made-up intensities",
        "flat": "flat.nii.gz: its voxel spacing (1.2, 1, 0 mm) has a zero, negative or non-finite value",
        "gappy": "gappy/: between slices",
        "short": "short.nii: the file holds 29,352 bytes; the header promises 15,000 voxels",
        "mixed": "mixed/ holds 2 DICOM series; put each series in its own folder",
    }


def test_infer_refuses_each_broken_scan_and_segments_the_rest(model_dir: Path, tmp_path: Path) -> None:
    expected = _broken_folder(tmp_path / "in")
    out = tmp_path / "out"
    report_path = tmp_path / "report.json"
    result = CliRunner().invoke(cli, ["-q", "infer", "-i", str(tmp_path / "in"), "-o", str(out), "-m", str(model_dir),
                                      "--backend", "torch", "--disable-tta", "--report", str(report_path)])
    assert result.exit_code == 1, result.output
    assert "1 segmented, 0 skipped (already done), 6 failed" in result.output
    for name, sentence in expected.items():
        assert f"FAILED {name}: {sentence}" in result.output
    assert "Traceback" not in result.output
    assert [p.name for p in out.iterdir()] == ["good.nii.gz"]  # nothing written for a broken scan
    cases = {c["name"]: c for c in json.loads(report_path.read_text())["cases"]}
    assert cases["good"]["status"] == "done" and "check" in cases["good"]["seconds"]
    assert cases["good"]["peak_rss_mb"] > 0 and cases["cut"]["peak_rss_mb"] is None
    assert {n for n, c in cases.items() if c["status"] == "failed"} == set(expected)


def test_check_command_tables_every_case(model_dir: Path, tmp_path: Path) -> None:
    expected = _broken_folder(tmp_path / "in")
    report_path = tmp_path / "check.json"
    for args in (["check", "-i", str(tmp_path / "in"), "-m", str(model_dir)],
                 ["infer", "--check-only", "-i", str(tmp_path / "in"), "-m", str(model_dir)],
                 ["check", "-i", str(tmp_path / "in"), "--report", str(report_path)]):
        result = CliRunner().invoke(cli, ["-q", *args])
        assert result.exit_code == 1, result.output
        assert "1 of 7 case(s) can be segmented, 6 cannot." in result.output
        assert "Error: 6 of 7 case(s) failed their checks (listed above)." in result.output
        for sentence in expected.values():
            assert f"error: {sentence}" in result.output
    saved = {c["name"]: c for c in json.loads(report_path.read_text())["cases"]}
    assert saved["good"]["ok"] and not saved["cut"]["ok"]


def test_check_without_a_model_does_not_judge_channel_counts(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    write_ct(tmp_path / "in" / "two_0000.nii.gz")
    write_ct(tmp_path / "in" / "two_0001.nii.gz")
    report = check_inputs(tmp_path / "in")
    assert [c.ok for c in report.checks] == [True]


def test_infer_without_output_folder_is_a_usage_error(model_dir: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["infer", "-i", str(tmp_path), "-m", str(model_dir)])
    assert result.exit_code == 2 and "Missing option '-o' / '--output'" in result.output
