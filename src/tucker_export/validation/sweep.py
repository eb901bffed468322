"""`tucker-export bench --sweep-rank-factor`: the compression / speed / accuracy trade-off of a model.

``sweep_rank_factors(model_dir, factors, ...)``: decompose the model at each rank factor (relative
policy), export, time the network, segment the images, and compare every segmentation per
structure with the original model's (run through the same engine path from a rank-mode ``none``
bundle, so the comparison is engine to engine) and with ground truth labels if given.
``plot_sweep`` (:mod:`tucker_export.validation.sweep_report`) draws the trade-off (speed-up vs Dice
per structure; MACs kept vs Dice).

The sweep times its rows *interleaved* (round-robin, rotating the order each round): on a shared
machine the load drifts, and timing one row after the other would turn that drift into a false
speed-up. ``interleave=False`` times one row at a time (less memory: one session open). Its
segmentation runs are interleaved the same way, case by case, after one untimed case.
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tucker_export._io import write_json_atomic
from tucker_export.bundle import onnx_key
from tucker_export.errors import ConfigurationError, InputImageError, ModelFolderError
from tucker_export.validation.bench import (
    EndToEnd,
    _end_to_end_summary,
    _file_size,
    compute_figures,
    end_to_end,
)
from tucker_export.validation.bench_common import DEFAULT_SEED, _check_counts, parse_batch_sizes
from tucker_export.validation.machine import MachineWatch, environment
from tucker_export.validation.sweep_report import SweepReport, SweepRow, plot_sweep
from tucker_export.validation.timing import LatencyStats, interleaved_latency

if TYPE_CHECKING:
    import torch

    from tucker_export.bundle import Bundle
    from tucker_export.nnunet.loading import Fold

logger = logging.getLogger(__name__)

SWEEP_FACTORS: tuple[float, ...] = (0.9, 0.7, 0.5, 0.3, 0.2, 0.1)
BASELINE_LABEL = "original"


def parse_rank_factors(value: str | Sequence[float]) -> tuple[float, ...]:
    """``"0.9,0.7,0.5"`` -> ``(0.9, 0.7, 0.5)``; each factor must lie in (0, 1]; duplicates dropped."""
    parts: list[Any] = value.replace(",", " ").split() if isinstance(value, str) else list(value)
    factors: list[float] = []
    for part in parts:
        try:
            factor = float(part)
        except (TypeError, ValueError):
            raise ConfigurationError(
                f"Rank factor {part!r} is not a number (e.g. 0.9,0.7,0.5).", option="rank_factors"
            ) from None
        if not (math.isfinite(factor) and 0 < factor <= 1):
            raise ConfigurationError(f"Rank factors must lie in (0, 1], got {part}.")
        if factor not in factors:
            factors.append(factor)
    if not factors:
        raise ConfigurationError("At least one rank factor is needed (e.g. 0.9,0.7,0.5).", option="rank_factors")
    return tuple(factors)


def _read_label_map(path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path))
    # metrics take the spacing in array axis order; SimpleITK's GetSpacing is x, y, z
    return sitk.GetArrayFromImage(image), tuple(reversed(image.GetSpacing()))


def _compare(
    prediction: np.ndarray, reference: np.ndarray, spacing: Sequence[float], labels: Sequence[int],
    names: Mapping[int, str], nsd_tolerance_mm: float,
) -> dict[str, dict[str, Any]]:
    from tucker_export.validation.metrics import compute_class_metrics

    metrics = compute_class_metrics(prediction, reference, list(labels), spacing, nsd_tolerance_mm=nsd_tolerance_mm)
    return {names[label]: {"dice": m.dice, "nsd": m.nsd, "status": m.status} for label, m in metrics.items()}


def _mean_over_cases(per_case: Mapping[str, Mapping[str, Any]], key: str, metric: str,
                     structures: Sequence[str]) -> dict[str, float | None]:
    means: dict[str, float | None] = {}
    for name in structures:
        values = [case[key][name][metric] for case in per_case.values()
                  if key in case and case[key][name]["status"] != "absent"]
        means[name] = float(np.mean(values)) if values else None
    return means


def _slug(factor: float | None) -> str:
    return BASELINE_LABEL if factor is None else f"rank-{factor:g}"


@dataclass(frozen=True)
class _SweepOptions:
    """Every option of one sweep, checked and normalized: what ``sweep_rank_factors`` runs with."""

    model_dir: Path
    factors: tuple[float, ...]
    work_dir: Path
    images_dir: Path
    labels_dir: Path | None
    backend: str
    precision: str
    selected: tuple[Fold, ...]
    use_mirroring: bool
    step_size: float
    inference_batch_size: int
    case_repeats: int
    device: str
    torch_device: torch.device
    sizes_to_time: tuple[int, ...]
    warmup: int
    repeats: int
    interleave: bool
    round_to: int
    nsd_tolerance_mm: float
    seed: int
    title: str | None
    progress: bool
    trust_checkpoint: bool


def sweep_rank_factors(
    model_dir: str | Path,
    factors: Sequence[float] = SWEEP_FACTORS,
    *,
    work_dir: str | Path,
    images_dir: str | Path,
    labels_dir: str | Path | None = None,
    backend: str = "ort",
    precision: str = "fp32",
    folds: Sequence[Fold] | None = None,
    use_mirroring: bool = False,
    step_size: float = 0.5,
    inference_batch_size: int = 1,
    case_repeats: int = 1,
    device: str = "cpu",
    batch_sizes: Sequence[int] = (1,),
    warmup: int = 2,
    repeats: int = 10,
    interleave: bool = True,
    round_to: int = 8,
    nsd_tolerance_mm: float = 2.0,
    seed: int = DEFAULT_SEED,
    json_path: str | Path | None = None,
    plot_path: str | Path | None = None,
    title: str | None = None,
    progress: bool = True,
    trust_checkpoint: bool = False,
) -> SweepReport:
    """The compression / speed / accuracy trade-off of ``model_dir`` over rank ``factors``.

    For the original (a rank-mode ``none`` bundle) and each factor (relative policy, ranks rounded
    up to ``round_to``): decompose into ``work_dir/bundles``, export ONNX (``ort``, ``trt``) and
    build engines (``trt``), time the network (first fold, ``batch_sizes``; rows interleaved unless
    ``interleave=False``), segment ``images_dir`` into ``work_dir/segmentations`` through the same
    backend (case by case, every row per case in rotating order), and compare per structure with the original's segmentations (and ``labels_dir``'s
    ``<case>.nii.gz`` when given). ``case_repeats`` > 1 segments every case that many times per row
    and keeps the median seconds of each stage (end-to-end times on a loaded machine vary by tens of
    percent from run to run). TTA is off by default (``use_mirroring``): it multiplies every
    row's inference time by up to 8 in 3D and changes no row more than another.

    Writes ``json_path`` and ``plot_path`` (PNG) when given. Raises before any work when an option
    cannot be honoured (unknown backend, missing folder, TensorRT without a GPU).
    """
    # ---- check everything before the first long step (the order decides which error a user sees first)
    chosen_factors = parse_rank_factors(factors)
    _check_counts(warmup, repeats)
    _check_case_repeats(case_repeats)
    sizes_to_time = parse_batch_sizes(batch_sizes)
    backend, precision, torch_device = _sweep_engine(backend, precision, device)
    model_path, selected = _sweep_model_folds(model_dir, folds)
    images_path, labels_path = _sweep_input_folders(images_dir, labels_dir)
    options = _SweepOptions(
        model_dir=model_path, factors=chosen_factors, work_dir=Path(work_dir), images_dir=images_path,
        labels_dir=labels_path, backend=backend, precision=precision, selected=selected,
        use_mirroring=use_mirroring, step_size=step_size, inference_batch_size=inference_batch_size,
        case_repeats=case_repeats, device=device, torch_device=torch_device, sizes_to_time=sizes_to_time,
        warmup=warmup, repeats=repeats, interleave=interleave, round_to=round_to,
        nsd_tolerance_mm=nsd_tolerance_mm, seed=seed, title=title, progress=progress,
        trust_checkpoint=trust_checkpoint,
    )
    report = _run_sweep(options)
    if json_path is not None:
        write_json_atomic(json_path, report.to_dict())
    if plot_path is not None:
        plot_sweep(report, plot_path, title=title)
    return report


def _check_case_repeats(case_repeats: int) -> None:
    # bool is an int subclass: True would silently mean one repeat.
    if isinstance(case_repeats, bool) or not isinstance(case_repeats, int) or case_repeats < 1:
        raise ConfigurationError(
            f"The case repeats must be an integer >= 1, got {case_repeats!r}.", option="case_repeats"
        )


def _sweep_engine(backend: str, precision: str, device: str) -> tuple[str, str, torch.device]:
    """The one named backend and precision the sweep compares every row with, and the torch device.

    TensorRT is checked here, before any decomposition: without it (or a GPU) the sweep could not finish.
    """
    from tucker_export.engines.selection import normalize_backend
    from tucker_export.exporter.onnx_export import normalize_precisions
    from tucker_export.inference import parse_device

    backend = normalize_backend(backend)
    if backend == "auto":
        raise ConfigurationError("A sweep compares one named backend; choose torch, ort or trt (not auto).")
    chosen_precisions = normalize_precisions(precision)
    if len(chosen_precisions) != 1:
        raise ConfigurationError(f"A sweep runs one precision, got {', '.join(chosen_precisions)}.")
    precision = chosen_precisions[0]
    if backend == "torch" and precision == "fp16" and not device.startswith("cuda"):
        raise ConfigurationError("PyTorch fp16 is autocast on CUDA only; sweep torch at fp32 on the CPU, or use ort fp16.")
    torch_device = parse_device(device)
    if backend == "trt":
        from tucker_export.engines.build import require_tensorrt_and_cuda

        require_tensorrt_and_cuda()
    return backend, precision, torch_device


def _sweep_model_folds(model_dir: str | Path, folds: Sequence[Fold] | None) -> tuple[Path, tuple[Fold, ...]]:
    """The model folder and the folds to sweep (``None``: every fold with a checkpoint)."""
    from tucker_export.nnunet.loading import available_folds, parse_fold

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelFolderError(f"Model folder {model_dir} does not exist.")
    model_folds = available_folds(model_dir)
    selected = tuple(parse_fold(f) for f in folds) if folds else model_folds
    missing = [f for f in selected if f not in model_folds]
    if missing or not selected:
        raise ConfigurationError(
            f"Model {model_dir} has no checkpoint for fold(s) {', '.join(map(str, missing)) or '(none)'} "
            f"(folds found: {', '.join(map(str, model_folds)) or 'none'})."
        )
    return model_dir, selected


def _sweep_input_folders(images_dir: str | Path, labels_dir: str | Path | None) -> tuple[Path, Path | None]:
    """The images to segment and the optional ground-truth labels folder, both checked to exist."""
    images = Path(images_dir)
    if not images.exists():
        raise InputImageError(f"Input {images} does not exist.")
    labels = Path(labels_dir) if labels_dir is not None else None
    if labels is not None and not labels.is_dir():
        raise InputImageError(f"Labels folder {labels} does not exist.")
    return images, labels


def _run_sweep(options: _SweepOptions) -> SweepReport:
    """Steps 1-4 of the sweep (bundles, latency, segmentations, comparison) and the report."""
    from tucker_export.bundle import utc_now

    plan: list[float | None] = [None, *options.factors]
    label_of = {f: BASELINE_LABEL if f is None else f"{f:g}" for f in plan}
    watch = MachineWatch()

    bundles, spec, file_ending, found, cases = _sweep_bundles(
        plan, label_of, model_dir=options.model_dir, work_dir=options.work_dir, selected=options.selected,
        round_to=options.round_to, trust_checkpoint=options.trust_checkpoint, images_dir=options.images_dir,
        backend=options.backend, precision=options.precision, progress=options.progress,
    )
    foreground = [label for label in sorted(spec.label_names) if label != 0]
    names = {label: str(spec.label_names[label]) for label in foreground}
    structures = [names[label] for label in foreground]

    latency_fold = options.selected[0]
    input_shape = (spec.num_input_channels, *spec.patch_size)
    timings = _sweep_latency(
        plan, label_of, bundles, backend=options.backend, precision=options.precision,
        torch_device=options.torch_device, latency_fold=latency_fold, input_shape=input_shape,
        interleave=options.interleave, sizes_to_time=options.sizes_to_time, warmup=options.warmup,
        repeats=options.repeats, seed=options.seed, progress=options.progress,
    )
    seg_dirs, e2e = _sweep_segmentations(
        plan, label_of, bundles, found, work_dir=options.work_dir, images_dir=options.images_dir,
        backend=options.backend, precision=options.precision, selected=options.selected, device=options.device,
        use_mirroring=options.use_mirroring, step_size=options.step_size,
        inference_batch_size=options.inference_batch_size, case_repeats=options.case_repeats,
        progress=options.progress,
    )
    rows = _sweep_rows(
        plan, label_of, bundles, cases, seg_dirs=seg_dirs, e2e=e2e, timings=timings, file_ending=file_ending,
        labels_dir=options.labels_dir, foreground=foreground, names=names, structures=structures,
        nsd_tolerance_mm=options.nsd_tolerance_mm, latency_fold=latency_fold, precision=options.precision,
    )
    return SweepReport(
        model_dir=str(options.model_dir.resolve()),
        created=utc_now(),
        settings=_sweep_settings(options, latency_fold=latency_fold, input_shape=input_shape),
        environment=environment(),
        structures=structures,
        cases=cases,
        rows=rows,
        machine_load=watch.verdict(),
    )


def _sweep_settings(options: _SweepOptions, *, latency_fold: Fold, input_shape: tuple[int, ...]) -> dict[str, Any]:
    """The report's ``settings``: every option the sweep ran with, after normalization."""
    return {
        "factors": list(options.factors), "rank_mode": "relative", "round_to": options.round_to,
        "backend": options.backend, "precision": options.precision, "device": str(options.torch_device),
        "folds": [str(f) for f in options.selected], "latency_fold": str(latency_fold),
        "latency_batch_sizes": list(options.sizes_to_time), "warmup": options.warmup,
        "repeats": options.repeats, "seed": options.seed,
        "interleaved": options.interleave, "input_shape": list(input_shape),
        "images": str(options.images_dir), "labels": str(options.labels_dir) if options.labels_dir else None,
        "mirroring": options.use_mirroring, "tta": "on" if options.use_mirroring else "off",
        "step_size": options.step_size, "inference_batch_size": options.inference_batch_size,
        "case_repeats": options.case_repeats,
        "nsd_tolerance_mm": options.nsd_tolerance_mm, "title": options.title,
    }


