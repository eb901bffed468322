"""nnU-Net's own pipeline, run in-process on the CPU for the recipe: planning, derived plans, preprocessing, training.

Everything nnU-Net reads from the environment is scoped (:func:`environment`), its console goes to a log
file (:func:`console_to`), and the global generators its augmentation draws from are seeded and restored
(:func:`seeded_global_rngs`), so the caller's process is left as it was.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import random
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

from tucker_export._io import write_json_atomic
from tucker_export.demo.recipe import (
    BATCH_SIZE,
    CONFIGURATION,
    DATASET_ID,
    DATASET_NAME,
    FEATURES_PER_STAGE,
    PATCH_SIZE,
    PLANS_NAME,
    TRAINER_NAME,
    trainer_search_path,
)
from tucker_export.errors import DemoBuildError


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the block and restore the previous state after.

    nnU-Net reads ``nnUNet_raw``/``_preprocessed``/``_results``/``_extTrainer`` and ``nnUNet_n_proc_DA``
    from ``os.environ`` when it needs them (and spawned workers inherit them).
    """
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


@contextlib.contextmanager
def seeded_global_rngs(seed: int) -> Iterator[None]:
    """Seed Python's, NumPy's and torch's global generators for the block; their states are restored after."""
    import numpy as np
    import torch

    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])


@contextlib.contextmanager
def console_to(log_file: Path) -> Iterator[TextIO]:
    """Send stdout (file descriptor 1, so spawned workers too) and Python's stderr to ``log_file``.

    Yields a stream on the *original* stderr for our own progress bar: nnU-Net prints a lot while
    planning and training, and none of it may reach the caller's stdout.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved_fd = os.dup(1)
    original_stderr = sys.stderr
    with open(log_file, "a", buffering=1, encoding="utf-8") as log:
        os.dup2(log.fileno(), 1)
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                yield original_stderr
        finally:
            sys.stdout.flush()
            os.dup2(saved_fd, 1)
            os.close(saved_fd)


def available_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def nnunet_env(raw: Path, preprocessed: Path, results: Path, n_cpu: int) -> dict[str, str]:
    return {
        "nnUNet_raw": str(raw),
        "nnUNet_preprocessed": str(preprocessed),
        "nnUNet_results": str(results),
        "nnUNet_extTrainer": str(trainer_search_path()),
        # The planner reads nnUNet_n_proc_DA as a thread count (>= 1); training sets it to 0 itself.
        "nnUNet_n_proc_DA": str(n_cpu),
        "nnUNet_compile": "false",
    }


def find_trainer_class() -> Any:
    """The recipe's trainer, resolved exactly as nnU-Net will at inference time (through ``nnUNet_extTrainer``)."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    with environment({"nnUNet_extTrainer": str(trainer_search_path())}), open(os.devnull, "w") as devnull, \
            contextlib.redirect_stdout(devnull):  # fmt: skip
        try:
            return recursive_find_trainer_class_by_name(TRAINER_NAME)
        except RuntimeError as exc:
            raise DemoBuildError(
                f"nnU-Net cannot find {TRAINER_NAME} in {trainer_search_path()}; is tucker-export installed completely?"
            ) from exc


