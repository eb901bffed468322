"""`tucker-export build --backend openvino`: compiled CPU models per CPU kind, gated against PyTorch.

For each fold and precision: read the bundle's fp32 ONNX export, quantize it with NNCF (int8,
calibrated on tiles of the user's scans), compile it for this CPU, run it against the bundle's
PyTorch network on held-out tiles, and only if it meets its precision's bar write the compiled
model to ``cpu_engines/<cpu-kind>/`` and record it (figures included) in ``bundle.json``. A miss
is recorded too (without a file, so ``auto`` does not retry it on every run) and raised once,
with every failing figure.

Tiles are nnU-Net's: the bundle's own preprocessing of the scans, patch-sized crops at seeded
positions. Without scans, fp32 and bf16 are gated on seeded standard-normal tiles (what z-scored
CT intensities look like to the network); the record says which it was. The tiles and the gate
itself live in ``cpu_gate``.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tucker_export.engines.cpu_gate import (
    MAX_TILE_CASES,
    Tiles,
    gate_and_calibration_tiles,
    judge_gate,
    median_latency_ms,
    run_in_batches,
)
from tucker_export.engines.cpu_keys import (
    CPU_ENGINES_SECTION,
    CpuInfo,
    check_precision_supported,
    cpu_engine_key,
    cpu_engine_record,
    cpu_engine_relpath,
    detect_cpu,
    normalize_cpu_precision,
    superseded_cpu_records,
)
from tucker_export.engines.keys import export_command
from tucker_export.errors import BundleError, ConfigurationError, ValidationFailedError
from tucker_export.exporter.rebuild import build_network

if TYPE_CHECKING:
    from tucker_export.bundle import Bundle
    from tucker_export.engines.openvino_backend import CompiledCpuModel
    from tucker_export.nnunet.loading import Fold

logger = logging.getLogger(__name__)

DEFAULT_CALIBRATION_TILES = 200
DEFAULT_GATE_TILES = 8


# ---- building -----------------------------------------------------------------------------------


@dataclass
class CpuBuildResult:
    """One compiled model: its manifest record and the live compiled model (``None`` when the gate failed)."""

    record: dict[str, Any]
    compiled: Any


def default_cpu_precision(cpu: CpuInfo, capabilities: Sequence[str]) -> str:
    """bf16 where OpenVINO reports BF16 for this CPU, else fp32."""
    return "bf16" if "BF16" in capabilities else "fp32"


def fp32_onnx_entry(bundle: Bundle, fold: Fold) -> tuple[str, dict[str, Any]]:
    """OpenVINO compiles every precision from the fp32 export (it lowers precision itself)."""
    from tucker_export.exporter.onnx_export import onnx_key

    key = onnx_key(fold, "fp32")
    if key not in bundle.onnx_entries():
        raise BundleError(
            f"Bundle {bundle.path} has no fp32 ONNX export of fold {fold}, which OpenVINO compiles from; run "
            f"`{export_command(bundle.path, 'fp32')}`."
        )
    return key, bundle.onnx_entry(fold, "fp32")


@dataclass(frozen=True)
class _CpuBuildContext:
    """What every fold and precision of one ``build_cpu_engines`` call shares."""

    bundle: Bundle
    cpu: CpuInfo
    openvino_version: str
    threads: int
    write: bool
    seed: int
    gate: Tiles
    calibration: Tiles | None


def _selected_cpu_precisions(
    precisions: Sequence[str] | None, cpu: CpuInfo, capabilities: Sequence[str]
) -> list[str]:
    """The requested precisions, normalized and deduplicated (default: ``default_cpu_precision``); each one
    checked against this CPU before anything is read, so an impossible request fails at once."""
    selected = [normalize_cpu_precision(p) for p in precisions] if precisions else [default_cpu_precision(cpu, capabilities)]
    selected = list(dict.fromkeys(selected))
    for precision in selected:
        check_precision_supported(precision, cpu, capabilities)
    return selected


def _check_tile_requests(selected: Sequence[str], calibration_dir: str | Path | None, gate_tiles: int) -> None:
    """Refuse tile requests that cannot work, before any ONNX file is hashed."""
    if "int8" in selected and calibration_dir is None:
        raise ConfigurationError(
            "int8 needs calibration scans: a folder of CT scans like the ones you will segment",
            option="calibration_dir",
        )
    if gate_tiles < 1:
        raise ConfigurationError(f"The number of gate tiles must be at least 1, got {gate_tiles}.", option="gate_tiles")


def _compile_cpu_model(
    context: _CpuBuildContext, fold: Fold, precision: str, onnx_path: Path
) -> tuple[CompiledCpuModel, dict[str, Any] | None]:
    """The compiled model of ``onnx_path`` at ``precision`` and, for int8, the calibration tiles' record."""
    from tucker_export.engines import openvino_backend as ovb

    model = ovb.read_onnx(onnx_path)
    calibration_record = None
    if precision == "int8":
        calibration = context.calibration
        assert calibration is not None
        logger.info("Quantizing fold %s to int8 on %d calibration tiles (NNCF).", fold, len(calibration))
        model = ovb.quantize_int8(model, list(calibration.array[:, None]), seed=context.seed)
        calibration_record = calibration.source
    return ovb.compile_model(model, precision, context.threads, export=context.write), calibration_record


