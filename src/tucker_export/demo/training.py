"""The demo build itself: nnU-Net's pipeline run in-process on the CPU, its console sent to ``build.log``.

``_build(root)`` writes the data set and plans (:mod:`.dataset`), preprocesses, trains every fold with
``nnUNetTrainer_TuckerDemo`` and measures the held-out Dice with the stock ``nnUNetPredictor``, then
writes ``demo_report.json``. :mod:`.build` calls it inside a temporary folder under the cache lock.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from tucker_export._io import write_json_atomic
from tucker_export.demo.dataset import _plan, _preprocess, _write_dataset
from tucker_export.demo.phantom import LABEL_NAMES
from tucker_export.demo.recipe import (
    _LOG_NAME,
    _REPORT_NAME,
    BATCH_SIZE,
    CONFIGURATION,
    DATASET_NAME,
    FOLDS,
    NUM_TEST_CASES,
    NUM_TRAINING_CASES,
    PLANS_NAME,
    RECIPE_VERSION,
    TRAINER_NAME,
    _model_dir,
    trainer_search_path,
)
from tucker_export.errors import DemoBuildError
from tucker_export.runtimes import torch_threads

logger = logging.getLogger("tucker_export.demo")


class _Progress:
    """Stage + iteration progress on stderr via tqdm (or only log lines when disabled)."""

    def __init__(self, enabled: bool, total: int, stream: TextIO) -> None:
        self._bar = None
        if enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc="demo model", unit="step", file=stream, dynamic_ncols=True)

    def stage(self, text: str) -> None:
        logger.info("Demo build: %s", text)
        if self._bar is not None:
            self._bar.set_description(f"demo model: {text}")

    def update(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of the block and restore the previous state after.

    nnU-Net 2.8 reads ``nnUNet_raw``/``_preprocessed``/``_results``/``_extTrainer`` and
    ``nnUNet_n_proc_DA`` from ``os.environ`` when it needs them (and spawned workers inherit them), so
    scoping them here keeps the caller's configuration untouched.
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
def _seeded_global_rngs(seed: int) -> Iterator[None]:
    """Seed Python's, NumPy's and torch's global generators for the block; their states are restored after."""
    import random

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
def _console_to(log_file: Path) -> Iterator[TextIO]:
    """Send stdout (file descriptor 1, so spawned workers too) and Python's stderr to ``log_file``.

    Yields a stream on the *original* stderr for our own progress bar. nnU-Net prints a lot while
    planning and training; the CLI prints the model path as its last stdout line, so none of that may
    reach stdout.
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


def _available_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


@dataclass
class _Trained:
    """What the stages of a build hand to its report."""

    plan_summary: dict[str, Any]
    dice: dict[str, float]
    per_case: dict[str, dict[str, float]]
    timings: dict[str, float] = field(default_factory=dict)


def _build(root: Path, *, progress: bool) -> None:
    """Build the complete demo into ``root`` (which must not exist yet)."""
    started = time.monotonic()
    root.mkdir(parents=True)
    raw = root / "work" / "nnUNet_raw"
    preprocessed = root / "work" / "nnUNet_preprocessed"
    results = root / "nnUNet_results"
    for p in (raw, preprocessed, results):
        p.mkdir(parents=True)
    log_file = root / _LOG_NAME
    n_cpu = _available_cpus()
    env = {
        "nnUNet_raw": str(raw),
        "nnUNet_preprocessed": str(preprocessed),
        "nnUNet_results": str(results),
        "nnUNet_extTrainer": str(trainer_search_path()),
        # The planner also reads nnUNet_n_proc_DA (as a thread count, which must be >= 1); training
        # overrides it below.
        "nnUNet_n_proc_DA": str(n_cpu),
        "nnUNet_compile": "false",
    }

    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer  # noqa: F401  (fail early if missing)

    trainer_cls = _find_trainer_class(env)
    iterations_per_fold = trainer_cls.DEMO_NUM_EPOCHS * trainer_cls.DEMO_ITERATIONS_PER_EPOCH
    # Progress units: 1 per case written, 3 planning/preprocessing steps, the training iterations, 1 per test case.
    total = NUM_TRAINING_CASES + NUM_TEST_CASES + 3 + iterations_per_fold * len(FOLDS) + NUM_TEST_CASES

    with _console_to(log_file) as console, _environment(env), torch_threads(n_cpu):
        bar = _Progress(progress, total, console)
        trained = _train_and_evaluate(root, raw, preprocessed, n_cpu, trainer_cls, bar)

    _drop_regenerable(root)
    trained.timings["total"] = time.monotonic() - started
    _write_report(root, trained, trainer_cls, n_cpu)


def _train_and_evaluate(
    root: Path, raw: Path, preprocessed: Path, n_cpu: int, trainer_cls: Any, bar: _Progress
) -> _Trained:
    """Data set, plans and preprocessing, every fold's training, then the held-out Dice; each stage timed."""
    timings: dict[str, float] = {}
    try:
        t = time.monotonic()
        bar.stage("generating phantoms")
        _write_dataset(raw / DATASET_NAME, root / "test", bar)
        timings["phantoms"] = time.monotonic() - t

        t = time.monotonic()
        bar.stage("nnU-Net fingerprint + planning")
        plan_summary = _plan(raw, preprocessed, n_cpu, bar)
        bar.stage("nnU-Net preprocessing")
        _preprocess(n_cpu)
        bar.update()
        timings["plan_and_preprocess"] = time.monotonic() - t

        # In-process single-threaded augmentation: the demo's (mirror-only) augmentation and
        # loading take a few percent of an iteration, and on two cores a background augmenter
        # process would only compete with torch's threads for the same cores.
        with _environment({"nnUNet_n_proc_DA": "0"}):
            for fold in FOLDS:
                t = time.monotonic()
                bar.stage(f"training fold {fold}")
                _train_fold(trainer_cls, fold, bar)
                timings[f"train_fold_{fold}"] = time.monotonic() - t

        t = time.monotonic()
        bar.stage("held-out Dice")
        dice, per_case = _evaluate(_model_dir(root), root / "test", bar)
        timings["evaluate"] = time.monotonic() - t
    finally:
        bar.close()
    return _Trained(plan_summary, dice, per_case, timings)


