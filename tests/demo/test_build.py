"""The demo model: cache location, build safety (lock, atomic rename, env restore) and the real trained model.

The first group runs with a fake ``_build`` and takes milliseconds. The second group uses the
session-scoped ``demo_model`` fixture (tests/conftest.py), which builds the real model into the cache
on first use (minutes on two CPU cores) and reuses it afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tucker_export.demo import build as demo_build
from tucker_export.demo import dataset as demo_dataset
from tucker_export.demo import demo_cache_dir, ensure_demo_model
from tucker_export.demo import recipe as demo_recipe
from tucker_export.demo import training as demo_training
from tucker_export.errors import DemoBuildError

# --------------------------------------------------------------------------------------------------------------
# Cache location and build mechanics (fake build, fast)


def test_cache_dir_follows_environment(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TUCKER_EXPORT_CACHE", str(tmp_path / "c"))
    assert demo_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("TUCKER_EXPORT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert demo_cache_dir() == tmp_path / "xdg" / "tucker-export"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert demo_cache_dir() == tmp_path / "home" / ".cache" / "tucker-export"


def _fake_build(calls: list[float], hold: threading.Event | None = None, entered: threading.Event | None = None):
    """A stand-in for the minutes-long real build that writes the files a finished demo consists of.

    With ``hold``, the build signals ``entered`` and then waits until the test releases it, so other
    callers are certain to arrive while it runs (no sleeps, no timing).
    """

    def build(root: Path, *, progress: bool) -> None:
        calls.append(time.monotonic())
        if hold is not None and entered is not None:
            entered.set()
            assert hold.wait(timeout=60), "the test never released the fake build"
        model_dir = demo_recipe._model_dir(root)
        for fold in demo_recipe.FOLDS:
            (model_dir / f"fold_{fold}").mkdir(parents=True)
            (model_dir / f"fold_{fold}" / "checkpoint_final.pth").write_bytes(b"weights")
        (model_dir / "plans.json").write_text("{}")
        (model_dir / "dataset.json").write_text("{}")
        (root / "test" / "imagesTs").mkdir(parents=True)
        (root / "test" / "labelsTs").mkdir(parents=True)
        (root / "test" / "imagesTs" / "case_0000.nii.gz").write_bytes(b"image")
        report = {
            "recipe_version": demo_recipe.RECIPE_VERSION,
            "folds": list(demo_recipe.FOLDS),
            "label_names": {"0": "background", "1": "liver"},
            "dice_per_structure": {"liver": 0.95},
        }
        (root / "demo_report.json").write_text(json.dumps(report))

    return build


def test_build_once_then_reuse(monkeypatch, tmp_path: Path) -> None:
    calls: list[float] = []
    monkeypatch.setattr(demo_build, "_build", _fake_build(calls))
    first = ensure_demo_model(tmp_path, progress=False)
    second = ensure_demo_model(tmp_path, progress=False)
    assert len(calls) == 1
    assert first == second
    assert first.root == tmp_path.resolve() / f"demo-v{demo_recipe.RECIPE_VERSION}"
    assert first.dice_per_structure == {"liver": 0.95}
    assert first.label_names == {0: "background", 1: "liver"}
    assert first.folds == demo_recipe.FOLDS
    # Only the finished folder and the lock file remain; no temporary build folder.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"demo-v{demo_recipe.RECIPE_VERSION}", f".demo-v{demo_recipe.RECIPE_VERSION}.lock"]
    )


def test_concurrent_callers_build_once(monkeypatch, tmp_path: Path) -> None:
    calls: list[float] = []
    hold, entered = threading.Event(), threading.Event()
    monkeypatch.setattr(demo_build, "_build", _fake_build(calls, hold, entered))
    results: list[object] = []

    def worker() -> None:
        results.append(ensure_demo_model(tmp_path, progress=False))

    first = threading.Thread(target=worker)
    first.start()
    assert entered.wait(timeout=60)  # the first caller is inside the build, holding the lock
    others = [threading.Thread(target=worker) for _ in range(2)]
    for t in others:
        t.start()
    hold.set()
    for t in [first, *others]:
        t.join(timeout=60)
    assert len(calls) == 1
    assert len(results) == 3 and all(r == results[0] for r in results)


def test_lock_blocks_other_processes(tmp_path: Path) -> None:
    """A second holder waits for the first: it logs its wait, and gets the lock only once the first lets go."""
    import logging

    lock = tmp_path / "x.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, sys; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
         "print('locked', flush=True); sys.stdin.readline()", str(lock)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    waiting, acquired = threading.Event(), threading.Event()

    class WaitSeen(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "waiting" in record.getMessage():
                waiting.set()

    def take_lock() -> None:
        with demo_build._exclusive_lock(lock):
            acquired.set()

    handler = WaitSeen()
    io_logger = logging.getLogger("tucker_export")
    io_logger.addHandler(handler)
    previous_level = io_logger.level
    io_logger.setLevel(logging.INFO)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        taker = threading.Thread(target=take_lock)
        taker.start()
        assert waiting.wait(timeout=60)  # it found the lock held and is now blocked on it
        assert not acquired.is_set()
        holder.communicate("release\n", timeout=60)
        taker.join(timeout=60)
        assert acquired.is_set()
    finally:
        io_logger.removeHandler(handler)
        io_logger.setLevel(previous_level)
        if holder.poll() is None:
            holder.kill()


def test_failed_build_leaves_no_model_and_raises_demo_build_error(monkeypatch, tmp_path: Path) -> None:
    def broken(root: Path, *, progress: bool) -> None:
        root.mkdir(parents=True)
        (root / "demo_report.json").write_text("{}")  # a half-written build must never look finished
        (root / "build.log").write_text("nnU-Net said something\n")
        raise RuntimeError("training exploded")

    monkeypatch.setattr(demo_build, "_build", broken)
    with pytest.raises(DemoBuildError, match="training exploded") as info:
        ensure_demo_model(tmp_path, progress=False)
    assert "failed-build.log" in str(info.value)
    assert not (tmp_path / f"demo-v{demo_recipe.RECIPE_VERSION}").exists()
    assert not list(tmp_path.glob(f".demo-v{demo_recipe.RECIPE_VERSION}.build-*"))
    assert (
        (tmp_path / f"demo-v{demo_recipe.RECIPE_VERSION}-failed-build.log").read_text().startswith("nnU-Net")
    )


def test_incomplete_or_stale_folders_are_rebuilt(monkeypatch, tmp_path: Path) -> None:
    calls: list[float] = []
    monkeypatch.setattr(demo_build, "_build", _fake_build(calls))
    model = ensure_demo_model(tmp_path, progress=False)
    # A crashed build's leftovers and a model missing a checkpoint.
    (tmp_path / f".demo-v{demo_recipe.RECIPE_VERSION}.build-crashed").mkdir()
    (model.model_dir / f"fold_{model.folds[0]}" / "checkpoint_final.pth").unlink()
    rebuilt = ensure_demo_model(tmp_path, progress=False)
    assert len(calls) == 2
    assert (rebuilt.model_dir / f"fold_{model.folds[0]}" / "checkpoint_final.pth").is_file()
    assert not (tmp_path / f".demo-v{demo_recipe.RECIPE_VERSION}.build-crashed").exists()
    # A report from another recipe version is not reused either.
    report = json.loads(rebuilt.report_path.read_text())
    report["recipe_version"] = -1
    rebuilt.report_path.write_text(json.dumps(report))
    ensure_demo_model(tmp_path, progress=False)
    assert len(calls) == 3


def test_environment_is_scoped(monkeypatch) -> None:
    monkeypatch.setenv("nnUNet_raw", "/caller/raw")
    monkeypatch.delenv("nnUNet_results", raising=False)
    with demo_training._environment({"nnUNet_raw": "/build/raw", "nnUNet_results": "/build/results"}):
        assert os.environ["nnUNet_raw"] == "/build/raw"
        assert os.environ["nnUNet_results"] == "/build/results"
    assert os.environ["nnUNet_raw"] == "/caller/raw"
    assert "nnUNet_results" not in os.environ


def test_refuses_to_build_inside_a_spawning_worker(monkeypatch, tmp_path: Path) -> None:
    import multiprocessing.process

    monkeypatch.setattr(multiprocessing.process.current_process(), "_inheriting", True, raising=False)
    with pytest.raises(DemoBuildError, match="__main__"):
        ensure_demo_model(tmp_path, progress=False)


def test_unwritable_cache_is_a_demo_build_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(DemoBuildError, match="TUCKER_EXPORT_CACHE"):
        ensure_demo_model(blocker / "cache", progress=False)


def test_derived_plans_are_small_standard_unet() -> None:
    plans = {
        "plans_name": "nnUNetPlans",
        "transpose_forward": [0, 1, 2],
        "configurations": {
            "2d": {"patch_size": [64, 64]},
            "3d_fullres": {
                "spacing": [1.5, 1.5, 1.5],
                "patch_size": [32, 64, 64],
                "batch_size": 2,
                "data_identifier": "nnUNetPlans_3d_fullres",
                "architecture": {
                    "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                    "arch_kwargs": {"n_stages": 5, "features_per_stage": [32, 64, 128, 256, 320]},
                },
            },
        },
    }
    fingerprint = {
        "shapes_after_crop": [[30, 46, 46], [15, 46, 46]],
        "spacings": [[1.5, 1.5, 1.5], [3.0, 1.5, 1.5]],
    }
    demo, summary = demo_dataset._derive_demo_plans(plans, fingerprint)
    cfg = demo["configurations"]["3d_fullres"]
    assert list(demo["configurations"]) == ["3d_fullres"]
    assert demo["plans_name"] == demo_recipe.PLANS_NAME
    assert cfg["patch_size"] == [32, 48, 48]  # smallest multiple of 8 covering every resampled case
    kwargs = cfg["architecture"]["arch_kwargs"]
    assert kwargs["n_stages"] == len(demo_recipe.FEATURES_PER_STAGE) == 4
    assert kwargs["features_per_stage"] == list(demo_recipe.FEATURES_PER_STAGE)
    assert summary["patch_size"] == [32, 48, 48]
    assert plans["configurations"]["3d_fullres"]["patch_size"] == [32, 64, 64]  # input untouched


# --------------------------------------------------------------------------------------------------------------
# The real model (built once per cache)


def _dice(prediction: np.ndarray, reference: np.ndarray) -> list[float]:
    return [
        2 * np.sum((prediction == k) & (reference == k)) / (np.sum(prediction == k) + np.sum(reference == k))
        for k in np.unique(reference)
        if k
    ]


def test_demo_model_is_trained(demo_model) -> None:
    assert demo_model.mean_dice >= 0.90, demo_model.dice_per_structure
    assert set(demo_model.dice_per_structure) == {"liver", "kidney", "spine", "lung", "fat"}
    assert demo_model.label_names[0] == "background" and len(demo_model.label_names) == 6
    assert demo_model.folds == (0, 1)
    assert all(
        (demo_model.model_dir / f"fold_{f}" / "checkpoint_final.pth").is_file() for f in demo_model.folds
    )
    for name in ("dataset.json", "plans.json"):
        assert (demo_model.model_dir / name).is_file()
    images = sorted(demo_model.test_images_dir.glob("*_0000.nii.gz"))
    assert images
    for image in images:
        assert (demo_model.test_labels_dir / image.name.replace("_0000.nii.gz", ".nii.gz")).is_file()
    assert (demo_model.trainer_search_path / "nnUNetTrainer_TuckerDemo.py").is_file()
    report = json.loads(demo_model.report_path.read_text())
    assert report["dice_per_structure"] == demo_model.dice_per_structure


def test_reuse_is_instant_and_identical(demo_model) -> None:
    started = time.monotonic()
    again = ensure_demo_model(progress=False)
    assert time.monotonic() - started < 5
    assert again == demo_model


def test_nnunet_predictor_loads_it(demo_model, monkeypatch) -> None:
    import torch
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    monkeypatch.setenv("nnUNet_extTrainer", str(demo_model.trainer_search_path))
    predictor = nnUNetPredictor(device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(demo_model.model_dir), use_folds=demo_model.folds)
    assert predictor.trainer_name == "nnUNetTrainer_TuckerDemo"
    assert len(predictor.list_of_parameters) == len(demo_model.folds)
    net = predictor.network
    assert type(net) is PlainConvUNet
    modules = list(net.modules())
    assert any(isinstance(m, torch.nn.Conv3d) for m in modules)
    assert any(isinstance(m, torch.nn.InstanceNorm3d) for m in modules)
    # Left-right test-time mirroring, as the trainer allowed.
    assert tuple(predictor.allowed_mirroring_axes) == (2,)


def test_predictor_reproduces_recorded_dice_on_one_case(demo_model, monkeypatch) -> None:
    import SimpleITK as sitk
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    monkeypatch.setenv("nnUNet_extTrainer", str(demo_model.trainer_search_path))
    predictor = nnUNetPredictor(
        device=torch.device("cpu"), allow_tqdm=False, perform_everything_on_device=False
    )
    predictor.initialize_from_trained_model_folder(str(demo_model.model_dir), use_folds=demo_model.folds)
    image = sorted(demo_model.test_images_dir.glob("*_0000.nii.gz"))[0]
    [prediction] = predictor.predict_from_files_sequential([[str(image)]], None)
    reference = sitk.GetArrayFromImage(
        sitk.ReadImage(str(demo_model.test_labels_dir / image.name.replace("_0000.nii.gz", ".nii.gz")))
    )
    assert np.mean(_dice(np.asarray(prediction), reference)) >= 0.9


@pytest.mark.slow
def test_stock_nnunetv2_predict_accepts_it(demo_model, tmp_path: Path) -> None:
    case = sorted(demo_model.test_images_dir.glob("*_0000.nii.gz"))[0]
    name = case.name.removesuffix("_0000.nii.gz")
    (tmp_path / "in").mkdir()
    shutil.copyfile(case, tmp_path / "in" / case.name)
    # Only what nnU-Net needs to find the model; nnUNet_raw/preprocessed set to an empty folder so a
    # developer's own nnU-Net data cannot interfere.
    env = dict(
        os.environ, nnUNet_raw=str(tmp_path), nnUNet_preprocessed=str(tmp_path), **demo_model.nnunet_env()
    )
    cmd = demo_model.predict_command(tmp_path / "in", tmp_path / "out", folds=(0,), tta=False, device="cpu")
    cmd[0] = str(Path(sys.executable).parent / "nnUNetv2_predict")
    cmd += ["-npp", "1", "-nps", "1", "--disable_progress_bar"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    import SimpleITK as sitk

    prediction = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / f"{name}.nii.gz")))
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(demo_model.test_labels_dir / f"{name}.nii.gz")))
    assert prediction.shape == reference.shape
    dice = _dice(prediction, reference)
    assert np.mean(dice) >= 0.9, dice


def test_training_seeds_leave_the_callers_generators_as_they_were():
    import random

    import numpy as np
    import torch

    from tucker_export.demo.training import _seeded_global_rngs

    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    expected = random.random(), np.random.rand(), torch.rand(1).item()
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    with _seeded_global_rngs(0):
        inside = random.random(), np.random.rand(), torch.rand(1).item()
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    with _seeded_global_rngs(0):
        assert (random.random(), np.random.rand(), torch.rand(1).item()) == inside