def _gate_compiled_model(
    context: _CpuBuildContext, compiled: Any, reference: np.ndarray, *, key: str, fold: Fold, precision: str
) -> tuple[dict[str, Any], float]:
    """The gate verdict (with the tiles' record) of ``compiled`` against PyTorch's ``reference``, and its latency."""
    from tucker_export.engines import openvino_backend as ovb

    gate = context.gate
    session = ovb.OpenVinoSession(compiled)
    candidate = run_in_batches(session.infer, gate.array)
    verdict = judge_gate(reference, candidate, precision, label=f"fold {fold} {precision}")
    verdict["tiles"] = gate.source
    latency = median_latency_ms(session.infer, gate.array[:1])
    logger.info(
        "%s: max |diff| %.2e, argmax %.3f%%, %.1f ms per tile%s", key, verdict["max_abs_diff"],
        100 * verdict["argmax_agreement"], latency, "" if verdict["passed"] else " - MISSES ITS BAR",
    )
    return verdict, latency


def _ship_blob(
    context: _CpuBuildContext, blob: bytes | None, *, passed: bool, fold: Fold, precision: str, onnx_sha256: str
) -> tuple[str | None, str | None]:
    """Write a passing model's exported bytes into the bundle; its relative path and sha256, or (None, None)."""
    from tucker_export._io import write_bytes_atomic

    if not (passed and context.write and blob is not None):
        return None, None
    engine_file = cpu_engine_relpath(fold, precision, context.cpu, context.openvino_version, onnx_sha256)
    write_bytes_atomic(context.bundle.artifact_path(engine_file), blob)
    return engine_file, hashlib.sha256(blob).hexdigest()  # the bytes just written; no re-read


def _build_one_cpu_model(
    context: _CpuBuildContext,
    fold: Fold,
    precision: str,
    *,
    onnx_key: str,
    onnx_entry: dict[str, Any],
    onnx_path: Path,
    references: dict[Any, np.ndarray],
) -> tuple[CpuBuildResult, list[str]]:
    """Compile, gate, ship and record one fold at one precision; the result and its gate failures.

    ``references`` caches PyTorch's logits per fold: every precision of a fold is gated on the same tiles.
    """
    from tucker_export.bundle import utc_now
    from tucker_export.exporter.onnx_export import torch_reference

    cpu, ov_version = context.cpu, context.openvino_version
    key = cpu_engine_key(fold, precision, cpu, ov_version, onnx_entry["sha256"])
    built, calibration_record = _compile_cpu_model(context, fold, precision, onnx_path)
    if fold not in references:
        references[fold] = torch_reference(build_network(context.bundle, fold), context.gate.array)
    verdict, latency = _gate_compiled_model(context, built.compiled, references[fold], key=key, fold=fold,
                                            precision=precision)
    size = len(built.blob or b"")
    engine_file, engine_sha = _ship_blob(context, built.blob, passed=verdict["passed"], fold=fold,
                                         precision=precision, onnx_sha256=onnx_entry["sha256"])
    record = cpu_engine_record(
        key=key, fold=fold, precision=precision, cpu=cpu, openvino_version=ov_version, onnx_key=onnx_key,
        onnx_entry=onnx_entry, engine_file=engine_file, engine_sha256=engine_sha, size_bytes=size, gate=verdict,
        latency_ms=round(latency, 3), calibration=calibration_record, compile_seconds=built.seconds, built=utc_now(),
    )
    record["threads"] = context.threads
    if context.write:
        _replace_records(context.bundle, record, fold=fold, precision=precision, cpu=cpu, keep_file=engine_file)
    return CpuBuildResult(record, built.compiled if verdict["passed"] else None), verdict["failures"]


