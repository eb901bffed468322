"""Bundles written before the structure refactor (issue 14) still load and segment.

``tests/data/bundle_v1_2026-12`` was written by the code at commit 18262dd and is kept byte for byte
(its README says how it was made). Loading it, checking its weights and ONNX, and running ``infer``
through it must work with today's code; so must the older form of an ONNX entry (no
``weights_sha256``, written before fine-tuning existed).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tucker_export.bundle import Bundle
from tucker_export.errors import BundleError
from tucker_export.inference import run_inference
from tucker_export.validation.metrics import label_dice, read_label_map

OLD_BUNDLE = Path(__file__).parent / "data" / "bundle_v1_2026-12"


@pytest.fixture
def old_bundle(tmp_path: Path) -> Path:
    target = tmp_path / "bundle"
    shutil.copytree(OLD_BUNDLE, target)
    return target


def test_old_bundle_loads_with_its_recorded_checksums(old_bundle: Path) -> None:
    bundle = Bundle.load(old_bundle)
    assert bundle.folds == (0,)
    assert bundle.rank_policy["factor"] == 0.5
    bundle.verify_weights(0)
    entry = bundle.onnx_entries()["fold_0.fp32"]
    assert bundle.verify_file(entry["file"], entry["sha256"]).is_file()
    assert bundle.stale_onnx_reason(0, entry) is None
    assert 0 < bundle.fold_totals(0)["params_ratio"] < 0.5  # decomposed params / original


def test_old_bundle_with_a_changed_weights_file_is_refused_by_name(old_bundle: Path) -> None:
    weights = old_bundle / "weights" / "fold_0.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(BundleError, match=r"fold_0\.safetensors"):
        Bundle.load(old_bundle).verify_weights(0)


@pytest.mark.parametrize("drop_weights_sha256", [False, True], ids=["as-written", "pre-finetune-onnx-entry"])
def test_old_bundle_segments_a_demo_case(old_bundle: Path, tmp_path: Path, drop_weights_sha256) -> None:
    if drop_weights_sha256:
        manifest_path = old_bundle / "bundle.json"
        manifest = json.loads(manifest_path.read_text())
        del manifest["onnx"]["fold_0.fp32"]["weights_sha256"]
        manifest_path.write_text(json.dumps(manifest))
    # The bundle was decomposed from the phantom demo model of that time; its first held-out phantom
    # (seed 10000) is regenerated from the seed.
    from tucker_export.demo.phantom import generate_phantom, write_case

    case, label_path = tmp_path / "phantom_test_000_0000.nii.gz", tmp_path / "phantom_test_000.nii.gz"
    write_case(generate_phantom(10_000, anisotropic=False), case, label_path)
    report = run_inference(case, tmp_path / "out", bundle_path=old_bundle, backend="ort", precision="fp32",
                           use_mirroring=False, progress=False)
    assert not report.failed
    written = tmp_path / "out" / case.name.replace("_0000.nii.gz", ".nii.gz")
    prediction = read_label_map(written)
    reference = read_label_map(label_path)
    dice = label_dice(prediction, reference, labels=range(1, 6))
    assert np.nanmean(list(dice.values())) > 0.7  # Tucker 0.5 of the trained demo model, one fold, no TTA
