"""`tucker-export validate`: does the engine still segment like PyTorch?

For each case the engine and a PyTorch reference run on the same preprocessed input:

- logits parity per fold, on sliding-window tiles of the real cases (max, mean, p99 absolute
  difference; NaN/Inf count in the engine's output);
- the full nnU-Net prediction (sliding window, mirroring, fold ensemble, resampling back) of both,
  compared per class (Dice, IoU, NSD at a tolerance in mm with the image's own spacing);
- with ``labels_dir``, both predictions against the ground truth.

The reference is the original nnU-Net model (what the user deploys instead of), or the
decomposed network in PyTorch (``against="decomposed"``), which isolates the engine's own error
from the compression's. Every threshold failure is collected and reported together.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from tucker_export._io import write_json_atomic
from tucker_export.errors import BundleError, ConfigurationError, InputImageError
from tucker_export.exporter.rebuild import build_network
from tucker_export.nnunet.loading import Fold, ModelSpec
from tucker_export.nnunet.predictor import FoldModel, sliding_window_tiles
from tucker_export.runtimes import torch_callable

if TYPE_CHECKING:
    from tucker_export.nnunet.cases import Case
    from tucker_export.nnunet.predictor import EnginePredictor

logger = logging.getLogger(__name__)

Against = Literal["original", "decomposed"]


@dataclass
class FoldParity:
    fold: str
    tiles: int = 0
    max_abs: float = 0.0
    mean_abs: float = 0.0
    p99_abs: float = 0.0
    nonfinite: int = 0
    _sum: float = field(default=0.0, repr=False)
    _count: int = field(default=0, repr=False)
    _p99s: list[float] = field(default_factory=list, repr=False)

    def add(self, engine: torch.Tensor, reference: torch.Tensor) -> None:
        self.nonfinite += int((~torch.isfinite(engine)).sum())
        diff = (engine.float() - reference.float()).abs()
        diff = torch.nan_to_num(diff, nan=float("inf"))
        self.tiles += engine.shape[0]
        self.max_abs = max(self.max_abs, float(diff.max()))
        self._sum += float(diff.double().sum())
        self._count += diff.numel()
        self.mean_abs = self._sum / self._count
        # p99 over all voxels: kept per batch and combined by the maximum, which bounds it from above
        flat = diff.flatten()
        k = max(1, int(round(0.99 * flat.numel())))
        self._p99s.append(float(flat.kthvalue(k).values))
        self.p99_abs = max(self._p99s)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if not k.startswith("_")}


@dataclass
class ValidationReport:
    bundle: str
    backend: str
    backend_reason: str
    precision: str
    against: str
    folds: list[str]
    settings: dict[str, Any]
    parity: dict[str, dict[str, Any]]
    cases: dict[str, dict[str, Any]]
    summary: dict[str, Any]
    failures: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _open_reference(
    stack: contextlib.ExitStack, bundle, against: Against, folds: tuple[Fold, ...], reference_model: Path | None,
    device: torch.device,
) -> dict[Fold, torch.nn.Module]:
    if against == "decomposed":
        return {f: build_network(bundle, f).to(device).eval() for f in folds}
    from tucker_export.nnunet.loading import load_trained_model

    source = Path(reference_model or bundle.source["model_dir"])
    if not source.is_dir():
        raise BundleError(
            f"The original model folder {source} recorded in the bundle is not here: give the model folder, "
            f"or compare against the decomposed network",
            option="reference_model",
        )
    loaded = load_trained_model(source, list(folds), checkpoint_name=bundle.source.get("checkpoint_name")
                                or "checkpoint_final.pth")
    return {f: n.to(device).eval() for f, n in loaded.networks.items()}


def _segmentation(predictor, spec: ModelSpec, logits: torch.Tensor, properties: dict) -> np.ndarray:
    from nnunetv2.inference.export_prediction import (
        convert_predicted_logits_to_segmentation_with_correct_shape,
    )

    return convert_predicted_logits_to_segmentation_with_correct_shape(
        logits, spec.plans_manager, spec.configuration_manager, spec.label_manager, properties
    )


def _read_labels(labels_dir: Path, case: str, file_ending: str) -> np.ndarray | None:
    from tucker_export.validation.metrics import read_label_map

    path = labels_dir / f"{case}{file_ending}"
    return read_label_map(path) if path.is_file() else None


@dataclass(frozen=True)
class _CaseChecks:
    """What every case is compared with and checked against."""

    spec: ModelSpec
    folds: tuple[Fold, ...]
    foreground: list[int]
    file_ending: str
    labels_dir: Path | None
    min_dice: float | None
    nsd_tolerance_mm: float
    parity_tiles: int
    device: torch.device
    only_contoured: bool = False


@dataclass
class _Sides:
    """The engine and the PyTorch reference, per fold and as full nnU-Net predictors."""

    engine_models: dict[Fold, FoldModel]
    reference_models: dict[Fold, FoldModel]
    predictors: dict[str, EnginePredictor]  # "engine" and "reference"
    backend_name: str
    backend_reason: str
    precision: str  # with `auto` resolved


def validate_bundle(
    bundle_path: str | Path,
    input_path: str | Path,
    *,
    labels_dir: str | Path | None = None,
    backend: str = "auto",
    precision: str = "fp32",
    against: Against = "original",
    reference_model: str | Path | None = None,
    folds: list[Fold] | None = None,
    min_dice: float | None = None,
    max_abs_logit: float | None = None,
    report_path: str | Path | None = None,
    step_size: float = 0.5,
    use_mirroring: bool = True,
    batch_size: int = 1,
    device: str = "cpu",
    nsd_tolerance_mm: float = 2.0,
    parity_tiles: int = 4,
    progress: bool = True,
    only_contoured: bool = False,
) -> ValidationReport:
    """Compare the engine with PyTorch on the cases under ``input_path``; see the module docstring.

    ``only_contoured``: a structure is scored against ``labels_dir`` only in cases whose label map
    contains it. Clinical contours leave out what a case's planner did not need, and a structure left
    out is unknown there, not background.
    """
    from tqdm import tqdm

    from tucker_export.bundle import Bundle
    from tucker_export.inference import parse_device
    from tucker_export.nnunet.cases import discover_cases

    labels_dir = _checked_options(against, min_dice, max_abs_logit, labels_dir)
    torch_device = parse_device(device)
    bundle = Bundle.load(bundle_path)
    spec = bundle.spec
    selected = bundle.resolve_folds(folds)
    file_ending = spec.dataset_json["file_ending"]
    cases = discover_cases(input_path, num_channels=spec.num_input_channels, file_ending=file_ending)
    checks = _CaseChecks(spec, selected, [label for label in spec.label_names if label != 0], file_ending,
                         labels_dir, min_dice, nsd_tolerance_mm, parity_tiles, torch_device, only_contoured)

    failures: list[str] = []
    parity = {str(f): FoldParity(str(f)) for f in selected}
    case_reports: dict[str, dict[str, Any]] = {}
    with contextlib.ExitStack() as stack:
        sides = _open_sides(stack, bundle, checks, backend=backend, precision=precision, against=against,
                            reference_model=reference_model, tile_source=input_path, step_size=step_size,
                            use_mirroring=use_mirroring, batch_size=batch_size)
        for case in tqdm(cases, desc="validating", unit="case", disable=not progress):
            report = _validate_case(case, sides, checks, parity, failures)
            if report is not None:
                case_reports[case.name] = report

    failures.extend(_parity_failures(parity, max_abs_logit))
    summary = _overall_summary(case_reports)
    result = ValidationReport(
        bundle=str(bundle.path), backend=sides.backend_name, backend_reason=sides.backend_reason,
        precision=sides.precision, against=against,
        folds=[str(f) for f in selected],
        settings={"step_size": step_size, "mirroring": use_mirroring, "batch_size": batch_size, "device": str(device),
                  "nsd_tolerance_mm": nsd_tolerance_mm, "parity_tiles": parity_tiles, "min_dice": min_dice,
                  "max_abs_logit": max_abs_logit, "labels_dir": str(labels_dir) if labels_dir else None,
                  "only_contoured": only_contoured},
        parity={k: v.to_dict() for k, v in parity.items()},
        cases=case_reports,
        summary=summary,
        failures=failures,
    )
    if report_path is not None:
        write_json_atomic(report_path, result.to_dict())
    return result


def _checked_options(
    against: str, min_dice: float | None, max_abs_logit: float | None, labels_dir: str | Path | None
) -> Path | None:
    """Refuse bad options before any work; returns the labels folder as a path."""
    if against not in ("original", "decomposed"):
        raise ConfigurationError(f"The reference must be 'original' or 'decomposed', got {against!r}.", option="against")
    if min_dice is not None and min_dice < 0:
        raise ConfigurationError(f"The Dice bar must be >= 0, got {min_dice}.", option="min_dice")
    if max_abs_logit is not None and max_abs_logit < 0:
        raise ConfigurationError(f"The logit bar must be >= 0, got {max_abs_logit}.", option="max_abs_logit")
    labels = Path(labels_dir) if labels_dir is not None else None
    if labels is not None and not labels.is_dir():
        raise InputImageError(f"Labels folder {labels} does not exist.")
    return labels


def _open_sides(
    stack: contextlib.ExitStack, bundle, checks: _CaseChecks, *, backend: str, precision: str, against: Against,
    reference_model: str | Path | None, tile_source: str | Path, step_size: float, use_mirroring: bool,
    batch_size: int,
) -> _Sides:
    """Open the engine's runners and the reference networks on ``stack``, and a predictor for each."""
    from tucker_export.engines.selection import open_runners
    from tucker_export.inference import runner_fold_model
    from tucker_export.nnunet.predictor import EnginePredictor

    device = checks.device
    runners, backend_name, reason = open_runners(
        stack, bundle, backend=backend, precision=precision, folds=checks.folds, device=device,
        tile_source=tile_source,
    )
    precision = next(iter(runners.values())).precision if runners else precision  # `auto` resolved
    engine_models = {f: runner_fold_model(r, device) for f, r in runners.items()}
    reference_models = {f: torch_callable(n) for f, n in
                        _open_reference(stack, bundle, against, checks.folds, reference_model, device).items()}
    predictors = {}
    for name, models in (("engine", engine_models), ("reference", reference_models)):
        predictor = EnginePredictor(tile_step_size=step_size, use_mirroring=use_mirroring,
                                    batch_size=batch_size, device=device, allow_tqdm=False)
        predictor.initialize(checks.spec, models)
        predictors[name] = predictor
    return _Sides(engine_models, reference_models, predictors, backend_name, reason, precision)