def _raise_gate_failures(failures: Sequence[str], gate: Tiles) -> None:
    """One ValidationFailedError naming every missed bar, once all results are recorded."""
    if not failures:
        return
    # On noise tiles logits are near ties, so a miss there says little about real scans: point at them.
    on_noise = gate.source["kind"] == "seeded_normal"
    hint = (
        "the gate ran on seeded noise tiles, where logits are near ties: give calibration scans to gate "
        "on tiles of real scans, or use a higher precision" if on_noise else "use a higher precision"
    )
    raise ValidationFailedError(
        f"{len(failures)} compiled model(s) missed their accuracy bar and were not shipped: {'; '.join(failures)}; "
        f"{hint}.", option="calibration_dir" if on_noise else None,
    )


def build_cpu_engines(
    bundle: Bundle | str | Path,
    precisions: Sequence[str] | None = None,
    *,
    folds: Sequence[Fold] | None = None,
    calibration_dir: str | Path | None = None,
    calibration_tiles: int = DEFAULT_CALIBRATION_TILES,
    gate_tiles: int = DEFAULT_GATE_TILES,
    gate_scans: str | Path | None = None,
    max_gate_cases: int = MAX_TILE_CASES,
    seed: int = 0,
    threads: int | None = None,
    progress: bool = True,
    write: bool = True,
) -> list[CpuBuildResult]:
    """Compile, gate and record one OpenVINO model per fold and precision for this CPU.

    ``precisions=None`` builds bf16 where the CPU has it, else fp32. int8 needs
    ``calibration_dir``; with it, the gate also runs on held-out tiles of those scans.
    ``gate_scans`` (without ``calibration_dir``) gates on tiles of those scans only, read from at
    most ``max_gate_cases`` of them; with neither, on seeded standard-normal tiles. Raises
    ValidationFailedError once, listing every missed bar, after recording each result.
    ``write=False`` (a bundle that cannot be written) keeps the compiled models in memory only.
    """
    from tqdm.auto import tqdm

    from tucker_export.bundle import Bundle
    from tucker_export.engines import openvino_backend as ovb
    from tucker_export.engines.runners import physical_cores

    ov_version = ovb.openvino_version()  # BackendUnavailableError in one sentence without OpenVINO
    capabilities = ovb.cpu_capabilities()
    cpu = detect_cpu()
    bundle = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
    threads = threads or physical_cores()
    selected = _selected_cpu_precisions(precisions, cpu, capabilities)
    _check_tile_requests(selected, calibration_dir, gate_tiles)
    selected_folds = bundle.resolve_folds(list(folds) if folds else None)
    onnx_entries = {fold: fp32_onnx_entry(bundle, fold) for fold in selected_folds}  # every missing export first
    onnx_paths = {fold: bundle.verify_file(entry["file"], entry["sha256"]) for fold, (_, entry) in onnx_entries.items()}
    gate, calibration = gate_and_calibration_tiles(
        bundle, selected, calibration_dir=calibration_dir, calibration_tiles=calibration_tiles, gate_tiles=gate_tiles,
        gate_scans=gate_scans, max_gate_cases=max_gate_cases, seed=seed, progress=progress,
    )
    context = _CpuBuildContext(bundle=bundle, cpu=cpu, openvino_version=ov_version, threads=threads, write=write,
                               seed=seed, gate=gate, calibration=calibration)

    results: list[CpuBuildResult] = []
    failures: list[str] = []
    jobs = [(fold, precision) for fold in selected_folds for precision in selected]
    references: dict[Any, np.ndarray] = {}
    for fold, precision in tqdm(jobs, desc="build (openvino)", unit="model", disable=not progress):
        onnx_key_, onnx_entry = onnx_entries[fold]
        result, missed = _build_one_cpu_model(context, fold, precision, onnx_key=onnx_key_, onnx_entry=onnx_entry,
                                              onnx_path=onnx_paths[fold], references=references)
        results.append(result)
        failures.extend(missed)
    _raise_gate_failures(failures, gate)
    return results


def _replace_records(bundle: Bundle, record: dict[str, Any], *, fold: Fold, precision: str, cpu: CpuInfo,
                     keep_file: str | None) -> None:
    for old_key in superseded_cpu_records(bundle.engine_records(CPU_ENGINES_SECTION), fold=fold, precision=precision, cpu=cpu, keep_key=record["key"]):
        old_file = bundle.engine_records(CPU_ENGINES_SECTION)[old_key].get("file")
        if old_file and old_file != keep_file and bundle.artifact_path(old_file).is_file():
            bundle.artifact_path(old_file).unlink()
        bundle.remove_record(CPU_ENGINES_SECTION, old_key)
        logger.info("Replaced compiled model %s", old_key)
    bundle.record(CPU_ENGINES_SECTION, record["key"], record)


