"""The recipe's view of the OpenKBP data set, on a tiny stand-in folder: checks, relabelling, patient choice."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from tucker_export.cli import cli
from tucker_export.demo.openkbp import (
    check_data_dir,
    contoured_structures,
    fully_contoured,
    patients,
    read_patient,
    to_model_labels,
    write_raw_dataset,
)
from tucker_export.demo.recipe import KEPT_STRUCTURES, LABEL_NAMES
from tucker_export.errors import DemoBuildError

OPENKBP_LABELS = {"background": 0, "Brainstem": 1, "SpinalCord": 2, "RightParotid": 3, "LeftParotid": 4,
                  "Esophagus": 5, "Larynx": 6, "Mandible": 7}


def _write(path: Path, array: np.ndarray, spacing=(3.9, 3.9, 2.5)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.diag([*spacing, 1.0])), str(path))


def _fake_openkbp(root: Path, structures_per_patient: dict[str, list[int]], split: str = "Tr") -> Path:
    for other in ("Tr", "Ts"):
        (root / f"images{other}").mkdir(parents=True, exist_ok=True)
        (root / f"labels{other}").mkdir(parents=True, exist_ok=True)
    (root / "labels.json").write_text(json.dumps(OPENKBP_LABELS))
    (root / "LICENSE").write_text("MIT")
    for name, structures in structures_per_patient.items():
        image = np.full((8, 8, 8), -1000, dtype=np.int16)
        labels = np.zeros((8, 8, 8), dtype=np.uint8)
        for i, value in enumerate(structures):
            labels[i, :2, :2] = value
        _write(root / f"images{split}" / f"{name}_0000.nii.gz", image)
        _write(root / f"labels{split}" / f"{name}.nii.gz", labels)
    return root


def test_missing_data_set_is_refused_with_the_folder_and_the_fix(tmp_path):
    with pytest.raises(DemoBuildError, match=r"not at .*missing.*TUCKER_EXPORT_OPENKBP"):
        check_data_dir(tmp_path / "missing")


def test_a_folder_of_another_layout_is_refused(tmp_path):
    (tmp_path / "imagesTr").mkdir()
    with pytest.raises(DemoBuildError, match="lacks labelsTr, imagesTs, labelsTs, labels.json"):
        check_data_dir(tmp_path)


def test_other_label_values_are_refused(tmp_path):
    root = _fake_openkbp(tmp_path, {})
    (root / "labels.json").write_text(json.dumps({**OPENKBP_LABELS, "Mandible": 9}))
    with pytest.raises(DemoBuildError, match="label values"):
        check_data_dir(root)


def test_contours_that_do_not_match_their_image_are_refused_by_patient(tmp_path):
    root = _fake_openkbp(tmp_path, {"openkbp_001": [1]})
    _write(root / "labelsTr" / "openkbp_001.nii.gz", np.zeros((8, 8, 9), dtype=np.uint8))
    [patient] = patients(root, "Tr")
    with pytest.raises(DemoBuildError, match=r"contours of openkbp_001 .*shape \(8, 8, 9\).*do not match its image"):
        read_patient(patient)


def test_an_image_without_contours_is_named(tmp_path):
    root = _fake_openkbp(tmp_path, {"openkbp_001": [1]})
    (root / "labelsTr" / "openkbp_001.nii.gz").unlink()
    with pytest.raises(DemoBuildError, match="openkbp_001_0000.nii.gz has no contour file"):
        patients(root, "Tr")


def test_labels_are_mapped_to_the_models_values_and_unkept_structures_become_background():
    openkbp = np.array([0, 1, 2, 3, 4, 5, 6, 7], dtype=np.uint8)
    assert to_model_labels(openkbp).tolist() == [0, 1, 2, 3, 4, 0, 0, 5]
    assert [LABEL_NAMES[v] for v in to_model_labels(np.array([7, 3]))] == ["Mandible", "RightParotid"]
    assert contoured_structures(np.array([0, 1, 5, 7])) == {1, 5}


def test_only_patients_contouring_every_kept_structure_train(tmp_path):
    every = [value for value, _ in KEPT_STRUCTURES]
    root = _fake_openkbp(tmp_path, {"openkbp_001": every, "openkbp_002": every[:-1], "openkbp_003": [*every, 5]})
    assert [p.name for p, _, _ in fully_contoured(root, "Tr")] == ["openkbp_001", "openkbp_003"]
    names = write_raw_dataset(root, tmp_path / "raw")
    assert names == ["openkbp_001", "openkbp_003"]
    dataset = json.loads((tmp_path / "raw" / "dataset.json").read_text())
    assert dataset["labels"] == {name: value for value, name in LABEL_NAMES.items()}
    relabelled = np.asarray(nib.load(str(tmp_path / "raw" / "labelsTr" / "openkbp_003.nii.gz")).dataobj)
    assert sorted(np.unique(relabelled).tolist()) == [0, 1, 2, 3, 4, 5]


def test_retrain_without_the_data_set_is_one_sentence_and_exit_1(tmp_path):
    result = CliRunner().invoke(cli, ["demo", "--retrain", "--data", str(tmp_path / "nowhere"),
                                      "--model-root", str(tmp_path / "model")])
    assert result.exit_code == 1
    assert "OpenKBP data set is not at" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "model").exists()
