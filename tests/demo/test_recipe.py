"""The recipe's plain decisions: derived plans, the one-fold split, the trainer's mirroring and schedule."""

from __future__ import annotations

import json
from types import SimpleNamespace

from tucker_export.demo import nnunet_run
from tucker_export.demo.recipe import BATCH_SIZE, CONFIGURATION, FEATURES_PER_STAGE, PATCH_SIZE, PLANS_NAME


def _planner_plans() -> dict:
    return {
        "plans_name": "nnUNetPlans",
        "transpose_forward": [0, 2, 1],
        "configurations": {
            CONFIGURATION: {
                "spacing": [3.9, 2.5, 3.9], "patch_size": [128, 128, 128], "batch_size": 2,
                "data_identifier": "nnUNetPlans_3d_fullres",
                "architecture": {
                    "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                    "arch_kwargs": {"n_stages": 6, "features_per_stage": [32, 64, 128, 256, 320, 320]},
                },
            },
            "2d": {"patch_size": [128, 128]},
        },
    }


def test_derived_plans_keep_the_planners_data_settings_and_record_its_network():
    derived, summary = nnunet_run.derive_plans(_planner_plans())
    cfg = derived["configurations"][CONFIGURATION]
    assert list(derived["configurations"]) == [CONFIGURATION] and derived["plans_name"] == PLANS_NAME
    assert cfg["spacing"] == [3.9, 2.5, 3.9] and derived["transpose_forward"] == [0, 2, 1]
    kwargs = cfg["architecture"]["arch_kwargs"]
    assert kwargs["features_per_stage"] == list(FEATURES_PER_STAGE) and kwargs["n_stages"] == len(FEATURES_PER_STAGE)
    assert len(FEATURES_PER_STAGE) >= 5 and max(FEATURES_PER_STAGE) >= 256  # the wide deep stages Tucker is for
    assert cfg["patch_size"] == list(PATCH_SIZE) and cfg["batch_size"] == BATCH_SIZE
    assert summary["nnunet_default_plan"]["features_per_stage"] == [32, 64, 128, 256, 320, 320]


def test_the_split_is_seeded_and_keeps_the_validation_patients_out(tmp_path):
    names = [f"openkbp_{i:03d}" for i in range(20)]
    (tmp_path / "Dataset988_OpenKBPHeadNeck").mkdir()
    first = nnunet_run.write_split(tmp_path, names, 5, seed=4)
    again = nnunet_run.write_split(tmp_path, list(reversed(names)), 5, seed=4)
    assert first == again and len(first["val"]) == 5 and not set(first["val"]) & set(first["train"])
    assert sorted(first["train"] + first["val"]) == names
    saved = json.loads((tmp_path / "Dataset988_OpenKBPHeadNeck" / "splits_final.json").read_text())
    assert saved == [first]


def test_the_trainer_never_mirrors():
    trainer_cls = nnunet_run.find_trainer_class()
    assert trainer_cls.__name__ == "nnUNetTrainer_TuckerHN"
    assert trainer_cls.HN_NUM_EPOCHS * trainer_cls.HN_ITERATIONS_PER_EPOCH >= 1000
    # Only what nnU-Net's method reads is set up: the patch size and the log.
    trainer = object.__new__(trainer_cls)
    trainer.configuration_manager = SimpleNamespace(patch_size=list(PATCH_SIZE))
    trainer.print_to_log_file = lambda *args, **kwargs: None
    rotation, dummy_2d, initial_patch, mirror_axes = trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    assert mirror_axes is None and trainer.inference_allowed_mirroring_axes is None
    assert not dummy_2d and min(initial_patch) >= min(PATCH_SIZE)  # rotation and scaling are kept
