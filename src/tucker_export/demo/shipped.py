"""The head-and-neck CT model that ships inside the package, and the real patients that ship with it.

``ensure_demo_model()`` is what the tests, the examples and ``tucker-export demo`` call: it finds the
model folder under ``tucker_export/demo/model/`` and checks it is complete. Nothing is trained or
downloaded; :mod:`.retrain` is the recipe that made the model (``tucker-export demo --retrain``).

Layout of ``model/``::

    nnUNet_results/Dataset988_OpenKBPHeadNeck/nnUNetTrainer_TuckerHN__nnUNetPlans_TuckerHN__3d_fullres/
        dataset.json  plans.json  fold_0/checkpoint_final.pth     (a normal nnU-Net model folder)
    test/imagesTs/openkbp_<patient>_0000.nii.gz   test/labelsTs/openkbp_<patient>.nii.gz
    imagesTr/openkbp_<patient>_0000.nii.gz        (training images without labels, for finetune)
    bundles/tucker-rank0.1-finetuned/             (decomposed and fine-tuned without labels; weights only)
    recipe_report.json   README.md   LICENSE-OpenKBP
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from tucker_export.demo.recipe import (
    _REPORT_NAME,
    CONFIGURATION,
    DATASET_NAME,
    DEMO_RANK_FACTOR,
    PLANS_NAME,
    RECIPE_VERSION,
    TRAINER_NAME,
    model_dir_in,
    trainer_search_path,
)
from tucker_export.errors import DemoBuildError

logger = logging.getLogger("tucker_export.demo")

#: Where the shipped model lives inside the installed package.
SHIPPED_ROOT = Path(__file__).resolve().parent / "model"


@dataclass(frozen=True)
class DemoModel:
    """The shipped model and its held-out real patients; all paths are absolute and exist."""

    #: nnU-Net trained model folder (dataset.json, plans.json, fold_N/checkpoint_final.pth).
    model_dir: Path
    #: Held-out images, nnU-Net naming (``<case>_0000.nii.gz``).
    test_images_dir: Path
    #: Their clinical contours (``<case>.nii.gz``), in the model's label values.
    test_labels_dir: Path
    #: Folder to put in ``nnUNet_extTrainer`` so nnU-Net finds ``nnUNetTrainer_TuckerHN``.
    trainer_search_path: Path
    folds: tuple[int, ...]
    #: Label value -> structure name, background included.
    label_names: dict[int, str]
    #: Dice against the clinical contours on the held-out patients, per structure, as the recipe measured it.
    dice_per_structure: dict[str, float]
    #: The folder holding everything above.
    root: Path
    #: What ``nnUNet_results`` must point to for ``nnUNetv2_predict -d ... -tr ... -p ... -c ...``.
    results_dir: Path
    dataset_name: str = DATASET_NAME
    trainer_name: str = TRAINER_NAME
    plans_name: str = PLANS_NAME
    configuration: str = CONFIGURATION

    @property
    def mean_dice(self) -> float:
        """Mean of ``dice_per_structure`` (nnU-Net's "mean foreground Dice")."""
        values = list(self.dice_per_structure.values())
        return float(sum(values) / len(values)) if values else float("nan")

    @property
    def training_images_dir(self) -> Path:
        """A few training images without their contours (for label-free ``finetune``)."""
        return self.root / "imagesTr"

    def ensure_training_images(self) -> Path:
        """The training images folder (shipped; kept as a method for callers of the older demo)."""
        return self.training_images_dir

    @property
    def report_path(self) -> Path:
        return self.root / _REPORT_NAME

    def nnunet_env(self) -> dict[str, str]:
        """Environment variables stock nnU-Net commands need to find this model and its trainer."""
        return {"nnUNet_results": str(self.results_dir), "nnUNet_extTrainer": str(self.trainer_search_path)}

    def predict_command(self, input_dir: Path, output_dir: Path, *, folds: tuple[int, ...] | None = None,
                        device: str = "cpu") -> list[str]:  # fmt: skip
        """Arguments of a stock ``nnUNetv2_predict`` run on this model (run it with :meth:`nnunet_env` set)."""
        return [
            "nnUNetv2_predict", "-i", str(input_dir), "-o", str(output_dir), "-d", self.dataset_name,
            "-tr", self.trainer_name, "-p", self.plans_name, "-c", self.configuration,
            "-f", *[str(f) for f in (self.folds if folds is None else folds)], "-device", device,
        ]  # fmt: skip


def finetuned_bundle_dir(root: Path) -> Path:
    """The fine-tuned Tucker bundle (rank factor ``DEMO_RANK_FACTOR``) that ships beside the model in ``root``."""
    return Path(root) / "bundles" / f"tucker-rank{DEMO_RANK_FACTOR}-finetuned"


def load_model(root: Path) -> DemoModel:
    """The model in ``root`` (the shipped layout), refused with one sentence when a part is missing."""
    root = Path(root).resolve()
    report_path = root / _REPORT_NAME
    try:
        report = json.loads(report_path.read_text(encoding="utf-8"))
        folds = tuple(int(f) for f in report["folds"])
        model = DemoModel(
            model_dir=model_dir_in(root / "nnUNet_results"),
            test_images_dir=root / "test" / "imagesTs",
            test_labels_dir=root / "test" / "labelsTs",
            trainer_search_path=trainer_search_path(),
            folds=folds,
            label_names={int(k): str(v) for k, v in report["label_names"].items()},
            dice_per_structure={str(k): float(v) for k, v in report.get("dice_per_structure", {}).items()},
            root=root,
            results_dir=root / "nnUNet_results",
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DemoBuildError(
            f"The demo model's report {report_path} is missing or unreadable ({exc}); reinstall tucker-export "
            "or rebuild the model with `tucker-export demo --retrain`."
        ) from exc
    if report.get("recipe_version") != RECIPE_VERSION:
        raise DemoBuildError(
            f"The demo model in {root} was made by recipe {report.get('recipe_version')}, this code expects "
            f"{RECIPE_VERSION}; rebuild it with `tucker-export demo --retrain`."
        )
    required = [model.model_dir / "plans.json", model.model_dir / "dataset.json"]
    required += [model.model_dir / f"fold_{f}" / "checkpoint_final.pth" for f in folds]
    missing = [str(p) for p in required if not p.is_file()]
    if not any(model.test_images_dir.glob("*_0000.nii.gz")):
        missing.append(str(model.test_images_dir / "*_0000.nii.gz"))
    if missing:
        raise DemoBuildError(
            f"The demo model in {root} is incomplete (missing {', '.join(missing)}); reinstall tucker-export."
        )
    return model


def ensure_demo_model(root: Path | None = None) -> DemoModel:
    """The shipped head-and-neck model (or the one in ``root``, e.g. a retrained copy)."""
    return load_model(Path(root) if root is not None else SHIPPED_ROOT)
