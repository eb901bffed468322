"""What the shipped head-and-neck CT model is: its names, structures, network, data split and folders.

Every module of the demo reads these; :mod:`.openkbp` reads the source data, :mod:`.nnunet_run`
runs nnU-Net, :mod:`.retrain` is the recipe that trains and exports the model, :mod:`.shipped`
finds the model shipped inside the package. ``RECIPE_VERSION`` is a plain number, bumped by hand
whenever anything that changes the trained model changes.
"""

from __future__ import annotations

from pathlib import Path

RECIPE_VERSION = 4

DATASET_ID = 988
DATASET_NAME = f"Dataset{DATASET_ID}_OpenKBPHeadNeck"
PLANS_NAME = "nnUNetPlans_TuckerHN"
TRAINER_NAME = "nnUNetTrainer_TuckerHN"
CONFIGURATION = "3d_fullres"
#: One fold, trained on every kept training patient but a few that nnU-Net validates on.
FOLDS: tuple[int, ...] = (0,)
NUM_VALIDATION_PATIENTS = 5

#: OpenKBP's label values (``labels.json``) of the structures the model segments, in its own label order.
#: Esophagus (5) and Larynx (6) are left out: they are contoured in only 71 and 98 of the 203 training
#: patients, and an uncontoured structure is unknown, not background. Training only on patients that
#: contour all seven would leave 34; the five kept are contoured together in 115.
KEPT_STRUCTURES: tuple[tuple[int, str], ...] = (
    (1, "Brainstem"),
    (2, "SpinalCord"),
    (3, "RightParotid"),
    (4, "LeftParotid"),
    (7, "Mandible"),
)
#: The model's label value -> name, background included.
LABEL_NAMES: dict[int, str] = {0: "background", **{i + 1: name for i, (_, name) in enumerate(KEPT_STRUCTURES)}}

#: The network (nnU-Net's PlainConvUNet): nnU-Net's own plan for this data is 6 stages of 32-64-128-256-320-320
#: at a 128^3 patch. The wide deep stages are kept (where Tucker pays); the first stage is halved and the
#: patch is 64^3 because the full-resolution stage dominates a CPU training step.
FEATURES_PER_STAGE: tuple[int, ...] = (16, 32, 64, 128, 256, 320)
PATCH_SIZE: tuple[int, int, int] = (64, 64, 64)
BATCH_SIZE = 2

#: The rank factor of the demo's Tucker bundle, and of the fine-tuned bundle that ships beside the model.
DEMO_RANK_FACTOR = 0.1
#: Label-free fine-tuning of that bundle: steps and the time cap the recipe gives it.
FINETUNE_STEPS = 400
FINETUNE_MAX_MINUTES = 15.0
FINETUNE_TRAIN_TILES = 96
FINETUNE_HELD_OUT_TILES = 16

#: How many held-out patients ship with the package (from ``imagesTs``, all kept structures contoured).
NUM_SHIPPED_TEST_PATIENTS = 4

_REPORT_NAME = "recipe_report.json"
_LOG_NAME = "build.log"


def trainer_search_path() -> Path:
    """The folder holding ``nnUNetTrainer_TuckerHN.py``; nnU-Net's ``nnUNet_extTrainer`` must point here."""
    return Path(__file__).resolve().parent / "trainers"


def model_dir_in(results_dir: Path) -> Path:
    """The nnU-Net model folder of this recipe under an ``nnUNet_results`` folder."""
    return Path(results_dir) / DATASET_NAME / f"{TRAINER_NAME}__{PLANS_NAME}__{CONFIGURATION}"
