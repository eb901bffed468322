"""Build (once) and reuse a small, genuinely trained nnU-Net v2 model of CT-like phantoms.

``ensure_demo_model()`` is what the tests, the examples and ``tucker-export demo`` call. The first call
generates a synthetic data set (:mod:`tucker_export.demo.phantom`) in nnU-Net's raw format and runs
nnU-Net's own pipeline on it, in-process, on the CPU:

1. fingerprint extraction and nnU-Net's default experiment planner;
2. a derived plans file ``nnUNetPlans_TuckerDemo`` that keeps the planner's data settings (spacing,
   normalisation, resampling) but shrinks the 3d_fullres U-Net (4 stages, 16-128 features, one
   (32, 48, 48) patch that covers a whole phantom) so CPU training and inference are quick;
3. nnU-Net preprocessing, then training of folds 0 and 1 of nnU-Net's own 5-fold split with
   ``nnUNetTrainer_TuckerDemo`` (a short schedule, see ``trainers/``);
4. prediction of held-out phantoms with the stock ``nnUNetPredictor`` (fold ensemble, mirroring as
   the checkpoint allows) and Dice per structure, stored in ``demo_report.json``.

Everything is built inside a temporary folder in the cache and renamed into place only when complete,
under an ``fcntl`` lock, so concurrent callers wait for one build and crashes never leave a model that
looks finished. Later calls only read ``demo_report.json``.

Cache layout (``<cache>/demo-v<RECIPE_VERSION>/``)::

    nnUNet_results/Dataset987_TuckerDemoPhantom/nnUNetTrainer_TuckerDemo__nnUNetPlans_TuckerDemo__3d_fullres/
        dataset.json  plans.json  dataset_fingerprint.json  fold_0/checkpoint_final.pth  fold_1/...
    test/imagesTs/phantom_test_000_0000.nii.gz ...   test/labelsTs/phantom_test_000.nii.gz ...
    demo_report.json   build.log
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from tucker_export._io import write_json_atomic
from tucker_export.demo.phantom import LABEL_NAMES, PhantomCase, generate_phantom, write_case
from tucker_export.errors import DemoBuildError

__all__ = [
    "CONFIGURATION",
    "DATASET_NAME",
    "PLANS_NAME",
    "RECIPE_VERSION",
    "TRAINER_NAME",
    "DemoModel",
    "demo_cache_dir",
    "ensure_demo_model",
    "trainer_search_path",
]

logger = logging.getLogger("tucker_export.demo")

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


@dataclass(frozen=True)
class DemoModel:
    """A built demo model and its held-out test data; all paths are absolute and exist."""

    #: nnU-Net trained model folder (dataset.json, plans.json, fold_N/checkpoint_final.pth).
    model_dir: Path
    #: Held-out images, nnU-Net naming (``<case>_0000.nii.gz``).
    test_images_dir: Path
    #: Reference label maps of the held-out images (``<case>.nii.gz``).
    test_labels_dir: Path
    #: Folder to put in ``nnUNet_extTrainer`` so nnU-Net finds ``nnUNetTrainer_TuckerDemo``.
    trainer_search_path: Path
    folds: tuple[int, ...]
    #: Label value -> structure name, background included.
    label_names: dict[int, str]
    #: Dice of the fold ensemble on the held-out cases (mean over cases), per foreground structure.
    dice_per_structure: dict[str, float]
    #: The versioned cache folder holding everything above.
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
    def report_path(self) -> Path:
        return self.root / _REPORT_NAME

    def nnunet_env(self) -> dict[str, str]:
        """Environment variables stock nnU-Net commands need to find this model and its trainer."""
        return {"nnUNet_results": str(self.results_dir), "nnUNet_extTrainer": str(self.trainer_search_path)}

    def predict_command(
        self,
        input_dir: Path,
        output_dir: Path,
        *,
        folds: tuple[int, ...] | None = None,
        tta: bool = True,
        device: str = "cpu",
    ) -> list[str]:
        """Arguments of a stock ``nnUNetv2_predict`` run on this model (run it with :meth:`nnunet_env` set)."""
        cmd = [
            "nnUNetv2_predict", "-i", str(input_dir), "-o", str(output_dir), "-d", self.dataset_name,
            "-tr", self.trainer_name, "-p", self.plans_name, "-c", self.configuration,
            "-f", *[str(f) for f in (self.folds if folds is None else folds)], "-device", device,
        ]  # fmt: skip
        if not tta:
            cmd.append("--disable_tta")
        return cmd


def trainer_search_path() -> Path:
    """The folder holding ``nnUNetTrainer_TuckerDemo.py``; nnU-Net's ``nnUNet_extTrainer`` must point here."""
    return Path(__file__).resolve().parent / "trainers"