def _sweep_bundles(
    plan: list[float | None], label_of: Mapping[float | None, str], *, model_dir: Path, work_dir: Path,
    selected: tuple[Fold, ...], round_to: int, trust_checkpoint: bool, images_dir: Path, backend: str,
    precision: str, progress: bool,
) -> tuple[dict[float | None, Bundle], Any, str, list[Any], list[str]]:
    """Step 1 of the sweep: the bundles, their spec, file ending, cases found and case names."""
    from tqdm.auto import tqdm

    from tucker_export.exporter.ranks import RankPolicy
    from tucker_export.nnunet.cases import discover_cases
    from tucker_export.pipeline import prepare_bundle

    # ---- 1. bundles (and exports / engines) for every row. The original's bundle comes first and
    # without exports, so that its model description checks the images before the long steps.
    def policy_of(factor: float | None) -> RankPolicy:
        return RankPolicy(mode="none") if factor is None else RankPolicy(mode="relative", factor=factor, round_to=round_to)

    spec = prepare_bundle(model_dir, work_dir / "bundles" / _slug(None), policy=policy_of(None), folds=selected,
                          trust_checkpoint=trust_checkpoint).bundle.spec
    file_ending = spec.dataset_json["file_ending"]
    found = discover_cases(images_dir, num_channels=spec.num_input_channels, file_ending=file_ending)
    cases = [c.name for c in found]
    bundles: dict[float | None, Bundle] = {}
    bar = tqdm(plan, desc="sweep: decompose+export", unit="row", disable=not progress)
    for factor in bar:
        bar.set_postfix_str(label_of[factor])
        bundles[factor] = prepare_bundle(
            model_dir, work_dir / "bundles" / _slug(factor), policy=policy_of(factor), folds=selected,
            precisions=(precision,) if backend in ("ort", "trt") else (), engines=("trt",) if backend == "trt" else (),
            reuse=factor is None, trust_checkpoint=trust_checkpoint,
        ).bundle
    return bundles, spec, file_ending, found, cases