def _validate_case(
    case: Case, sides: _Sides, checks: _CaseChecks, parity: dict[str, FoldParity], failures: list[str]
) -> dict[str, Any] | None:
    """One case's parity (added to ``parity``) and metrics report; None when its scan cannot be read."""
    from tucker_export.errors import BrokenScanError
    from tucker_export.nnunet.reading import preprocess_case
    from tucker_export.validation.metrics import compute_class_metrics, summarize

    spec = checks.spec
    try:
        prepared = preprocess_case(case, spec)
    except BrokenScanError as error:
        failures.append(f"case {case.name}: {error}")
        return None
    data, properties = prepared.data, prepared.properties
    data_tensor = torch.from_numpy(data)
    tiles = sliding_window_tiles(sides.predictors["engine"], data_tensor, checks.parity_tiles).to(checks.device)
    for fold in checks.folds:
        engine_out = torch.cat([sides.engine_models[fold](t[None]) for t in tiles])
        reference_out = torch.cat([sides.reference_models[fold](t[None]) for t in tiles])
        parity[str(fold)].add(engine_out.cpu(), reference_out.cpu())
    segs = {}
    for name, predictor in sides.predictors.items():
        logits = predictor.predict_logits_from_preprocessed_data(data_tensor).cpu()
        segs[name] = _segmentation(predictor, spec, logits, properties)
    spacing = [float(s) for s in properties["spacing"]]
    versus_reference = compute_class_metrics(segs["engine"], segs["reference"], checks.foreground, spacing,
                                             nsd_tolerance_mm=checks.nsd_tolerance_mm)
    report: dict[str, Any] = {
        "spacing": spacing,
        "engine_vs_reference": {str(k): v.to_dict() for k, v in versus_reference.items()},
        "engine_vs_reference_summary": summarize(versus_reference),
    }
    for label, metrics in versus_reference.items():
        if checks.min_dice is not None and metrics.status != "absent" and (metrics.dice or 0.0) < checks.min_dice:
            failures.append(
                f"case {case.name}, class {label} ({spec.label_names[label]}): Dice engine vs reference "
                f"{metrics.dice:.4f} < {checks.min_dice} ({metrics.status})"
            )
    _compare_with_truth(case, segs, spacing, checks, report, failures)
    return report


