"""The recipe after training (export, label-free fine-tuning, held-out validation), on a small stand-in data set.

No network is trained: the shipped model plays the trained one. The stand-in data set holds two held-out
patients cropped to one tile each, one of them with its mandible "not contoured", and the shipped training
images, in OpenKBP's layout and label values.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tucker_export.demo import recipe, retrain
from tucker_export.demo.recipe import KEPT_STRUCTURES
from tucker_export.demo.shipped import finetuned_bundle_dir, load_model

pytestmark = pytest.mark.slow

OPENKBP_LABELS = {"background": 0, "Brainstem": 1, "SpinalCord": 2, "RightParotid": 3, "LeftParotid": 4,
                  "Esophagus": 5, "Larynx": 6, "Mandible": 7}


@pytest.fixture(scope="module")
def stand_in_data(demo_crops, demo_model, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("openkbp")
    for folder in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (root / folder).mkdir()
    (root / "labels.json").write_text(json.dumps(OPENKBP_LABELS))
    (root / "LICENSE").write_text("MIT (stand-in)")
    to_openkbp = np.zeros(6, dtype=np.uint8)
    for model_value, (openkbp_value, _) in enumerate(KEPT_STRUCTURES, 1):
        to_openkbp[model_value] = openkbp_value
    for index, label_path in enumerate(sorted(demo_crops.test_labels_dir.glob("*.nii.gz"))[:2]):
        case = label_path.name[: -len(".nii.gz")]
        shutil.copy(demo_crops.test_images_dir / f"{case}_0000.nii.gz", root / "imagesTs")
        label = nib.load(str(label_path))
        values = to_openkbp[np.asarray(label.dataobj)]
        if index == 1:
            values[values == 7] = 0  # this patient's planner did not contour the mandible
        nib.save(nib.Nifti1Image(values, label.affine, label.header), str(root / "labelsTs" / label_path.name))
    for image in sorted(demo_model.training_images_dir.glob("*_0000.nii.gz")):
        shutil.copy(image, root / "imagesTr")
    return root


def test_export_finetune_and_validate_make_a_complete_model(demo_model, stand_in_data, tmp_path, monkeypatch):
    monkeypatch.setattr(recipe, "FINETUNE_STEPS", 2)
    monkeypatch.setattr(recipe, "FINETUNE_TRAIN_TILES", 4)
    monkeypatch.setattr(recipe, "FINETUNE_HELD_OUT_TILES", 2)
    validation = [p.name[: -len("_0000.nii.gz")] for p in demo_model.training_images_dir.glob("*_0000.nii.gz")]
    out, work = tmp_path / "model", tmp_path / "work"
    work.mkdir()
    model_dir = retrain.export_model(demo_model.model_dir, stand_in_data, out, validation)
    finetuning = retrain.make_finetuned_bundle(out, stand_in_data, work, progress=False)
    state = {"stages": {"plan": {"seconds": 1.0, "split": {"train": ["a"] * 3, "val": validation},
                                 "network": {"features_per_stage": list(recipe.FEATURES_PER_STAGE)}},
                        "train_fold_0": {"seconds": 1.0}},
             "machine": {"cpu": "test"}}
    retrain.write_report(out, model_dir, state, finetuning)
    assert load_model(out).dice_per_structure == {}  # usable before the held-out stage has run
    report = retrain.record_held_out_evaluation(out, stand_in_data, work, progress=False)

    model = load_model(out)
    assert model.folds == (0,) and set(model.dice_per_structure) == {name for _, name in KEPT_STRUCTURES}
    assert report["test_patients"] == 2
    assert (finetuned_bundle_dir(out) / "bundle.json").is_file()
    manifest = json.loads((finetuned_bundle_dir(out) / "bundle.json").read_text())
    assert manifest["finetuning"] and manifest["onnx"] == {}
    tucker = report["finetuned_bundle"]["test_patients"]
    assert tucker["engine"] == "ort fp32" and set(tucker["vs_contours"]) == set(model.dice_per_structure)
    # The patient without a mandible contour is not scored for it; the other one is.
    uncontoured = sorted(report["dice_per_case"])[1]
    assert "Mandible" not in report["dice_per_case"][uncontoured]
    assert "Mandible" in report["dice_per_case"][sorted(report["dice_per_case"])[0]]
    labels = nib.load(str(work / "test" / "labelsTs" / f"{uncontoured}.nii.gz"))
    assert set(np.unique(np.asarray(labels.dataobj)).tolist()) <= {0, 1, 2, 3, 4}  # model values