def _sweep_latency(
    plan: list[float | None], label_of: Mapping[float | None, str], bundles: Mapping[float | None, Bundle], *,
    backend: str, precision: str, torch_device: Any, latency_fold: Fold, input_shape: tuple[int, ...],
    interleave: bool, sizes_to_time: tuple[int, ...], warmup: int, repeats: int, seed: int, progress: bool,
) -> dict[str, dict[int, LatencyStats]]:
    """Step 2 of the sweep: model-only latency of every row, ``{label: {batch_size: LatencyStats}}``."""
    from tqdm.auto import tqdm

    from tucker_export.engines.selection import select_backend

    # ---- 2. model-only latency, first fold (every relative-policy fold has the same structure)
    timings: dict[str, dict[int, LatencyStats]] = {}
    groups = [plan] if interleave else [[f] for f in plan]
    logger.info("Timing %d network(s) %s (%s, %s, %s).", len(plan), "interleaved" if interleave else "one by one",
                backend, precision, torch_device)
    for group in tqdm(groups, desc="sweep: latency", unit="group", disable=not progress or interleave):
        with contextlib.ExitStack() as stack:
            runners = {}
            for factor in group:
                factory, _ = select_backend(backend, bundles[factor], precision, torch_device, [latency_fold])
                runners[label_of[factor]] = stack.enter_context(factory(latency_fold))
            timings.update(interleaved_latency(
                runners, input_shape, batch_sizes=sizes_to_time, warmup=warmup, repeats=repeats, seed=seed,
                progress=progress and interleave,
            ))
    return timings


