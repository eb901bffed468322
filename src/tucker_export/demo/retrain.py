"""The recipe that rebuilds the shipped head-and-neck model from the OpenKBP data set (``tucker-export demo --retrain``).

Stages, each resumable in its work folder (default ``<cache>/retrain-v<RECIPE_VERSION>``):

1. the raw data set: the training patients that contour every kept structure (:mod:`.openkbp`);
2. nnU-Net's fingerprint and planner, the recipe's plans derived from its 3d_fullres plan, preprocessing,
   and a one-fold split (all but ``NUM_VALIDATION_PATIENTS`` train);
3. training with ``nnUNetTrainer_TuckerHN`` (resumes from ``checkpoint_latest.pth`` after a stop);
4. export: the final checkpoint stripped to what inference reads, weights stored in fp16, with the
   plans, ``dataset.json``, the held-out test patients and a few unlabelled training images that
   ship, the licence notice, and ``recipe_report.json`` (wall times, the machine, the checksum);
5. a Tucker bundle at the demo's rank factor, fine-tuned without labels on ``imagesTr``;
6. ``validate`` on every held-out patient (:func:`record_held_out_evaluation`), which adds the Dice of
   the original model and of the fine-tuned bundle to the report.

Stages 4-5 are written in a staging folder that replaces the model only when complete. nnU-Net's
console goes to ``build.log`` in the work folder.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from tucker_export._io import user_cache_dir, write_json_atomic
from tucker_export.demo import nnunet_run
from tucker_export.demo.openkbp import check_data_dir, default_data_dir, write_raw_dataset
from tucker_export.demo.recipe import (
    _LOG_NAME,
    DATASET_NAME,
    FOLDS,
    NUM_VALIDATION_PATIENTS,
    RECIPE_VERSION,
    model_dir_in,
)
from tucker_export.runtimes import torch_threads

logger = logging.getLogger("tucker_export.demo")

_STATE_NAME = "retrain_state.json"


def default_work_dir() -> Path:
    return user_cache_dir() / f"retrain-v{RECIPE_VERSION}"


def _folders(data_dir: Path | None, work_dir: Path | None) -> tuple[Path, Path]:
    """The checked data set (default: :func:`default_data_dir`) and the work folder (default: the cache)."""
    data = check_data_dir(Path(data_dir) if data_dir is not None else default_data_dir())
    return data, Path(work_dir) if work_dir is not None else default_work_dir()


def _progress_bar(enabled: bool, total: int, stream: Any, desc: str) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", file=stream, dynamic_ncols=True)


class _State:
    """Which stages of a work folder are done, with their wall times; kept in ``retrain_state.json``."""

    def __init__(self, work_dir: Path) -> None:
        self.path = work_dir / _STATE_NAME
        self.data: dict[str, Any] = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def done(self, stage: str) -> bool:
        return stage in self.data.get("stages", {})

    def mark(self, stage: str, seconds: float, **extra: Any) -> None:
        self.data.setdefault("stages", {})[stage] = {"seconds": round(seconds, 1), **extra}
        write_json_atomic(self.path, self.data)


def train_model(work_dir: Path | None = None, data_dir: Path | None = None, *, progress: bool = True) -> Path:
    """Stages 1-3 of the recipe in ``work_dir``; returns the trained nnU-Net model folder."""
    data_dir, work_dir = _folders(data_dir, work_dir)
    raw, preprocessed, results = work_dir / "nnUNet_raw", work_dir / "nnUNet_preprocessed", work_dir / "nnUNet_results"
    for folder in (raw, preprocessed, results):
        folder.mkdir(parents=True, exist_ok=True)
    state = _State(work_dir)
    n_cpu = nnunet_run.available_cpus()
    trainer_cls = nnunet_run.find_trainer_class()
    env = nnunet_run.nnunet_env(raw, preprocessed, results, n_cpu)
    with nnunet_run.console_to(work_dir / _LOG_NAME) as console, nnunet_run.environment(env), torch_threads(n_cpu):
        if not state.done("dataset"):
            started = time.monotonic()
            logger.info("Recipe: writing the raw data set from %s", data_dir)
            import shutil

            shutil.rmtree(raw / DATASET_NAME, ignore_errors=True)
            names = write_raw_dataset(data_dir, raw / DATASET_NAME)
            state.mark("dataset", time.monotonic() - started, patients=names, source=str(data_dir))
        if not state.done("plan"):
            started = time.monotonic()
            logger.info("Recipe: nnU-Net fingerprint, planning and preprocessing")
            summary = nnunet_run.plan(preprocessed, n_cpu)
            nnunet_run.preprocess(n_cpu)
            split = nnunet_run.write_split(preprocessed, state.data["stages"]["dataset"]["patients"],
                                           NUM_VALIDATION_PATIENTS, seed=RECIPE_VERSION)  # fmt: skip
            state.mark("plan", time.monotonic() - started, network=summary, split=split)
        for fold in FOLDS:
            stage = f"train_fold_{fold}"
            if state.done(stage):
                continue
            started = time.monotonic()
            total = trainer_cls.HN_NUM_EPOCHS * trainer_cls.HN_ITERATIONS_PER_EPOCH
            bar = _progress_bar(progress, total, console, f"training fold {fold}")
            resume = (model_dir_in(results) / f"fold_{fold}" / "checkpoint_latest.pth").is_file()

            def resumed_at(epoch: int, bar=bar, fold=fold) -> None:
                logger.info("Recipe: fold %s resumes at epoch %s", fold, epoch)
                if bar is not None:
                    bar.reset(total=(trainer_cls.HN_NUM_EPOCHS - epoch) * trainer_cls.HN_ITERATIONS_PER_EPOCH)

            try:
                trainer = nnunet_run.train_fold(trainer_cls, fold, bar.update if bar else None, resume=resume,
                                                on_resume=resumed_at)  # fmt: skip
            finally:
                if bar is not None:
                    bar.close()
            state.mark(stage, time.monotonic() - started, resumed=resume, bf16_autocast=trainer.use_bf16_autocast,
                       skipped_steps=trainer.skipped_steps,
                       schedule={"epochs": trainer.num_epochs, "iterations_per_epoch": trainer.num_iterations_per_epoch,
                                 "weight_decay": trainer.weight_decay})  # fmt: skip
    return model_dir_in(results)


# ----------------------------------------------------------------------------------------------------------------
# Export: the shipped model folder


def strip_checkpoint(source: Path, target: Path) -> None:
    """What ``nnUNetPredictor`` reads of a checkpoint, with the weights stored in fp16 (they *are* the model).

    Kept: ``network_weights`` (fp16), ``init_args``, ``trainer_name``, ``inference_allowed_mirroring_axes``
    and the epoch; dropped: the optimizer state and the training log. Loading copies the fp16 values into
    the network's fp32 parameters, so stock ``nnUNetv2_predict`` reads the file unchanged.
    """
    import torch

    from tucker_export._io import atomic_path

    checkpoint = torch.load(source, map_location="cpu", weights_only=False)
    # nnU-Net's state dicts alias tensors (``conv``/``all_modules.0``, ``encoder``/``decoder.encoder``); converting
    # each key on its own would store every alias as a copy, so the fp16 tensor is shared the same way.
    converted: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}
    weights = {}
    for key, value in checkpoint["network_weights"].items():
        identity = (value.data_ptr(), tuple(value.shape))
        if identity not in converted:
            converted[identity] = value.half() if value.is_floating_point() else value
        weights[key] = converted[identity]
    stripped = {
        "network_weights": weights,
        "init_args": checkpoint["init_args"],
        "trainer_name": checkpoint["trainer_name"],
        "inference_allowed_mirroring_axes": checkpoint.get("inference_allowed_mirroring_axes"),
        "current_epoch": checkpoint.get("current_epoch"),
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        torch.save(stripped, tmp)


_TRAINING_IMAGES_SHIPPED = 4


def export_model(trained_model_dir: Path, data_dir: Path, out_root: Path, validation_patients: list[str], *,
                 checkpoint_name: str = "checkpoint_final.pth") -> Path:  # fmt: skip
    """Write the shipped layout (see :mod:`.shipped`) into ``out_root``, without its report; returns the model folder."""
    import shutil

    import nibabel as nib

    from tucker_export.demo.openkbp import fully_contoured
    from tucker_export.demo.recipe import NUM_SHIPPED_TEST_PATIENTS

    out_root = Path(out_root)
    model_dir = model_dir_in(out_root / "nnUNet_results")
    model_dir.mkdir(parents=True, exist_ok=True)
    for name in ("plans.json", "dataset.json", "dataset_fingerprint.json"):
        shutil.copyfile(trained_model_dir / name, model_dir / name)
    for fold in FOLDS:
        strip_checkpoint(trained_model_dir / f"fold_{fold}" / checkpoint_name,
                         model_dir / f"fold_{fold}" / "checkpoint_final.pth")  # fmt: skip
    images_ts, labels_ts = out_root / "test" / "imagesTs", out_root / "test" / "labelsTs"
    images_ts.mkdir(parents=True, exist_ok=True)
    labels_ts.mkdir(parents=True, exist_ok=True)
    for count, (patient, labels, image) in enumerate(fully_contoured(data_dir, "Ts")):
        if count == NUM_SHIPPED_TEST_PATIENTS:
            break
        shutil.copyfile(patient.image, images_ts / patient.image.name)
        nib.save(nib.Nifti1Image(labels, image.affine, image.header), str(labels_ts / patient.label.name))
    # Unlabelled training images for finetune: nnU-Net's validation patients, which the network never trained on.
    images_tr = out_root / "imagesTr"
    images_tr.mkdir(exist_ok=True)
    for name in sorted(validation_patients)[:_TRAINING_IMAGES_SHIPPED]:
        shutil.copyfile(data_dir / "imagesTr" / f"{name}_0000.nii.gz", images_tr / f"{name}_0000.nii.gz")
    shutil.copyfile(data_dir / "LICENSE", out_root / "LICENSE-OpenKBP")
    (out_root / "README.md").write_text(_SHIPPED_README, encoding="utf-8")
    return model_dir


_SHIPPED_README = """# The shipped head-and-neck CT model (tucker-export demo)