def _drop_regenerable(root: Path) -> None:
    # Training data and preprocessed arrays can be regenerated from the seeds; drop them from the cache.
    shutil.rmtree(root / "work", ignore_errors=True)
    model_dir = _model_dir(root)
    for fold in FOLDS:
        # checkpoint_best.pth is nnU-Net's pseudo-Dice pick; the demo uses checkpoint_final.pth only.
        with contextlib.suppress(FileNotFoundError):
            (model_dir / f"fold_{fold}" / "checkpoint_best.pth").unlink()


def _write_report(root: Path, trained: _Trained, trainer_cls: Any, n_cpu: int) -> None:
    """Log the held-out Dice and write ``demo_report.json``."""
    dice = trained.dice
    mean = sum(dice.values()) / len(dice)
    logger.info(
        "Demo model trained in %.0f s; held-out Dice %s (mean %.3f)",
        trained.timings["total"],
        ", ".join(f"{k} {v:.3f}" for k, v in dice.items()),
        mean,
    )
    import nnunetv2
    import torch

    write_json_atomic(
        root / _REPORT_NAME,
        {
            "recipe_version": RECIPE_VERSION,
            "dataset_name": DATASET_NAME,
            "trainer_name": TRAINER_NAME,
            "plans_name": PLANS_NAME,
            "configuration": CONFIGURATION,
            "folds": list(FOLDS),
            "label_names": {str(k): v for k, v in LABEL_NAMES.items()},
            "dice_per_structure": dice,
            "mean_dice": mean,
            "dice_per_case": trained.per_case,
            "network": trained.plan_summary,
            "schedule": {
                "epochs": trainer_cls.DEMO_NUM_EPOCHS,
                "iterations_per_epoch": trainer_cls.DEMO_ITERATIONS_PER_EPOCH,
                "batch_size": BATCH_SIZE,
            },
            "num_training_cases": NUM_TRAINING_CASES,
            "num_test_cases": NUM_TEST_CASES,
            "timings_s": {k: round(v, 1) for k, v in trained.timings.items()},
            "cpu_threads": n_cpu,
            "versions": {
                "nnunetv2": getattr(nnunetv2, "__version__", _dist_version("nnunetv2")),
                "torch": torch.__version__,
            },
        },
    )