def _sweep_segmentations(
    plan: list[float | None], label_of: Mapping[float | None, str], bundles: Mapping[float | None, Bundle],
    found: list[Any], *, work_dir: Path, images_dir: Path, backend: str, precision: str,
    selected: tuple[Fold, ...], device: str, use_mirroring: bool, step_size: float, inference_batch_size: int,
    case_repeats: int, progress: bool,
) -> tuple[dict[str, Path], dict[str, EndToEnd]]:
    """Step 3 of the sweep: every row's segmentation folder and end-to-end figures, by label."""
    from tqdm.auto import tqdm

    # ---- 3. segment the images with every row, case by case with the rows in rotating order (as for
    # the latency: load drift on a shared machine must not favour the rows that happen to run late);
    # one untimed case first, so one-time costs (imports, first allocations) land on no row.
    seg_dirs = {label_of[f]: work_dir / "segmentations" / _slug(f) for f in plan}
    row_cases: dict[str, list[dict[str, Any]]] = {label_of[f]: [] for f in plan}
    row_memory: dict[str, dict[str, Any]] = {}
    row_backend: dict[str, tuple[str, str]] = {}

    def segment(case_source: Path, factor: float | None, output_dir: Path) -> EndToEnd:
        figures, report = end_to_end(
            case_source, bundle_path=bundles[factor].path, backend=backend, precision=precision, folds=selected,
            device=device, use_mirroring=use_mirroring, step_size=step_size, batch_size=inference_batch_size,
            output_dir=output_dir,
        )
        if report.failed:
            first = report.failed[0]
            raise InputImageError(f"Case {first.name} failed in the sweep's {label_of[factor]} run ({first.error}).")
        return figures

    def source(case: Any) -> Path:
        return case.dicom_dir if case.dicom_dir is not None else case.files[0]

    with tempfile.TemporaryDirectory(prefix="tucker-export-warmup-") as scratch:
        segment(source(found[0]), None, Path(scratch))
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {label_of[f]: {c.name: [] for c in found} for f in plan}
    bar = tqdm(total=case_repeats * len(found), desc="sweep: segment", unit="case", disable=not progress)
    for repeat in range(case_repeats):
        for index, case in enumerate(found):
            shift = (repeat * len(found) + index) % len(plan)
            for factor in plan[shift:] + plan[:shift]:
                label = label_of[factor]
                bar.set_postfix_str(f"{case.name} {label}")
                figures = segment(source(case), factor, seg_dirs[label])
                runs[label][case.name].extend(figures.cases)
                row_backend[label] = (figures.settings["backend"], figures.settings["backend_reason"])
                previous = row_memory.get(label, {}).get("peak_rss_bytes") or 0
                if (figures.memory.get("peak_rss_bytes") or 0) >= previous:
                    row_memory[label] = figures.memory  # the largest peak over this row's runs
            bar.update()
    bar.close()
    for label, per_case in runs.items():
        for name, entries in per_case.items():
            # the median of each stage over the repeats; the segmentation itself is the same every time
            row_cases[label].append({
                "case": name, "status": "done", "error": None, "runs": len(entries),
                **{key: float(np.median([e[key] for e in entries]))
                   for key in ("preprocess_s", "network_s", "export_s", "total_s")},
            })
    e2e: dict[str, EndToEnd] = {}
    for factor in plan:
        label = label_of[factor]
        settings = {"input": str(images_dir), "backend": row_backend[label][0],
                    "backend_reason": row_backend[label][1], "precision": precision,
                    "folds": [str(f) for f in selected], "mirroring": use_mirroring, "step_size": step_size,
                    "batch_size": inference_batch_size, "device": str(device), "case_repeats": case_repeats,
                    "order": "cases interleaved across rows; per case the median over case_repeats runs"}
        e2e[label] = EndToEnd(settings, row_cases[label], _end_to_end_summary(row_cases[label]), row_memory[label])
    return seg_dirs, e2e