def _compare_with_truth(
    case: Case, segs: dict[str, np.ndarray], spacing: list[float], checks: _CaseChecks, report: dict[str, Any],
    failures: list[str],
) -> None:
    """With a labels folder: both predictions against the case's ground truth, added to ``report``."""
    from tucker_export.validation.metrics import compute_class_metrics, summarize

    labels_dir = checks.labels_dir
    truth = _read_labels(labels_dir, case.name, checks.file_ending) if labels_dir is not None else None
    if labels_dir is not None and truth is None:
        failures.append(f"case {case.name}: no reference label file {case.name}{checks.file_ending} in {labels_dir}")
    elif truth is not None:
        scored = checks.foreground
        if checks.only_contoured:
            present = set(np.unique(truth).tolist())
            scored = [label for label in scored if label in present]
        for name in ("engine", "reference"):
            versus_truth = compute_class_metrics(segs[name], truth, scored, spacing,
                                                 nsd_tolerance_mm=checks.nsd_tolerance_mm)
            report[f"{name}_vs_truth"] = {str(k): v.to_dict() for k, v in versus_truth.items()}
            report[f"{name}_vs_truth_summary"] = summarize(versus_truth)


def _parity_failures(parity: dict[str, FoldParity], max_abs_logit: float | None) -> list[str]:
    failures = []
    for fold_parity in parity.values():
        if fold_parity.nonfinite:
            failures.append(f"fold {fold_parity.fold}: {fold_parity.nonfinite} NaN/Inf logits from the engine")
        if max_abs_logit is not None and fold_parity.max_abs > max_abs_logit:
            failures.append(
                f"fold {fold_parity.fold}: max abs logit difference {fold_parity.max_abs:.3g} > {max_abs_logit}"
            )
    return failures