An nnU-Net v2 `3d_fullres` model (PlainConvUNet, 6 stages, 16-32-64-128-256-320 features, patch 64^3)
segmenting five organs at risk on head-and-neck CT: Brainstem, SpinalCord, RightParotid, LeftParotid,
Mandible. Trained by `tucker-export demo --retrain` (`tucker_export/demo/retrain.py`); what it ran, on
which machine, for how long, its checksum and its held-out Dice are in `recipe_report.json`.
`nnUNet_results/` is a normal nnU-Net model folder: stock `nnUNetv2_predict` loads it with
`nnUNet_results` pointing there and `nnUNet_extTrainer` at `tucker_export/demo/trainers`.
The weights are stored in fp16; that rounded network *is* the model (it runs in fp32).

The CT scans and contours in `test/` and `imagesTr/` (and the data the model was trained on) come from
the OpenKBP grand challenge data set (public repository ababier/open-kbp, `provided-data/`, MIT licence,
in `LICENSE-OpenKBP`); the scans come from The Cancer Imaging Archive. Contours in `test/labelsTs` are
relabelled to the model's values (1 Brainstem, 2 SpinalCord, 3 RightParotid, 4 LeftParotid, 5 Mandible).

Cite: A. Babier et al., "OpenKBP: The open-access knowledge-based planning grand challenge and dataset",
Medical Physics 48(9), 2021.
"""


def write_test_labels(data_dir: Path, labels_out: Path) -> list[str]:
    """Every ``imagesTs`` patient's contours in the model's label values (for ``validate --labels``)."""
    import nibabel as nib

    from tucker_export.demo.openkbp import patients, read_patient, to_model_labels

    labels_out.mkdir(parents=True, exist_ok=True)
    names = []
    for patient in patients(data_dir, "Ts"):
        _, openkbp_labels, image = read_patient(patient)
        nib.save(nib.Nifti1Image(to_model_labels(openkbp_labels), image.affine, image.header),
                 str(labels_out / patient.label.name))
        names.append(patient.name)
    return names


def evaluate_on_test_patients(model_dir: Path, bundle: Path, data_dir: Path, work_dir: Path, *,
                              progress: bool = True) -> dict[str, Any]:  # fmt: skip
    """``validate`` of the fine-tuned Tucker bundle on every ``imagesTs`` patient, against the original model.

    One pass per patient gives the original model against the clinical contours (nnU-Net's prediction
    in PyTorch, the reference side), and the Tucker bundle (ONNX Runtime fp32, so the figure is the
    decomposition's, not an engine's) against the original and against the contours. A structure is
    scored against the contours only in patients whose contours include it.
    """
    import shutil

    from tucker_export.demo.recipe import LABEL_NAMES
    from tucker_export.exporter.onnx_export import export_bundle
    from tucker_export.validation.validate import validate_bundle

    labels = work_dir / "test" / "labelsTs"
    write_test_labels(data_dir, labels)
    exported = work_dir / "validate-bundle"
    shutil.rmtree(exported, ignore_errors=True)
    shutil.copytree(bundle, exported)
    export_bundle(exported, precisions=("fp32",), progress=progress)
    started = time.monotonic()
    report = validate_bundle(exported, data_dir / "imagesTs", labels_dir=labels, backend="ort", precision="fp32",
                             against="original", reference_model=model_dir, use_mirroring=False, parity_tiles=1,
                             only_contoured=True, progress=progress, report_path=work_dir / "validate_test.json")
    summary = report.summary

    def per_structure(key: str) -> dict[str, float]:
        return {LABEL_NAMES[int(label)]: round(value, 4) for label, value in summary[f"{key}_dice_per_class"].items()}

    original = per_structure("reference_vs_truth")
    per_case = {name: {LABEL_NAMES[int(k)]: round(v["dice"], 4) for k, v in case["reference_vs_truth"].items()
                       if v["status"] != "absent"} for name, case in report.cases.items()}
    return {
        "dice_per_structure": original,
        "mean_dice": round(sum(original.values()) / len(original), 4),
        "dice_per_case": per_case,
        "patients": len(report.cases),
        "tucker_finetuned": {"vs_original": per_structure("engine_vs_reference"),
                             "vs_contours": per_structure("engine_vs_truth"),
                             "engine": f"{report.backend} {report.precision}", "failures": report.failures},
        "seconds": round(time.monotonic() - started, 1),
    }


def make_finetuned_bundle(model_root: Path, data_dir: Path, work_dir: Path, *, final_root: Path | None = None,
                          progress: bool = True) -> dict[str, Any]:  # fmt: skip
    """Decompose the exported model at ``DEMO_RANK_FACTOR`` and fine-tune it without labels on ``imagesTr``.

    The bundle (weights and manifest, no ONNX: the demo exports what it runs) goes to
    ``bundles/`` under ``model_root``; returns the fine-tuning record of its fold(s).
    """
    import shutil

    from tucker_export.demo import recipe
    from tucker_export.demo.shipped import finetuned_bundle_dir
    from tucker_export.exporter.decompose import decompose_model
    from tucker_export.exporter.ranks import RankPolicy
    from tucker_export.finetune import FinetuneSettings, finetune_bundle

    model_dir = model_dir_in(Path(model_root) / "nnUNet_results")
    staging = work_dir / f"bundle-rank{recipe.DEMO_RANK_FACTOR}"
    decompose_model(model_dir, staging, policy=RankPolicy(mode="relative", factor=recipe.DEMO_RANK_FACTOR),
                    overwrite=True, progress=progress)  # fmt: skip
    settings = FinetuneSettings(steps=recipe.FINETUNE_STEPS, max_minutes=recipe.FINETUNE_MAX_MINUTES,
                                train_tiles=recipe.FINETUNE_TRAIN_TILES, held_out_tiles=recipe.FINETUNE_HELD_OUT_TILES)
    report = finetune_bundle(staging, data_dir / "imagesTr", settings=settings, progress=progress)
    target = finetuned_bundle_dir(model_root)
    shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(staging, target, ignore=shutil.ignore_patterns("onnx", "engines", "cpu_engines", "*.onnx"))
    # The manifest names the model folder it came from: the model's final place, not the staging folder.
    manifest_path = target / "bundle.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["source"]["model_dir"] = str(model_dir_in(Path(final_root or model_root) / "nnUNet_results"))
    manifest["onnx"] = {}
    write_json_atomic(manifest_path, manifest)
    return report.to_dict() if hasattr(report, "to_dict") else {"folds": str(report)}


def _machine() -> dict[str, Any]:
    from tucker_export.validation.machine import environment as machine_environment

    env = machine_environment()
    return {k: env[k] for k in ("cpu", "cpu_kind", "usable_cpus", "torch_threads", "versions", "platform")}


def write_report(out_root: Path, model_dir: Path, state: dict[str, Any], finetuning: dict[str, Any]) -> dict[str, Any]:
    """``recipe_report.json``: what was trained on what, how long it took where, and the checksum.

    The held-out Dice is added by :func:`record_held_out_evaluation` (``dice_per_structure`` stays empty
    until then).
    """
    from tucker_export._io import sha256_file
    from tucker_export.demo.recipe import (
        CONFIGURATION,
        DATASET_NAME,
        KEPT_STRUCTURES,
        LABEL_NAMES,
        PLANS_NAME,
        TRAINER_NAME,
    )

    stages = state["stages"]
    report = {
        "recipe_version": RECIPE_VERSION,
        "dataset_name": DATASET_NAME,
        "trainer_name": TRAINER_NAME,
        "plans_name": PLANS_NAME,
        "configuration": CONFIGURATION,
        "folds": list(FOLDS),
        "label_names": {str(k): v for k, v in LABEL_NAMES.items()},
        "openkbp_label_values": {name: value for value, name in KEPT_STRUCTURES},
        "dice_per_structure": {},
        "training_patients": len(stages["plan"]["split"]["train"]),
        "validation_patients": stages["plan"]["split"]["val"],
        "network": stages["plan"]["network"],
        "training": {k: v for k, v in stages.items() if k.startswith("train_fold")},
        "wall_time_s": {name: stage["seconds"] for name, stage in stages.items()},
        "machine": state.get("machine") or _machine(),
        "checkpoint_sha256": {
            str(fold): sha256_file(model_dir / f"fold_{fold}" / "checkpoint_final.pth") for fold in FOLDS
        },
        "weights_storage": "fp16 (the shipped model is the fp16-rounded network; it runs in fp32)",
        "finetuned_bundle": {"finetuning": finetuning},
    }
    write_json_atomic(out_root / "recipe_report.json", report)
    return report


def record_held_out_evaluation(model_root: Path, data_dir: Path | None = None, work_dir: Path | None = None, *,
                               progress: bool = True) -> dict[str, Any]:  # fmt: skip
    """Validate the model in ``model_root`` on every held-out patient and add the figures to its report.

    This is the slow part of the recipe (two full predictions per patient), so it is a stage of its own:
    a model is usable, and ships, before it has run.
    """
    from tucker_export.demo.shipped import finetuned_bundle_dir

    data_dir, work_dir = _folders(data_dir, work_dir)
    model_root = Path(model_root)
    model_dir = model_dir_in(model_root / "nnUNet_results")
    evaluation = evaluate_on_test_patients(model_dir, finetuned_bundle_dir(model_root), data_dir, work_dir,
                                           progress=progress)  # fmt: skip
    report_path = model_root / "recipe_report.json"
    report = json.loads(report_path.read_text())
    shipped = sorted(p.name[: -len(".nii.gz")] for p in (model_root / "test" / "labelsTs").glob("*.nii.gz"))
    report.update({
        "dice_per_structure": evaluation["dice_per_structure"],
        "mean_dice": evaluation["mean_dice"],
        "test_patients": evaluation["patients"],
        "dice_per_case": evaluation["dice_per_case"],
        "shipped_test_patients": {name: evaluation["dice_per_case"].get(name) for name in shipped},
    })
    report["finetuned_bundle"]["test_patients"] = evaluation["tucker_finetuned"]
    report["wall_time_s"]["evaluate"] = evaluation["seconds"]
    write_json_atomic(report_path, report)
    return report


def rebuild_demo_model(out_root: Path, *, work_dir: Path | None = None, data_dir: Path | None = None,
                       progress: bool = True, evaluate: bool = True) -> Path:  # fmt: skip
    """The whole recipe: train (or resume) in ``work_dir``, export into ``out_root``, fine-tune, evaluate.

    ``out_root`` is written in a staging folder and swapped in only when complete, so a failure keeps the
    model that was there; the held-out evaluation (``evaluate``) runs on the model in place after.
    Returns ``out_root``.
    """
    from tucker_export._io import staged_folder

    data_dir, work_dir = _folders(data_dir, work_dir)
    trained = train_model(work_dir, data_dir, progress=progress)
    state = _State(work_dir)
    if "machine" not in state.data:
        state.data["machine"] = _machine()
        write_json_atomic(state.path, state.data)
    with staged_folder(out_root) as staging:
        model_dir = export_model(trained, data_dir, staging, state.data["stages"]["plan"]["split"]["val"])
        logger.info("Recipe: decomposing at the demo's rank factor and fine-tuning without labels")
        finetuning = make_finetuned_bundle(staging, data_dir, work_dir, final_root=Path(out_root).resolve(),
                                           progress=progress)  # fmt: skip
        write_report(staging, model_dir, state.data, finetuning)
    if evaluate:
        logger.info("Recipe: validating on the held-out patients of %s", data_dir)
        report = record_held_out_evaluation(out_root, data_dir, work_dir, progress=progress)
        logger.info("Recipe: model written to %s (mean held-out Dice %.3f)", out_root, report["mean_dice"])
    return Path(out_root)