def format_cpu_build_table(records: Sequence[dict[str, Any]]) -> str:
    lines = [f"{'compiled model':<64} {'gate':>5} {'argmax %':>9} {'max|d|':>8} {'ms/tile':>8} {'MB':>6}"]
    for r in records:
        gate = r["gate"]
        lines.append(
            f"{(r['file'] or r['key'] + ' (not shipped)'):<64} {'pass' if gate['passed'] else 'FAIL':>5} "
            f"{100 * gate['argmax_agreement']:>9.3f} {gate['max_abs_diff']:>8.2e} {r['latency_ms'] or 0:>8.1f} "
            f"{r['size_bytes'] / 1e6:>6.1f}"
        )
    return "\n".join(lines)


# ---- choosing (and building on first use) for a run -----------------------------------------------


def gated_fitting_records(
    records: Mapping[str, dict[str, Any]], *, folds: Sequence[Fold], precision: str, cpu: CpuInfo, openvino_version: str,
    onnx_sha256: dict[Any, str | None],
) -> dict[Any, dict[str, Any]] | None:
    """The passing record of every fold for ``precision`` on this CPU, or None when a fold has none."""
    from tucker_export.engines.cpu_keys import cpu_engine_candidates, cpu_engine_mismatch

    found: dict[Any, dict[str, Any]] = {}
    for fold in folds:
        fits = [
            r for r in cpu_engine_candidates(records, fold=fold, precision=precision)
            if r.get("gate", {}).get("passed") and r.get("file")
            and cpu_engine_mismatch(r, cpu=cpu, openvino_version=openvino_version, onnx_sha256=onnx_sha256[fold]) is None
        ]
        if not fits:
            return None
        found[fold] = fits[0]
    return found


def rank_cpu_precisions(
    records: Mapping[str, dict[str, Any]], *, folds: Sequence[Fold], cpu: CpuInfo, openvino_version: str,
    onnx_sha256: dict[Any, str | None], default: str,
) -> list[str]:
    """Precisions to try for ``--precision auto``: those gated for every fold, fastest measured first,
    then ``default`` (built on first use), then fp32."""
    from tucker_export.engines.cpu_keys import CPU_PRECISIONS

    timed: list[tuple[float, str]] = []
    for precision in CPU_PRECISIONS:
        fitting = gated_fitting_records(records, folds=folds, precision=precision, cpu=cpu,
                                        openvino_version=openvino_version, onnx_sha256=onnx_sha256)
        if fitting:
            timed.append((sum(float(r.get("latency_ms") or 0.0) for r in fitting.values()), precision))
    ranked = [p for _, p in sorted(timed)]
    return list(dict.fromkeys([*ranked, default, "fp32"]))


@dataclass
class CpuModels:
    """What OpenVINO runners open, per fold: a verified ``.blob`` path or a compiled model in memory."""

    precision: str
    models: dict[Any, Any]
    note: str


def _stored_cpu_models(
    bundle: Bundle, precision: str, folds: Sequence[Fold], *, cpu: CpuInfo, openvino_version: str,
    onnx_sha256: dict[Any, str | None],
) -> tuple[dict[Any, Any], dict[Any, dict[str, Any]], list[Fold]]:
    """The verified model files and records the bundle already has for ``precision``, and the folds without one.

    A fold whose stored model missed its bar is refused outright: building it again would miss again.
    """
    from tucker_export.engines.cpu_keys import find_cpu_engine_record
    from tucker_export.errors import EngineError

    models: dict[Any, Any] = {}
    records: dict[Any, dict[str, Any]] = {}
    missing: list[Fold] = []
    for fold in folds:
        try:
            record = find_cpu_engine_record(
                bundle.engine_records(CPU_ENGINES_SECTION), fold=fold, precision=precision, cpu=cpu, openvino_version=openvino_version,
                bundle_path=bundle.path, onnx_sha256=onnx_sha256[fold],
            )
        except EngineError as error:
            logger.info("%s", error)
            missing.append(fold)
            continue
        if not record.get("gate", {}).get("passed"):
            raise EngineError(
                f"The OpenVINO {precision} model of fold {fold} missed its accuracy bar when it was built "
                f"({'; '.join(record.get('gate', {}).get('failures', [])) or 'see bundle.json'})",
                option="precision", use="fp32",
            )
        if not record.get("file") or not bundle.artifact_path(record["file"]).is_file():
            missing.append(fold)
            continue
        models[fold] = bundle.verify_file(record["file"], record["sha256"])
        records[fold] = record
    return models, records, missing


