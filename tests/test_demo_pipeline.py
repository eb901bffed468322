"""`tucker-export demo`'s pipeline on the shipped real-CT model: one bundle, every segmentation, honest figures.

Run on the four shipped patients cropped to one tile each (``demo_crops``), so it takes seconds; the
full-size run is `make demo`.
"""

from __future__ import annotations

from pathlib import Path

from tucker_export.bundle import Bundle
from tucker_export.demo_pipeline import RANK_FACTOR, format_demo_report, run_demo_pipeline


def test_demo_pipeline_segments_every_case_with_every_model(demo_crops, tmp_path: Path) -> None:
    report = run_demo_pipeline(demo_crops, work_dir=tmp_path, progress=False)
    cases = sorted(demo_crops.test_images_dir.glob("*_0000.nii.gz"))
    assert report.cases == len(cases)
    assert sorted(p.name for p in report.tucker_output_dir.glob("*.nii.gz")) == sorted(
        c.name.replace("_0000.nii.gz", ".nii.gz") for c in cases
    )
    bundle = Bundle.load(report.bundle_dir)
    assert bundle.rank_policy["factor"] == RANK_FACTOR and bundle.has_onnx(0, "fp32")
    assert 0 < report.params_ratio < 1 and 0 < report.macs_ratio <= 0.25
    assert report.onnx_max_abs_diff < 1e-3
    structures = [name for value, name in sorted(demo_crops.label_names.items()) if value]
    assert set(report.dice_original_vs_reference) == set(structures)
    assert set(report.dice_tucker_vs_reference) == set(structures)
    # The fine-tuned bundle ships with the model and runs; it wins back agreement with the original.
    assert not report.finetuned_note, report.finetuned_note
    assert set(report.dice_finetuned_vs_reference) == set(structures)
    mean = lambda scores: sum(scores.values()) / len(scores)  # noqa: E731
    assert mean(report.dice_finetuned_vs_original) >= mean(report.dice_tucker_vs_original)
    assert mean(report.dice_original_vs_reference) > 0.6  # a real model of real anatomy, on crops of 4 patients
    text = format_demo_report(report)
    assert str(report.bundle_dir) in text and report.tucker_engine in text and "fine-tuned vs contours" in text