def _overall_summary(case_reports: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Mean Dice per comparison over cases (each case's mean over its counted classes)."""
    summary: dict[str, Any] = {"cases": len(case_reports)}
    for key in ("engine_vs_reference", "engine_vs_truth", "reference_vs_truth"):
        values = [r[f"{key}_summary"]["mean_dice"] for r in case_reports.values()
                  if f"{key}_summary" in r and r[f"{key}_summary"]["mean_dice"] is not None]
        if values:
            summary[f"{key}_mean_dice"] = float(np.mean(values))
            summary[f"{key}_min_case_dice"] = float(np.min(values))
        per_class: dict[str, list[float]] = {}
        for r in case_reports.values():
            for label, metrics in r.get(key, {}).items():
                if metrics["status"] != "absent" and metrics["dice"] is not None:
                    per_class.setdefault(label, []).append(metrics["dice"])
        if per_class:
            # Per class over the cases that count it: the figure a per-structure table reports.
            summary[f"{key}_dice_per_class"] = {label: float(np.mean(v)) for label, v in sorted(per_class.items())}
    return summary


def format_validation_report(report: ValidationReport, label_names: dict[int, str] | None = None) -> str:
    lines = [f"backend {report.backend} ({report.precision}) vs PyTorch {report.against}: {report.backend_reason}", ""]
    lines.append(f"{'fold':<6}{'tiles':>6}{'max |d|':>12}{'mean |d|':>12}{'p99 |d|':>12}{'NaN/Inf':>9}")
    for fold, p in report.parity.items():
        lines.append(f"{fold:<6}{p['tiles']:>6}{p['max_abs']:>12.3g}{p['mean_abs']:>12.3g}{p['p99_abs']:>12.3g}"
                     f"{p['nonfinite']:>9}")
    lines.append("")
    lines.append(f"{'case':<24}{'Dice vs ref':>12}{'min class':>11}{'Dice vs GT':>12}{'ref vs GT':>11}")
    for name, case in report.cases.items():
        per_class = [m["dice"] for m in case["engine_vs_reference"].values() if m["status"] != "absent"]
        ev = case["engine_vs_reference_summary"]["mean_dice"]
        egt = case.get("engine_vs_truth_summary", {}).get("mean_dice")
        rgt = case.get("reference_vs_truth_summary", {}).get("mean_dice")

        def fmt(value):
            return f"{value:.4f}" if value is not None else "-"

        lines.append(f"{name[:23]:<24}{fmt(ev):>12}{fmt(min(per_class) if per_class else None):>11}"
                     f"{fmt(egt):>12}{fmt(rgt):>11}")
    lines.append("")
    lines.append("mean: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                       for k, v in report.summary.items() if not isinstance(v, dict)))
    for key, per_class in report.summary.items():
        if isinstance(per_class, dict):
            names = label_names or {}
            lines.append(f"{key}: " + ", ".join(f"{names.get(int(label), label)} {dice:.4f}"
                                                for label, dice in per_class.items()))
    if report.failures:
        lines.append(f"FAILED ({len(report.failures)} check(s)):")
        lines.extend(f"  - {failure}" for failure in report.failures)
    else:
        lines.append("PASSED")
    return "\n".join(lines)