def _build_missing_cpu_models(
    bundle: Bundle, precision: str, missing: Sequence[Fold], *, cpu: CpuInfo, tile_source: str | Path | None,
    threads: int | None, writable: bool,
) -> tuple[dict[Any, Any], dict[Any, dict[str, Any]]]:
    """Compile and gate ``missing`` folds now (cached in the bundle when writable); their models and records.

    int8 is never built on first use: it needs calibration scans the run does not have.
    """
    from tucker_export.engines.cpu_keys import cpu_build_command
    from tucker_export.errors import EngineError

    if precision == "int8":
        raise EngineError(
            f"Bundle {bundle.path} has no OpenVINO {precision} model for this CPU ({cpu.kind}) of fold(s) "
            f"{', '.join(str(f) for f in missing)}; build them with `{cpu_build_command(bundle.path, precision)}`."
        )
    logger.info(
        "Compiling OpenVINO %s for this CPU (%s), fold(s) %s, and gating it against PyTorch (once per CPU kind).",
        precision, cpu.kind, ", ".join(str(f) for f in missing),
    )
    built = build_cpu_engines(
        bundle, [precision], folds=missing, gate_scans=tile_source, max_gate_cases=2, threads=threads,
        progress=False, write=writable,
    )
    if not writable:
        logger.warning("Bundle %s is read-only: the compiled models are kept in memory for this run only.", bundle.path)
    return {r.record["fold"]: r.compiled for r in built}, {r.record["fold"]: r.record for r in built}


def _cpu_models_for(
    bundle: Bundle, precision: str, folds: Sequence[Fold], *, cpu: CpuInfo, capabilities: Sequence[str],
    openvino_version: str, onnx_sha256: dict[Any, str | None], tile_source: str | Path | None,
    threads: int | None, writable: bool,
) -> CpuModels:
    """Every fold's model at ``precision``: stored ones where they fit, the rest built now; raises why not."""
    check_precision_supported(precision, cpu, capabilities)
    models, records, missing = _stored_cpu_models(bundle, precision, folds, cpu=cpu, openvino_version=openvino_version,
                                                  onnx_sha256=onnx_sha256)
    if missing:
        built_models, built_records = _build_missing_cpu_models(
            bundle, precision, missing, cpu=cpu, tile_source=tile_source, threads=threads, writable=writable,
        )
        models.update(built_models)
        records.update(built_records)
    latency = [records[f].get("latency_ms") for f in folds]
    note = f"{precision}, gated for {cpu.kind}"
    if all(latency):
        note += f", {sum(latency) / len(latency):.0f} ms per tile"  # type: ignore[arg-type]
    return CpuModels(precision, models, note)


def resolve_cpu_models(
    bundle: Bundle,
    precision: str,
    folds: Sequence[Fold],
    *,
    tile_source: str | Path | None = None,
    threads: int | None = None,
) -> CpuModels:
    """The compiled models a run uses, for ``precision`` (``auto``: see ``rank_cpu_precisions``).

    A fold without a fitting compiled model is compiled and gated now (on tiles of
    ``tile_source`` when given) and cached in the bundle when it is writable. A model whose key
    does not fit this CPU, OpenVINO or ONNX file is never used. Raises the reason when nothing fits.
    """
    import os

    from tucker_export.engines import openvino_backend as ovb
    from tucker_export.errors import TuckerExportError

    ov_version = ovb.openvino_version()
    capabilities = ovb.cpu_capabilities()
    cpu = detect_cpu()
    shas = {fold: fp32_onnx_entry(bundle, fold)[1]["sha256"] for fold in folds}
    default = default_cpu_precision(cpu, capabilities)
    order = (
        rank_cpu_precisions(bundle.engine_records(CPU_ENGINES_SECTION), folds=folds, cpu=cpu, openvino_version=ov_version, onnx_sha256=shas,
                            default=default)
        if precision == "auto" else [normalize_cpu_precision(precision)]
    )
    writable = os.access(bundle.path, os.W_OK)
    first_problem: TuckerExportError | None = None
    for candidate in order:
        try:
            return _cpu_models_for(
                bundle, candidate, folds, cpu=cpu, capabilities=capabilities, openvino_version=ov_version,
                onnx_sha256=shas, tile_source=tile_source, threads=threads, writable=writable,
            )
        except TuckerExportError as error:
            # auto falls back to the next precision; an explicit precision says why it cannot run.
            if precision != "auto":
                raise
            logger.info("OpenVINO %s not used: %s", candidate, error)
            first_problem = first_problem or error
    assert first_problem is not None
    raise first_problem