def plan(preprocessed: Path, n_cpu: int) -> dict[str, Any]:
    """Fingerprint + nnU-Net's default planner, then the recipe's plans derived from its 3d_fullres plan."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments

    extract_fingerprints([DATASET_ID], num_processes=n_cpu, check_dataset_integrity=True, show_progress_bar=False)
    default_plans_name = plan_experiments([DATASET_ID])
    dataset_pre = preprocessed / DATASET_NAME
    plans = json.loads((dataset_pre / f"{default_plans_name}.json").read_text())
    derived, summary = derive_plans(plans)
    write_json_atomic(dataset_pre / f"{PLANS_NAME}.json", derived)
    return summary


def derive_plans(plans: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The planner's plans with one 3d_fullres configuration of the recipe's network and patch.

    Kept from the planner: target spacing, normalisation, resampling, transposition, intensity
    statistics, and what it planned for the network (returned in the summary, for the record).
    """
    derived = copy.deepcopy(plans)
    derived["plans_name"] = PLANS_NAME
    cfg = derived["configurations"][CONFIGURATION]
    # Only the configuration we train: a plans file advertising models that do not exist would confuse tools.
    derived["configurations"] = {CONFIGURATION: cfg}
    arch = cfg["architecture"]
    if not arch["network_class_name"].endswith("PlainConvUNet"):
        raise DemoBuildError(f"nnU-Net's planner chose {arch['network_class_name']}; the recipe expects PlainConvUNet.")
    kwargs = arch["arch_kwargs"]
    planned = {
        "features_per_stage": list(kwargs["features_per_stage"]),
        "patch_size": list(cfg["patch_size"]),
        "batch_size": cfg["batch_size"],
    }
    n_stages = len(FEATURES_PER_STAGE)
    kwargs.update(
        {
            "n_stages": n_stages,
            "features_per_stage": list(FEATURES_PER_STAGE),
            "kernel_sizes": [[3, 3, 3]] * n_stages,
            "strides": [[1, 1, 1]] + [[2, 2, 2]] * (n_stages - 1),
            "n_conv_per_stage": [2] * n_stages,
            "n_conv_per_stage_decoder": [2] * (n_stages - 1),
        }
    )
    cfg["patch_size"] = list(PATCH_SIZE)
    cfg["batch_size"] = BATCH_SIZE
    cfg["data_identifier"] = f"{PLANS_NAME}_{CONFIGURATION}"
    summary = {
        "network_class_name": arch["network_class_name"],
        "features_per_stage": list(FEATURES_PER_STAGE),
        "n_stages": n_stages,
        "patch_size": list(PATCH_SIZE),
        "spacing": [float(s) for s in cfg["spacing"]],
        "batch_size": BATCH_SIZE,
        "nnunet_default_plan": planned,
    }
    return derived, summary


def preprocess(n_cpu: int) -> None:
    from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess as nnunet_preprocess

    nnunet_preprocess([DATASET_ID], PLANS_NAME, configurations=(CONFIGURATION,), num_processes=(n_cpu,),
                      show_progress_bar=False)  # fmt: skip


def write_split(preprocessed: Path, names: list[str], num_validation: int, seed: int) -> dict[str, list[str]]:
    """nnU-Net's ``splits_final.json`` with one fold: all patients but ``num_validation`` seeded ones train."""
    shuffled = sorted(names)
    random.Random(seed).shuffle(shuffled)
    split = {"train": sorted(shuffled[num_validation:]), "val": sorted(shuffled[:num_validation])}
    write_json_atomic(preprocessed / DATASET_NAME / "splits_final.json", [split])
    return split


def train_fold(trainer_cls: Any, fold: int, on_iteration: Callable[[int], object] | None, *,
               resume: bool = False, on_resume: Callable[[int], object] | None = None) -> Any:  # fmt: skip
    """Train one fold with nnU-Net's trainer, seeded; ``resume`` continues from ``checkpoint_latest.pth``.

    ``on_resume`` is called with the epoch training resumes at.
    """
    import torch
    from nnunetv2.paths import nnUNet_preprocessed

    dataset_pre = Path(os.fspath(nnUNet_preprocessed)) / DATASET_NAME
    plans = json.loads((dataset_pre / f"{PLANS_NAME}.json").read_text())
    plans["continue_training"] = resume
    dataset_json = json.loads((dataset_pre / "dataset.json").read_text())
    with seeded_global_rngs(fold), environment({"nnUNet_n_proc_DA": "0"}):
        trainer = trainer_cls(plans=plans, configuration=CONFIGURATION, fold=fold, dataset_json=dataset_json,
                              device=torch.device("cpu"))  # fmt: skip
        trainer.progress_callback = on_iteration
        if resume:
            latest = Path(trainer.output_folder) / "checkpoint_latest.pth"
            if latest.is_file():
                trainer.load_checkpoint(str(latest))
                if on_resume is not None:
                    on_resume(trainer.current_epoch)
        trainer.run_training()
    return trainer
