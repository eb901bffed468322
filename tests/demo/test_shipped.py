"""The model that ships in the package: complete, small, recorded, and refused clearly when damaged."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tucker_export._io import sha256_file
from tucker_export.demo import SHIPPED_ROOT, ensure_demo_model
from tucker_export.demo.recipe import FEATURES_PER_STAGE, KEPT_STRUCTURES, NUM_SHIPPED_TEST_PATIENTS
from tucker_export.demo.retrain import strip_checkpoint
from tucker_export.demo.shipped import finetuned_bundle_dir, load_model
from tucker_export.errors import DemoBuildError


def test_the_shipped_model_is_complete_and_matches_its_report(demo_model) -> None:
    assert demo_model.root == SHIPPED_ROOT.resolve()
    report = json.loads(demo_model.report_path.read_text())
    assert demo_model.folds == (0,)
    assert [demo_model.label_names[v] for v in range(1, 6)] == [name for _, name in KEPT_STRUCTURES]
    for fold in demo_model.folds:
        checkpoint = demo_model.model_dir / f"fold_{fold}" / "checkpoint_final.pth"
        assert sha256_file(checkpoint) == report["checkpoint_sha256"][str(fold)]
    patients = sorted(demo_model.test_images_dir.glob("*_0000.nii.gz"))
    assert len(patients) >= NUM_SHIPPED_TEST_PATIENTS
    assert all((demo_model.test_labels_dir / p.name.replace("_0000", "")).is_file() for p in patients)
    assert (demo_model.root / "LICENSE-OpenKBP").is_file() and "Babier" in (demo_model.root / "README.md").read_text()
    assert report["network"]["features_per_stage"] == list(FEATURES_PER_STAGE)
    assert report["machine"]["cpu"] and report["wall_time_s"]["train_fold_0"] > 0
    assert (finetuned_bundle_dir(demo_model.root) / "bundle.json").is_file()


def test_the_model_folder_stays_small() -> None:
    size = sum(p.stat().st_size for p in (SHIPPED_ROOT / "nnUNet_results").rglob("*") if p.is_file())
    assert size <= 50 * 2**20


def test_the_checkpoint_is_fp16_weights_without_training_state(demo_model) -> None:
    checkpoint = torch.load(demo_model.model_dir / "fold_0" / "checkpoint_final.pth", map_location="cpu",
                            weights_only=False)
    assert set(checkpoint) == {"network_weights", "init_args", "trainer_name", "inference_allowed_mirroring_axes",
                               "current_epoch"}
    assert checkpoint["inference_allowed_mirroring_axes"] is None  # no flips: left and right parotid
    assert {v.dtype for v in checkpoint["network_weights"].values() if v.is_floating_point()} == {torch.float16}


def test_stripping_keeps_nnunets_aliased_weights_shared(tmp_path: Path) -> None:
    shared = torch.randn(8, 4, 3, 3, 3)
    source = {"network_weights": {"encoder.conv.weight": shared, "decoder.encoder.conv.weight": shared,
                                  "seg.bias": torch.zeros(3), "steps": torch.tensor(4)},
              "init_args": {"fold": 0}, "trainer_name": "T", "inference_allowed_mirroring_axes": None,
              "optimizer_state": {"big": torch.zeros(1000)}, "current_epoch": 3}
    torch.save(source, tmp_path / "full.pth")
    strip_checkpoint(tmp_path / "full.pth", tmp_path / "out" / "small.pth")
    stripped = torch.load(tmp_path / "out" / "small.pth", weights_only=False)
    weights = stripped["network_weights"]
    assert "optimizer_state" not in stripped
    assert weights["encoder.conv.weight"].dtype == torch.float16 and weights["steps"].dtype == torch.int64
    assert weights["encoder.conv.weight"].data_ptr() == weights["decoder.encoder.conv.weight"].data_ptr()
    torch.testing.assert_close(weights["encoder.conv.weight"].float(), shared, atol=1e-2, rtol=1e-3)


def test_a_damaged_model_is_refused_with_what_is_missing(tmp_path: Path) -> None:
    copy = tmp_path / "model"
    shutil.copytree(SHIPPED_ROOT, copy, ignore=shutil.ignore_patterns("*.pth"))
    with pytest.raises(DemoBuildError, match=r"incomplete \(missing .*checkpoint_final.pth\); reinstall"):
        load_model(copy)
    (copy / "recipe_report.json").unlink()
    with pytest.raises(DemoBuildError, match="report .* is missing or unreadable"):
        ensure_demo_model(copy)