def demo_cache_dir() -> Path:
    """``$TUCKER_EXPORT_CACHE`` if set, else ``$XDG_CACHE_HOME/tucker-export``, else ``~/.cache/tucker-export``."""
    explicit = os.environ.get("TUCKER_EXPORT_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "tucker-export"


def ensure_demo_model(cache_dir: Path | None = None, *, progress: bool = True) -> DemoModel:
    """Return the demo model, building it first (a few minutes on two CPU cores) if the cache lacks it.

    ``cache_dir`` defaults to :func:`demo_cache_dir`. With ``progress`` a tqdm bar shows the build stages
    and training iterations on stderr; nnU-Net's own console output goes to ``build.log`` in the build
    folder either way, so stdout stays clean. Raises :class:`DemoBuildError` when the build fails.
    """
    _refuse_in_spawn_bootstrap()
    cache = Path(cache_dir).expanduser() if cache_dir is not None else demo_cache_dir()
    cache = cache.resolve()
    final = cache / f"demo-v{RECIPE_VERSION}"

    # Fast path without the lock: a finished demo only ever appears through an atomic rename.
    existing = _load_existing(final)
    if existing is not None:
        return existing

    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DemoBuildError(
            f"Cannot create the demo cache folder {cache} ({exc.strerror}); set TUCKER_EXPORT_CACHE to a writable folder."
        ) from exc

    with _exclusive_lock(cache / f".demo-v{RECIPE_VERSION}.lock"):
        # Another process may have finished the build while we waited for the lock.
        existing = _load_existing(final)
        if existing is not None:
            logger.info("Reusing the demo model another process just built in %s", final)
            return existing
        _remove_leftovers(cache, final)
        logger.info("Building the tucker-export demo model in %s (first use; a few minutes on a CPU)", final)
        build_dir = Path(tempfile.mkdtemp(prefix=f".demo-v{RECIPE_VERSION}.build-", dir=cache))
        try:
            _build(build_dir / "demo", progress=progress)
            os.rename(build_dir / "demo", final)
        except DemoBuildError:
            _keep_failed_log(build_dir, cache)
            raise
        except Exception as exc:
            log_path = _keep_failed_log(build_dir, cache)
            raise DemoBuildError(
                f"Building the demo model failed ({type(exc).__name__}: {exc}); nnU-Net's output is in {log_path}."
            ) from exc
        finally:
            shutil.rmtree(build_dir, ignore_errors=True)

    model = _load_existing(final)
    if model is None:  # pragma: no cover - would mean the build wrote an inconsistent folder
        raise DemoBuildError(
            f"The demo model built in {final} is incomplete; delete that folder and try again."
        )
    logger.info("Demo model ready: %s (mean Dice %.3f)", model.model_dir, model.mean_dice)
    return model


def _refuse_in_spawn_bootstrap() -> None:
    """Fail clearly when called while a spawned worker re-imports a script that lacks a main guard.

    nnU-Net's fingerprinting and preprocessing use "spawn" process pools, which re-import the calling
    script. Without ``if __name__ == "__main__":`` that script would call us again in every worker,
    and the worker would wait forever for the build lock its parent holds.
    """
    import multiprocessing.process

    if getattr(multiprocessing.process.current_process(), "_inheriting", False):
        raise DemoBuildError(
            "ensure_demo_model() was called while a worker process was starting; call it from under "
            "'if __name__ == \"__main__\":' in scripts."
        )


# ----------------------------------------------------------------------------------------------------------------
# Reuse


def _model_dir(root: Path) -> Path:
    return root / "nnUNet_results" / DATASET_NAME / f"{TRAINER_NAME}__{PLANS_NAME}__{CONFIGURATION}"


def _load_existing(root: Path) -> DemoModel | None:
    """The finished demo in ``root``, or None if there is none (or it is not complete)."""
    report_path = root / _REPORT_NAME
    if not report_path.is_file():
        return None
    try:
        report = json.loads(report_path.read_text(encoding="utf-8"))
        if report.get("recipe_version") != RECIPE_VERSION:
            return None
        folds = tuple(int(f) for f in report["folds"])
        model = DemoModel(
            model_dir=_model_dir(root),
            test_images_dir=root / "test" / "imagesTs",
            test_labels_dir=root / "test" / "labelsTs",
            trainer_search_path=trainer_search_path(),
            folds=folds,
            label_names={int(k): str(v) for k, v in report["label_names"].items()},
            dice_per_structure={str(k): float(v) for k, v in report["dice_per_structure"].items()},
            root=root,
            results_dir=root / "nnUNet_results",
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("Ignoring unreadable demo report %s (%s)", report_path, exc)
        return None
    required = [model.model_dir / "plans.json", model.model_dir / "dataset.json"]
    required += [model.model_dir / f"fold_{f}" / "checkpoint_final.pth" for f in folds]
    if not all(p.is_file() for p in required) or not any(model.test_images_dir.glob("*_0000.nii.gz")):
        logger.warning("Demo folder %s is incomplete; it will be rebuilt", root)
        return None
    return model


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``fcntl`` lock on ``path``; a second process blocks here until the first is done."""
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("Another process is building the demo model; waiting for it to finish")
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _remove_leftovers(cache: Path, final: Path) -> None:
    """Delete build folders of crashed builds and an incomplete final folder (we hold the lock)."""
    for stale in cache.glob(f".demo-v{RECIPE_VERSION}.build-*"):
        shutil.rmtree(stale, ignore_errors=True)
    if final.exists():
        shutil.rmtree(final, ignore_errors=True)


def _keep_failed_log(build_dir: Path, cache: Path) -> Path:
    """Copy the failed build's log next to the cache so the error can be read after cleanup."""
    src = build_dir / "demo" / _LOG_NAME
    dst = cache / f"demo-v{RECIPE_VERSION}-failed-build.log"
    with contextlib.suppress(OSError):
        shutil.copyfile(src, dst)
    return dst


# ----------------------------------------------------------------------------------------------------------------
# Build


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
def _torch_threads(n: int) -> Iterator[None]:
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


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
    timings: dict[str, float] = {}

    with _console_to(log_file) as console, _environment(env), _torch_threads(n_cpu):
        bar = _Progress(progress, total, console)
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

    # Training data and preprocessed arrays can be regenerated from the seeds; drop them from the cache.
    shutil.rmtree(root / "work", ignore_errors=True)
    model_dir = _model_dir(root)
    for fold in FOLDS:
        # checkpoint_best.pth is nnU-Net's pseudo-Dice pick; the demo uses checkpoint_final.pth only.
        with contextlib.suppress(FileNotFoundError):
            (model_dir / f"fold_{fold}" / "checkpoint_best.pth").unlink()

    timings["total"] = time.monotonic() - started
    mean = sum(dice.values()) / len(dice)
    logger.info(
        "Demo model trained in %.0f s; held-out Dice %s (mean %.3f)",
        timings["total"],
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
            "dice_per_case": per_case,
            "network": plan_summary,
            "schedule": {
                "epochs": trainer_cls.DEMO_NUM_EPOCHS,
                "iterations_per_epoch": trainer_cls.DEMO_ITERATIONS_PER_EPOCH,
                "batch_size": BATCH_SIZE,
            },
            "num_training_cases": NUM_TRAINING_CASES,
            "num_test_cases": NUM_TEST_CASES,
            "timings_s": {k: round(v, 1) for k, v in timings.items()},
            "cpu_threads": n_cpu,
            "versions": {
                "nnunetv2": getattr(nnunetv2, "__version__", _dist_version("nnunetv2")),
                "torch": torch.__version__,
            },
        },
    )


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:  # pragma: no cover
        return "unknown"


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


def _write_dataset(raw_dataset: Path, test_root: Path, bar: _Progress) -> None:
    """Write the training set in nnU-Net raw format and the held-out test set."""
    images_tr, labels_tr = raw_dataset / "imagesTr", raw_dataset / "labelsTr"
    images_ts, labels_ts = test_root / "imagesTs", test_root / "labelsTs"
    for d in (images_tr, labels_tr, images_ts, labels_ts):
        d.mkdir(parents=True, exist_ok=True)

    def write(name: str, case: PhantomCase, images: Path, labels: Path) -> None:
        write_case(case, images / f"{name}_0000.nii.gz", labels / f"{name}.nii.gz")
        bar.update()

    for i in range(NUM_TRAINING_CASES):
        # Every fourth case is a thick-slice (3 mm) scan, the rest near-isotropic.
        write(f"phantom_{i:03d}", generate_phantom(i, anisotropic=(i % 4 == 3)), images_tr, labels_tr)
    for i in range(NUM_TEST_CASES):
        write(
            f"phantom_test_{i:03d}",
            generate_phantom(_TEST_SEED_OFFSET + i, anisotropic=(i % 4 == 1)),
            images_ts,
            labels_ts,
        )

    dataset_json = {
        "name": "TuckerDemoPhantom",
        "description": "Synthetic CT-like phantoms generated by tucker_export.demo.phantom (seeded).",
        "channel_names": {"0": "CT"},
        "labels": {name: value for value, name in LABEL_NAMES.items()},
        "numTraining": NUM_TRAINING_CASES,
        "file_ending": ".nii.gz",
        "licence": "CC0 (synthetic data)",
        "tucker_export_recipe_version": RECIPE_VERSION,
    }
    write_json_atomic(raw_dataset / "dataset.json", dataset_json)


def _plan(raw: Path, preprocessed: Path, n_cpu: int, bar: _Progress) -> dict[str, Any]:
    """Fingerprint + nnU-Net's default planner, then derive the small demo plans from its 3d_fullres plan."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments

    extract_fingerprints(
        [DATASET_ID], num_processes=n_cpu, check_dataset_integrity=True, show_progress_bar=False
    )
    bar.update()
    default_plans_name = plan_experiments([DATASET_ID])
    bar.update()

    dataset_pre = preprocessed / DATASET_NAME
    plans = json.loads((dataset_pre / f"{default_plans_name}.json").read_text())
    fingerprint = json.loads((dataset_pre / "dataset_fingerprint.json").read_text())
    demo_plans, summary = _derive_demo_plans(plans, fingerprint)
    write_json_atomic(dataset_pre / f"{PLANS_NAME}.json", demo_plans)
    return summary


def _derive_demo_plans(
    plans: dict[str, Any], fingerprint: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The planner's plans with a single, small 3d_fullres configuration.

    Kept from the planner: target spacing, normalisation, resampling, transposition, intensity
    statistics. Replaced: the network size and patch. The patch is the smallest multiple of 8 that
    covers every resampled training case, so inference is a single sliding-window tile per case.
    """
    import copy

    import numpy as np

    demo = copy.deepcopy(plans)
    demo["plans_name"] = PLANS_NAME
    cfg = demo["configurations"][CONFIGURATION]
    # Keep only the configuration we train: a plans file advertising 2d/3d_lowres models that do not
    # exist would only confuse tools that list configurations.
    demo["configurations"] = {CONFIGURATION: cfg}

    spacing = np.asarray(cfg["spacing"], dtype=float)  # already in transposed (network) axis order
    transpose = demo["transpose_forward"]
    shapes = []
    for shape, sp in zip(fingerprint["shapes_after_crop"], fingerprint["spacings"]):
        shape_t = np.asarray(shape, dtype=float)[transpose]
        sp_t = np.asarray(sp, dtype=float)[transpose]
        shapes.append(np.round(shape_t * sp_t / spacing))
    max_shape = np.max(np.stack(shapes), axis=0)
    n_stages = len(FEATURES_PER_STAGE)
    divisor = 2 ** (n_stages - 1)
    patch = [int(math.ceil(s / divisor) * divisor) for s in max_shape]

    arch = cfg["architecture"]
    if not arch["network_class_name"].endswith("PlainConvUNet"):
        raise DemoBuildError(
            f"nnU-Net's planner chose {arch['network_class_name']}; the demo expects PlainConvUNet."
        )
    kwargs = arch["arch_kwargs"]
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
    cfg["patch_size"] = patch
    cfg["batch_size"] = BATCH_SIZE
    cfg["data_identifier"] = f"{PLANS_NAME}_{CONFIGURATION}"
    summary = {
        "network_class_name": arch["network_class_name"],
        "features_per_stage": list(FEATURES_PER_STAGE),
        "n_stages": n_stages,
        "patch_size": patch,
        "spacing": [float(s) for s in spacing],
        "batch_size": BATCH_SIZE,
    }
    return demo, summary


def _preprocess(n_cpu: int) -> None:
    from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess

    preprocess(
        [DATASET_ID],
        PLANS_NAME,
        configurations=(CONFIGURATION,),
        num_processes=(n_cpu,),
        show_progress_bar=False,
    )


def _train_fold(trainer_cls: Any, fold: int, bar: _Progress) -> None:
    import torch
    from nnunetv2.paths import nnUNet_preprocessed

    dataset_pre = Path(os.fspath(nnUNet_preprocessed)) / DATASET_NAME
    plans = json.loads((dataset_pre / f"{PLANS_NAME}.json").read_text())
    plans["continue_training"] = False
    dataset_json = json.loads((dataset_pre / "dataset.json").read_text())
    # Seeded per fold so two builds of the same recipe train (nearly) the same model.
    import random

    import numpy as np

    random.seed(fold)
    np.random.seed(fold)
    torch.manual_seed(fold)
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
    import SimpleITK as sitk
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

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
        reference = sitk.GetArrayFromImage(sitk.ReadImage(str(test_root / "labelsTs" / f"{case}.nii.gz")))
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
    import numpy as np

    if prediction.shape != reference.shape:
        raise DemoBuildError(
            f"nnU-Net returned a {prediction.shape} prediction for a {reference.shape} reference."
        )
    out = {}
    for value, name in LABEL_NAMES.items():
        if not value:
            continue
        p, r = prediction == value, reference == value
        denom = int(p.sum()) + int(r.sum())
        out[name] = round(2.0 * int(np.logical_and(p, r).sum()) / denom, 4) if denom else float("nan")
    return out
