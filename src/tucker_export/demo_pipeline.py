"""`tucker-export demo`: the whole pipeline on the shipped head-and-neck CT model, with a short report.

decompose (rank factor ``RANK_FACTOR``) -> export ONNX fp32 -> compile and gate the CPU engine `auto`
picks -> segment the shipped held-out patients -> compare with the original model in PyTorch (speed,
Dice per structure) and with the clinical contours. The fine-tuned Tucker bundle that ships beside
the model (``finetune`` on unlabelled training images, minutes of work) is run too, so the report
shows what label-free fine-tuning wins back without spending those minutes in the demo.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tucker_export.bundle import Bundle
from tucker_export.demo import DemoModel
from tucker_export.demo.recipe import DEMO_RANK_FACTOR as RANK_FACTOR
from tucker_export.demo.shipped import finetuned_bundle_dir

logger = logging.getLogger(__name__)


@dataclass
class DemoReport:
    model_dir: Path
    bundle_dir: Path
    tucker_output_dir: Path
    params_ratio: float
    macs_ratio: float
    onnx_max_abs_diff: float
    cases: int
    seconds_original_torch: float
    seconds_tucker_ort: float  # the Tucker run through `auto` (named for the report's first version)
    dice_tucker_vs_original: dict[str, float]
    dice_tucker_vs_reference: dict[str, float]
    dice_original_vs_reference: dict[str, float]
    tucker_engine: str = "onnxruntime fp32"
    seconds_engine_build: float = 0.0
    network_seconds_original: float = 0.0
    network_seconds_tucker: float = 0.0
    machine_load: str = ""  # the load while the timings were taken: they mean little on a busy machine
    #: The shipped fine-tuned bundle's rows (empty when none ships for this model), and why not when absent.
    dice_finetuned_vs_original: dict[str, float] = field(default_factory=dict)
    dice_finetuned_vs_reference: dict[str, float] = field(default_factory=dict)
    finetuned_note: str = ""

    @property
    def speedup(self) -> float:
        return self.seconds_original_torch / self.seconds_tucker_ort if self.seconds_tucker_ort else float("nan")


def _dice_per_structure(pred_dir: Path, ref_dir: Path, label_names: dict[int, str], *,
                        only_contoured: bool) -> dict[str, float]:  # fmt: skip
    """Mean Dice per structure over the cases.

    ``only_contoured``: a structure is scored only in cases whose reference contains it (clinical
    contours leave out what the planner did not need); otherwise only a structure absent from both
    maps of a case is left out there.
    """
    from tucker_export.validation.metrics import label_dice, read_label_map

    scores: dict[str, list[float]] = {}
    labels = [label for label in label_names if label != 0]
    for ref_path in sorted(ref_dir.glob("*.nii.gz")):
        reference = read_label_map(ref_path)
        present = set(np.unique(reference).tolist())
        dice = label_dice(read_label_map(pred_dir / ref_path.name), reference, labels)
        for label, score in dice.items():
            if not math.isnan(score) and (label in present or not only_contoured):
                scores.setdefault(label_names[label], []).append(score)
    return {name: float(np.mean(values)) for name, values in scores.items()}


def run_demo_pipeline(model: DemoModel, *, work_dir: Path | None = None, progress: bool = True) -> DemoReport:
    """Run decompose, export, infer and the comparisons on the demo model; outputs go to ``work_dir``."""
    from tucker_export._io import user_cache_dir
    from tucker_export.exporter.ranks import RankPolicy
    from tucker_export.inference import run_inference
    from tucker_export.pipeline import prepare_bundle
    from tucker_export.validation.machine import MachineWatch, describe_verdict

    watch = MachineWatch()
    work_dir = Path(work_dir) if work_dir is not None else user_cache_dir() / "demo-pipeline"
    bundle_dir = work_dir / f"bundle-rank{RANK_FACTOR}"
    logger.info("Decomposing %s at rank factor %s into %s, exporting ONNX (fp32) and checking it against PyTorch",
                model.model_dir, RANK_FACTOR, bundle_dir)
    prepared = prepare_bundle(model.model_dir, bundle_dir, policy=RankPolicy(mode="relative", factor=RANK_FACTOR),
                              precisions=("fp32",), progress=progress)
    bundle, records = prepared.bundle, prepared.exports

    tucker_dir = work_dir / "segmentations-tucker"
    original_dir = work_dir / "segmentations-original-torch"
    # What `infer` would do on first use (compile + gate the CPU engine), done and timed apart, so the
    # segmentation timing below is the steady state a user sees from the second run on.
    from tucker_export.engines.selection import select_backend

    start = time.perf_counter()
    factory, _ = select_backend("auto", bundle, "auto", "cpu", tile_source=model.test_images_dir)
    seconds_engine = time.perf_counter() - start
    logger.info("Segmenting %s with the Tucker model through `auto` (%s %s)", model.test_images_dir,
                factory.backend, factory.precision)
    start = time.perf_counter()
    tucker = run_inference(model.test_images_dir, tucker_dir, bundle_path=bundle_dir, backend="auto", overwrite=True,
                           progress=progress)
    seconds_tucker = time.perf_counter() - start
    logger.info("Segmenting the same cases with the original model in PyTorch, for comparison")
    start = time.perf_counter()
    original = run_inference(model.test_images_dir, original_dir, model_dir=model.model_dir, backend="torch",
                             overwrite=True, progress=progress)
    seconds_original = time.perf_counter() - start

    names = model.label_names
    params_ratio, macs_ratio = _totals(bundle)
    report = DemoReport(
        model_dir=model.model_dir,
        bundle_dir=bundle_dir,
        tucker_output_dir=tucker_dir,
        params_ratio=params_ratio,
        macs_ratio=macs_ratio,
        onnx_max_abs_diff=max((float(r.parity.max_abs_diff) for r in records), default=float("nan")),
        cases=len(original.results),
        seconds_original_torch=seconds_original,
        seconds_tucker_ort=seconds_tucker,
        dice_tucker_vs_original=_dice_per_structure(tucker_dir, original_dir, names, only_contoured=False),
        dice_tucker_vs_reference=_dice_per_structure(tucker_dir, model.test_labels_dir, names, only_contoured=True),
        dice_original_vs_reference=_dice_per_structure(original_dir, model.test_labels_dir, names,
                                                       only_contoured=True),
        tucker_engine=f"{tucker.backend} {tucker.precision}",
        seconds_engine_build=seconds_engine,
        network_seconds_original=_network_seconds(original),
        network_seconds_tucker=_network_seconds(tucker),
    )
    _run_finetuned(model, work_dir, original_dir, report, progress)
    report.machine_load = describe_verdict(watch.verdict())
    return report


def _run_finetuned(model: DemoModel, work_dir: Path, original_dir: Path, report: DemoReport, progress: bool) -> None:
    """Segment with the shipped fine-tuned bundle and score it.

    The bundle ships as weights only; it is copied into ``work_dir`` and exported there (the package
    folder stays untouched), then run through ONNX Runtime fp32 (no second engine compile).
    """
    import shutil

    from tucker_export.bundle import model_checksum
    from tucker_export.errors import TuckerExportError
    from tucker_export.exporter.onnx_export import export_bundle
    from tucker_export.inference import run_inference

    shipped = finetuned_bundle_dir(model.root)
    if not (shipped / "bundle.json").is_file():
        report.finetuned_note = f"no fine-tuned bundle ships with this model ({shipped})"
        return
    checkpoints = [model.model_dir / f"fold_{f}" / "checkpoint_final.pth" for f in model.folds]
    if Bundle.load(shipped).source.get("checksum") != model_checksum(model.model_dir, checkpoints):
        report.finetuned_note = "the shipped fine-tuned bundle was made from another model (retrained?)"
        return
    path = work_dir / "bundle-finetuned"
    try:
        shutil.rmtree(path, ignore_errors=True)
        shutil.copytree(shipped, path)
        export_bundle(path, precisions=("fp32",), progress=progress)
        out = work_dir / "segmentations-tucker-finetuned"
        run_inference(model.test_images_dir, out, bundle_path=path, backend="ort", precision="fp32", overwrite=True,
                      progress=progress)
    except TuckerExportError as exc:
        report.finetuned_note = f"the shipped fine-tuned bundle could not run ({exc})"
        return
    names = model.label_names
    report.dice_finetuned_vs_original = _dice_per_structure(out, original_dir, names, only_contoured=False)
    report.dice_finetuned_vs_reference = _dice_per_structure(out, model.test_labels_dir, names, only_contoured=True)


def _network_seconds(report) -> float:
    return float(sum(r.seconds.get("network", 0.0) for r in report.results))


def _totals(bundle: Bundle) -> tuple[float, float]:
    """Whole-network params and MACs after/before of the first fold."""
    totals = bundle.fold_totals(bundle.folds[0])
    return (
        totals["params_after"] / totals["params_before"],
        totals["macs_after"] / totals["macs_before"],
    )


def format_demo_report(report: DemoReport) -> str:
    names = list(report.dice_original_vs_reference)
    lines = [
        f"demo model      {report.model_dir}",
        f"bundle          {report.bundle_dir}",
        f"segmentations   {report.tucker_output_dir}",
        "",
        f"Tucker rank factor {RANK_FACTOR}: params x{report.params_ratio:.2f}, MACs x{report.macs_ratio:.2f} of the original",
        f"ONNX fp32 vs PyTorch: max abs logit difference {report.onnx_max_abs_diff:.2e}",
        f"CPU engine: {report.tucker_engine}, compiled and gated against PyTorch in {report.seconds_engine_build:.1f} s "
        "(once per CPU kind; `infer` does this on first use)",
        f"{report.cases} held-out patients: original in PyTorch {report.seconds_original_torch:.1f} s (network "
        f"{report.network_seconds_original:.1f} s), Tucker in {report.tucker_engine} {report.seconds_tucker_ort:.1f} s "
        f"(network {report.network_seconds_tucker:.1f} s): {report.speedup:.2f}x",
        *([f"machine: {report.machine_load}"] if report.machine_load else []),
        "",
        "Dice per structure (vs contours: only where the clinical contours include the structure)",
    ]
    columns = [("original vs contours", report.dice_original_vs_reference),
               ("Tucker vs contours", report.dice_tucker_vs_reference),
               ("Tucker vs original", report.dice_tucker_vs_original)]
    if report.dice_finetuned_vs_reference:
        columns += [("fine-tuned vs contours", report.dice_finetuned_vs_reference),
                    ("fine-tuned vs original", report.dice_finetuned_vs_original)]
    width = max(len(title) for title, _ in columns) + 2
    lines.append(f"{'structure':<14}" + "".join(f"{title:>{width}}" for title, _ in columns))
    for name in names:
        lines.append(f"{name:<14}" + "".join(f"{values.get(name, float('nan')):>{width}.4f}" for _, values in columns))
    def mean(values: dict[str, float]) -> float:
        scores = [values[n] for n in names if n in values]
        return float(np.mean(scores)) if scores else float("nan")

    lines.append(f"{'mean':<14}" + "".join(f"{mean(values):>{width}.4f}" for _, values in columns))
    if report.finetuned_note:
        lines.append(f"(fine-tuned Tucker: {report.finetuned_note})")
    return "\n".join(lines)