def _dist_version(name: str) -> str:
    from tucker_export._env import package_version

    return package_version(name, "unknown")


def _find_trainer_class(env: dict[str, str]) -> Any:
    """Resolve the demo trainer exactly as nnU-Net will at inference time (through ``nnUNet_extTrainer``)."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    # nnU-Net prints its search; that chatter has no place on the caller's stdout.
    with _environment(env), open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        try:
            return recursive_find_trainer_class_by_name(TRAINER_NAME)
        except RuntimeError as exc:
            raise DemoBuildError(
                f"nnU-Net cannot find {TRAINER_NAME} in {trainer_search_path()}; is tucker-export installed completely?"
            ) from exc


def _train_fold(trainer_cls: Any, fold: int, bar: _Progress) -> None:
    import torch
    from nnunetv2.paths import nnUNet_preprocessed

    dataset_pre = Path(os.fspath(nnUNet_preprocessed)) / DATASET_NAME
    plans = json.loads((dataset_pre / f"{PLANS_NAME}.json").read_text())
    plans["continue_training"] = False
    dataset_json = json.loads((dataset_pre / "dataset.json").read_text())
    # Seeded per fold so two builds of the same recipe train (nearly) the same model. nnU-Net's
    # augmentation draws from the global generators, so they are seeded, and restored after.
    with _seeded_global_rngs(fold):
        trainer = trainer_cls(
            plans=plans,
            configuration=CONFIGURATION,
            fold=fold,
            dataset_json=dataset_json,
            device=torch.device("cpu"),
        )
        trainer.progress_callback = bar.update
        trainer.run_training()


def _evaluate(
    model_dir: Path, test_root: Path, bar: _Progress
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Predict the held-out cases with nnU-Net's own predictor (all folds, mirroring) and compute Dice with numpy."""
    import numpy as np
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from tucker_export.validation.metrics import read_label_map

    predictor = nnUNetPredictor(
        tile_step_size=0.5,
        use_gaussian=True,
        use_mirroring=True,
        perform_everything_on_device=False,
        device=torch.device("cpu"),
        verbose=False,
        verbose_preprocessing=False,
        allow_tqdm=False,
    )
    predictor.initialize_from_trained_model_folder(
        str(model_dir), use_folds=FOLDS, checkpoint_name="checkpoint_final.pth"
    )

    per_case: dict[str, dict[str, float]] = {}
    for image_path in sorted((test_root / "imagesTs").glob("*_0000.nii.gz")):
        case = image_path.name[: -len("_0000.nii.gz")]
        [prediction] = predictor.predict_from_files_sequential(
            [[str(image_path)]], None, save_probabilities=False
        )
        reference = read_label_map(test_root / "labelsTs" / f"{case}.nii.gz")
        per_case[case] = _dice_per_label(np.asarray(prediction), reference)
        bar.update()

    structures = [name for value, name in sorted(LABEL_NAMES.items()) if value]
    dice = {}
    for name in structures:
        values = [d[name] for d in per_case.values() if not math.isnan(d[name])]
        dice[name] = round(float(np.mean(values)), 4) if values else float("nan")
    return dice, per_case


def _dice_per_label(prediction: Any, reference: Any) -> dict[str, float]:
    """Dice per foreground structure; NaN where a structure is absent from both maps."""
    from tucker_export.validation.metrics import label_dice

    if prediction.shape != reference.shape:
        raise DemoBuildError(
            f"nnU-Net returned a {prediction.shape} prediction for a {reference.shape} reference."
        )
    scores = label_dice(prediction, reference, [value for value in LABEL_NAMES if value])
    return {LABEL_NAMES[value]: score if math.isnan(score) else round(score, 4) for value, score in scores.items()}