def _sweep_rows(
    plan: list[float | None], label_of: Mapping[float | None, str], bundles: Mapping[float | None, Bundle],
    cases: list[str], *, seg_dirs: Mapping[str, Path], e2e: Mapping[str, EndToEnd],
    timings: Mapping[str, Mapping[int, LatencyStats]], file_ending: str, labels_dir: Path | None,
    foreground: list[int], names: Mapping[int, str], structures: list[str], nsd_tolerance_mm: float,
    latency_fold: Fold, precision: str,
) -> list[SweepRow]:
    """Step 4 of the sweep: compare every row's segmentations per structure and assemble its row."""
    # ---- 4. compare per structure and assemble the rows
    references = {case: _read_label_map(seg_dirs[BASELINE_LABEL] / f"{case}{file_ending}") for case in cases}
    truths: dict[str, tuple[np.ndarray, tuple[float, ...]]] = {}
    if labels_dir is not None:
        for case in cases:
            path = labels_dir / f"{case}{file_ending}"
            if path.is_file():
                truths[case] = _read_label_map(path)
            else:
                logger.warning("No label file %s; case %s has no Dice against the truth.", path, case)

    baseline_stats = timings[BASELINE_LABEL]
    baseline_network = e2e[BASELINE_LABEL].summary.get("network_sum_s")
    baseline_total = e2e[BASELINE_LABEL].summary.get("total_sum_s")
    rows: list[SweepRow] = []
    for factor in plan:
        label = label_of[factor]
        bundle = bundles[factor]
        per_case: dict[str, dict[str, Any]] = {}
        for case in cases:
            prediction, spacing = _read_label_map(seg_dirs[label] / f"{case}{file_ending}")
            reference, _ = references[case]
            entry = {"vs_original": _compare(prediction, reference, spacing, foreground, names, nsd_tolerance_mm)}
            if case in truths:
                entry["vs_truth"] = _compare(prediction, truths[case][0], spacing, foreground, names, nsd_tolerance_mm)
            per_case[case] = entry
        stats = timings[label]
        speedup: dict[str, float | None] = {
            f"batch_{b}": baseline_stats[b].median_s / s.median_s if s.median_s > 0 else None for b, s in stats.items()
        }
        network = e2e[label].summary.get("network_sum_s")
        total = e2e[label].summary.get("total_sum_s")
        speedup["end_to_end_network"] = baseline_network / network if baseline_network and network else None
        speedup["end_to_end_total"] = baseline_total / total if baseline_total and total else None
        compute = compute_figures(bundle)[str(latency_fold)]
        # The original's "before" counts are the reference of every row's ratio (they are equal by construction).
        speedup["macs_bound"] = compute.get("macs_speedup_bound")
        onnx_entry = bundle.onnx_entries().get(onnx_key(latency_fold, precision))
        rows.append(SweepRow(
            label=label, rank_factor=factor, rank_policy=bundle.rank_policy, compute=compute,
            onnx_bytes=_file_size(bundle.artifact_path(onnx_entry["file"])) if onnx_entry else None,
            weights_bytes=_file_size(bundle.weights_path(latency_fold)),
            latency=list(stats.values()), speedup=speedup,
            end_to_end=e2e[label].to_dict(),
            dice_vs_original=_mean_over_cases(per_case, "vs_original", "dice", structures),
            nsd_vs_original=_mean_over_cases(per_case, "vs_original", "nsd", structures),
            dice_vs_truth=_mean_over_cases(per_case, "vs_truth", "dice", structures) if truths else None,
            per_case=per_case,
        ))
    return rows


@contextlib.contextmanager
def work_folder(work_dir: str | Path | None) -> Iterator[Path]:
    """``work_dir`` (kept) or a temporary folder removed afterwards."""
    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
        yield Path(work_dir)
        return
    with tempfile.TemporaryDirectory(prefix="tucker-export-sweep-") as tmp:
        yield Path(tmp)
