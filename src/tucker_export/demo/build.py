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
looks finished. Later calls only read ``demo_report.json``. This module holds the cache, the lock and
the reuse; the names and the recipe version are in :mod:`.recipe`, the data set and plans in
:mod:`.dataset`, the nnU-Net run in :mod:`.training`.

Cache layout (``<cache>/demo-v<RECIPE_VERSION>/``)::

    nnUNet_results/Dataset987_TuckerDemoPhantom/nnUNetTrainer_TuckerDemo__nnUNetPlans_TuckerDemo__3d_fullres/
        dataset.json  plans.json  dataset_fingerprint.json  fold_0/checkpoint_final.pth  fold_1/...
    test/imagesTs/phantom_test_000_0000.nii.gz ...   test/labelsTs/phantom_test_000.nii.gz ...
    demo_report.json   build.log
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tucker_export._io import exclusive_lock, user_cache_dir
from tucker_export.demo.recipe import (
    _LOG_NAME,
    _REPORT_NAME,
    CONFIGURATION,
    DATASET_NAME,
    PLANS_NAME,
    RECIPE_VERSION,
    TRAINER_NAME,
    _model_dir,
    trainer_search_path,
)
from tucker_export.demo.training import _build
from tucker_export.errors import DemoBuildError

__all__ = [
    "DemoModel",
    "demo_cache_dir",
    "ensure_demo_model",
]

logger = logging.getLogger("tucker_export.demo")


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
    def training_images_dir(self) -> Path:
        """The training images without labels (``imagesTr`` under the cache root); see :meth:`ensure_training_images`."""
        return self.root / "imagesTr"

    def ensure_training_images(self) -> Path:
        """Write the training images (no labels) into :attr:`training_images_dir` unless they are there."""
        from tucker_export.demo.dataset import write_training_images

        with _exclusive_lock(self.root.parent / f".{self.root.name}.imagesTr.lock"):
            return write_training_images(self.training_images_dir)

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


def demo_cache_dir() -> Path:
    """The user cache folder (``_io.user_cache_dir``); the demo lives in its ``demo-v<N>`` folder."""
    return user_cache_dir()


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


def _exclusive_lock(path: Path) -> contextlib.AbstractContextManager[None]:
    return exclusive_lock(path, "Another process is building the demo model (lock %s); waiting for it to finish")


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
