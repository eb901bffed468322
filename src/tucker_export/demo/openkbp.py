"""The OpenKBP head-and-neck CT data set as the recipe uses it: found, checked, filtered, relabelled.

The data set (``../shared/data/openkbp`` in the workplace; any folder of the same layout elsewhere) is in
nnU-Net's raw layout with OpenKBP's seven labels. A structure a patient's planner did not contour reads 0,
like background, so a patient is used for training only when it contours every kept structure, and a
test patient's structure is scored only where it is contoured (:func:`contoured_structures`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tucker_export.demo.recipe import DATASET_NAME, KEPT_STRUCTURES, LABEL_NAMES, RECIPE_VERSION
from tucker_export.errors import DemoBuildError

#: Where the workplace keeps the data set, relative to the repository (``../shared/data/openkbp``).
_WORKPLACE_DATA = Path(__file__).resolve().parents[4] / "shared" / "data" / "openkbp"
DATA_ENV = "TUCKER_EXPORT_OPENKBP"

_EXPECTED_LABELS = {"background": 0, **{name: value for value, name in KEPT_STRUCTURES}}


@dataclass(frozen=True)
class Patient:
    """One patient's CT and its contours (OpenKBP labels)."""

    name: str
    image: Path
    label: Path


def default_data_dir() -> Path:
    """``$TUCKER_EXPORT_OPENKBP`` if set, else the workplace's ``../shared/data/openkbp``."""
    configured = os.environ.get(DATA_ENV)
    return Path(configured).expanduser() if configured else _WORKPLACE_DATA


def check_data_dir(data_dir: Path) -> Path:
    """The data folder, refused with one sentence when it is missing or is not OpenKBP's layout."""
    data_dir = Path(data_dir).expanduser()
    if not data_dir.is_dir():
        raise DemoBuildError(
            f"The OpenKBP data set is not at {data_dir}; retraining needs it (set {DATA_ENV} to its folder, "
            "which holds imagesTr, labelsTr, imagesTs, labelsTs and labels.json)."
        )
    missing = [n for n in ("imagesTr", "labelsTr", "imagesTs", "labelsTs", "labels.json") if not (data_dir / n).exists()]
    if missing:
        raise DemoBuildError(f"{data_dir} is not the OpenKBP data set: it lacks {', '.join(missing)}.")
    labels = json.loads((data_dir / "labels.json").read_text())
    wrong = {k: v for k, v in _EXPECTED_LABELS.items() if labels.get(k) != v}
    if wrong:
        raise DemoBuildError(
            f"{data_dir / 'labels.json'} does not give the label values the recipe expects ({wrong}); "
            f"it reads {labels}."
        )
    return data_dir


def patients(data_dir: Path, split: str) -> list[Patient]:
    """Every patient of ``split`` ("Tr" or "Ts"), refused by name when its contour file is missing."""
    images = sorted((Path(data_dir) / f"images{split}").glob("*_0000.nii.gz"))
    found = []
    for image in images:
        name = image.name[: -len("_0000.nii.gz")]
        label = Path(data_dir) / f"labels{split}" / f"{name}.nii.gz"
        if not label.is_file():
            raise DemoBuildError(f"{image} has no contour file {label}; restore it or remove the image.")
        found.append(Patient(name, image, label))
    if not found:
        raise DemoBuildError(f"{Path(data_dir) / f'images{split}'} holds no *_0000.nii.gz images.")
    return found


def read_patient(patient: Patient) -> tuple[np.ndarray, np.ndarray, object]:
    """Image array, OpenKBP label array and the image's NIfTI header; refused when the two do not match."""
    import nibabel as nib

    try:
        image = nib.load(str(patient.image))
        label = nib.load(str(patient.label))
        label_array = np.asarray(label.dataobj)
    except Exception as exc:  # nibabel raises several types for a corrupt file
        raise DemoBuildError(f"Cannot read patient {patient.name} ({type(exc).__name__}: {exc}).") from exc
    if image.shape != label.shape or not np.allclose(image.affine, label.affine, atol=1e-3):
        raise DemoBuildError(
            f"The contours of {patient.name} ({patient.label.name}: shape {label.shape}) do not match its image "
            f"({patient.image.name}: shape {image.shape}); both must share one grid and affine."
        )
    return np.asarray(image.dataobj), label_array, image


def contoured_structures(openkbp_labels: np.ndarray) -> set[int]:
    """The model's label values whose structure this OpenKBP label map contours."""
    present = set(np.unique(openkbp_labels).tolist())
    return {model_value for model_value, (openkbp_value, _) in enumerate(KEPT_STRUCTURES, 1) if openkbp_value in present}


def to_model_labels(openkbp_labels: np.ndarray) -> np.ndarray:
    """OpenKBP's label values mapped to the model's; structures not kept become background."""
    lookup = np.zeros(int(max(openkbp_labels.max(), 7)) + 1, dtype=np.uint8)
    for model_value, (openkbp_value, _) in enumerate(KEPT_STRUCTURES, 1):
        lookup[openkbp_value] = model_value
    return lookup[openkbp_labels.astype(np.intp)]


def fully_contoured(data_dir: Path, split: str) -> Iterator[tuple[Patient, np.ndarray, object]]:
    """(patient, model label map, header) of every patient of ``split`` that contours all kept structures."""
    everything = set(range(1, len(KEPT_STRUCTURES) + 1))
    for patient in patients(data_dir, split):
        _, labels, header = read_patient(patient)
        if contoured_structures(labels) == everything:
            yield patient, to_model_labels(labels), header


def write_raw_dataset(data_dir: Path, raw_dataset: Path, on_case=None) -> list[str]:
    """nnU-Net's raw data set of the fully contoured training patients; returns their names.

    Images are linked, not copied (nnU-Net only reads them); labels are rewritten with the model's values.
    """
    import nibabel as nib

    images_tr, labels_tr = raw_dataset / "imagesTr", raw_dataset / "labelsTr"
    images_tr.mkdir(parents=True, exist_ok=True)
    labels_tr.mkdir(parents=True, exist_ok=True)
    names = []
    for patient, labels, image in fully_contoured(data_dir, "Tr"):
        os.symlink(patient.image.resolve(), images_tr / patient.image.name)
        nib.save(nib.Nifti1Image(labels, image.affine, image.header), str(labels_tr / patient.label.name))
        names.append(patient.name)
        if on_case is not None:
            on_case(1)
    if not names:
        raise DemoBuildError(f"No training patient in {data_dir} contours all of {[n for _, n in KEPT_STRUCTURES]}.")
    dataset_json = {
        "name": DATASET_NAME.split("_", 1)[1],
        "description": "OpenKBP head-and-neck CT (A. Babier et al., Medical Physics 48(9), 2021; MIT licence), "
        "patients contouring every kept organ at risk.",
        "channel_names": {"0": "CT"},
        "labels": {name: value for value, name in LABEL_NAMES.items()},
        "numTraining": len(names),
        "file_ending": ".nii.gz",
        "licence": "MIT (OpenKBP)",
        "tucker_export_recipe_version": RECIPE_VERSION,
    }
    (raw_dataset / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    return names
