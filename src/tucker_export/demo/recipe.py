"""What the demo model is: its names, recipe version, data set size and network, and its folder layout.

Every module of the demo build reads these; :mod:`.build` keeps the cache, :mod:`.dataset` writes the
data set and plans, :mod:`.training` runs nnU-Net. ``RECIPE_VERSION`` is a plain number, bumped by
hand: the cache folder's name comes from it, not from any source file.
"""

from __future__ import annotations

from pathlib import Path

#: Bump whenever anything that changes the built model changes (phantoms, plans, trainer, folds, ...):
#: the demo lives in ``demo-v<RECIPE_VERSION>``, so a bump makes every cache rebuild instead of reusing.
RECIPE_VERSION = 3

DATASET_ID = 987
DATASET_NAME = f"Dataset{DATASET_ID}_TuckerDemoPhantom"
PLANS_NAME = "nnUNetPlans_TuckerDemo"
TRAINER_NAME = "nnUNetTrainer_TuckerDemo"
CONFIGURATION = "3d_fullres"
#: Two folds of nnU-Net's own 5-fold split, so fold ensembling can be exercised.
FOLDS: tuple[int, ...] = (0, 1)

#: Training cases (nnU-Net's 5-fold split trains each fold on 80 % of them) and held-out test cases.
NUM_TRAINING_CASES = 20
NUM_TEST_CASES = 4
_TEST_SEED_OFFSET = 10_000
#: Network of the derived plans: a standard nnU-Net PlainConvUNet, just small. 32 base features
#: would cost ~4x per iteration (the full-resolution stage dominates) and leave one fold in the budget.
FEATURES_PER_STAGE: tuple[int, ...] = (16, 32, 64, 128)
#: Batch size 1: per CPU-second, twice the optimiser steps of batch 2 train these phantoms faster.
BATCH_SIZE = 1

_REPORT_NAME = "demo_report.json"
_LOG_NAME = "build.log"


def trainer_search_path() -> Path:
    """The folder holding ``nnUNetTrainer_TuckerDemo.py``; nnU-Net's ``nnUNet_extTrainer`` must point here."""
    return Path(__file__).resolve().parent / "trainers"


def _model_dir(root: Path) -> Path:
    return root / "nnUNet_results" / DATASET_NAME / f"{TRAINER_NAME}__{PLANS_NAME}__{CONFIGURATION}"
