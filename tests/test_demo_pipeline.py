"""`tucker-export demo`'s pipeline on the trained demo model: one bundle, both segmentations, honest figures."""

from __future__ import annotations

from pathlib import Path

from tucker_export.bundle import Bundle
from tucker_export.demo_pipeline import RANK_FACTOR, format_demo_report, run_demo_pipeline


def test_demo_pipeline_segments_every_case_with_both_models(demo_model, tmp_path: Path) -> None:
    report = run_demo_pipeline(demo_model, work_dir=tmp_path, progress=False)
    cases = sorted(demo_model.test_images_dir.glob("*_0000.nii.gz"))
    assert report.cases == len(cases)
    assert sorted(p.name for p in report.tucker_output_dir.glob("*.nii.gz")) == sorted(
        c.name.replace("_0000.nii.gz", ".nii.gz") for c in cases
    )
    bundle = Bundle.load(report.bundle_dir)
    assert bundle.rank_policy["factor"] == RANK_FACTOR and bundle.has_onnx(0, "fp32")
    assert 0 < report.params_ratio < 1 and 0 < report.macs_ratio < 1
    assert report.onnx_max_abs_diff < 1e-3
    # The Tucker model keeps the trained model's segmentations (the recorded demo bar) and its Dice vs truth.
    assert min(report.dice_tucker_vs_original.values()) > 0.8
    assert set(report.dice_tucker_vs_reference) == set(report.dice_original_vs_reference)
    text = format_demo_report(report)
    assert str(report.bundle_dir) in text and report.tucker_engine in text

