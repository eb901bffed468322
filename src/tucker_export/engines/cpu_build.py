"""`tucker-export build --backend openvino`: compiled CPU models per CPU kind, gated against PyTorch.

For each fold and precision: read the bundle's fp32 ONNX export, quantize it with NNCF (int8,
calibrated on tiles of the user's scans), compile it for this CPU, run it against the bundle's
PyTorch network on held-out tiles, and only if it meets its precision's bar write the compiled
model to ``cpu_engines/<cpu-kind>/`` and record it (figures included) in ``bundle.json``. A miss
is recorded too (without a file, so ``auto`` does not retry it on every run) and raised once,
with every failing figure.

Tiles are nnU-Net's: the bundle's own preprocessing of the scans, patch-sized crops at seeded
positions. Without scans, fp32 and bf16 are gated on seeded standard-normal tiles (what z-scored
CT intensities look like to the network); the record says which it was.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

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
from tucker_export.errors import BundleError, ConfigurationError, InputImageError, ValidationFailedError

if TYPE_CHECKING:
    from tucker_export.bundle import Bundle
    from tucker_export.nnunet.loading import Fold

logger = logging.getLogger(__name__)

DEFAULT_CALIBRATION_TILES = 200
DEFAULT_GATE_TILES = 8
MAX_TILE_CASES = 20


# ---- tiles --------------------------------------------------------------------------------------


@dataclass
class Tiles:
    """Network inputs ``(N, C, *patch)`` and where they came from (recorded in ``bundle.json``)."""

    array: np.ndarray
    source: dict[str, Any]
    #: label maps cropped at the same corners ``(N, 1, *patch)``, when the scans came with labels
    labels: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.array.shape[0])


def tiles_digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array, dtype=np.float32).tobytes()).hexdigest()


def crop_positions(
    shape: Sequence[int], patch: Sequence[int], count: int, rng: np.random.Generator
) -> list[tuple[int, ...]]:
    """``count`` uniformly drawn corners of patch-sized crops inside ``shape`` (0 where the volume is smaller)."""
    highs = [max(0, int(s) - int(p)) for s, p in zip(shape, patch)]
    return [tuple(int(rng.integers(0, h + 1)) for h in highs) for _ in range(count)]


def crop_tile(data: np.ndarray, corner: Sequence[int], patch: Sequence[int]) -> np.ndarray:
    """``data[:, corner:corner+patch]`` zero-padded to ``patch`` at the far end (as nnU-Net pads small volumes)."""
    slices = tuple(slice(c, c + p) for c, p in zip(corner, patch))
    tile = data[(slice(None), *slices)]
    missing = [(0, int(p) - s) for p, s in zip(patch, tile.shape[1:])]
    if any(after for _, after in missing):
        tile = np.pad(tile, [(0, 0), *missing])
    return np.ascontiguousarray(tile, dtype=np.float32)


def split_counts(total: int, parts: int) -> list[int]:
    """``total`` tiles over ``parts`` cases as evenly as possible, earlier cases first."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def tiles_from_scans(
    bundle: Bundle, scans: str | Path, count: int, *, seed: int = 0, progress: bool = False,
    max_cases: int = MAX_TILE_CASES, labels_dir: str | Path | None = None,
) -> Tiles:
    """``count`` seeded crops of the scans under ``scans``, after the bundle's own nnU-Net preprocessing.

    At most ``max_cases`` cases are read (a seeded choice when there are more). A case that
    cannot be read is skipped with a warning; none readable is an error. With ``labels_dir``
    every case needs its label map ``<case><file ending>`` there, cropped with the image.
    """
    from tqdm.auto import tqdm

    from tucker_export.errors import BrokenScanError
    from tucker_export.nnunet.cases import discover_cases
    from tucker_export.nnunet.reading import preprocess_case

    if count < 1:
        raise ConfigurationError(f"The number of tiles must be at least 1, got {count}.")
    scans = Path(scans)
    if not scans.exists():
        raise InputImageError(f"Calibration scans {scans} do not exist; point --calibration-dir at a folder of CT scans.")
    spec = bundle.spec
    file_ending = spec.dataset_json["file_ending"]
    found = discover_cases(scans, num_channels=spec.num_input_channels, file_ending=file_ending)
    cases = [c for c in found if not c.problem]
    if not cases:
        shown = "; ".join(f"{c.name}: {c.problem}" for c in found[:3]) + ("; ..." if len(found) > 3 else "")
        raise InputImageError(f"{scans} holds no usable scans for this model ({shown}).")
    rng = np.random.default_rng(seed)
    if len(cases) > max_cases:
        chosen = sorted(rng.choice(len(cases), size=max_cases, replace=False).tolist())
        cases = [cases[i] for i in chosen]
    patch = bundle.patch_size
    if labels_dir is not None:
        labels_dir = Path(labels_dir)
        missing = [c.name for c in cases if not (labels_dir / f"{c.name}{file_ending}").is_file()]
        if not labels_dir.is_dir() or missing:
            raise InputImageError(
                f"Labels folder {labels_dir} lacks the label maps of {', '.join(missing[:3]) or 'every case'}"
                f"{' ...' if len(missing) > 3 else ''} (named <case>{file_ending})."
            )
    tiles: list[np.ndarray] = []
    label_tiles: list[np.ndarray] = []
    used: list[str] = []
    for case, n in tqdm(list(zip(cases, split_counts(count, len(cases)))), desc="tiles", unit="case",
                        disable=not progress, leave=False):
        if n == 0:
            continue
        label_file = labels_dir / f"{case.name}{file_ending}" if labels_dir is not None else None
        try:
            prepared = preprocess_case(case, spec, label_file=label_file)
        except BrokenScanError as error:
            logger.warning("Case %s skipped: %s.", case.name, error)
            continue
        corners = crop_positions(prepared.data.shape[1:], patch, n, rng)
        tiles.extend(crop_tile(prepared.data, corner, patch) for corner in corners)
        if prepared.seg is not None:
            # nnU-Net marks voxels outside the cropped body with -1; they are background here.
            seg = np.maximum(prepared.seg, 0)
            label_tiles.extend(crop_tile(seg, corner, patch) for corner in corners)
        used.append(case.name)
    if not tiles:
        raise InputImageError(f"No scan under {scans} could be read for calibration.")
    array = np.stack(tiles)
    source = {"kind": "scans", "folder": str(scans), "cases": used, "count": len(tiles), "seed": seed,
              "sha256": tiles_digest(array)}
    if labels_dir is not None:
        source["labels"] = str(labels_dir)
    return Tiles(array, source, np.stack(label_tiles) if label_tiles else None)


def seeded_tiles(bundle: Bundle, count: int, *, seed: int = 0) -> Tiles:
    from tucker_export.exporter.onnx_export import seeded_input

    array = seeded_input(count, bundle.num_input_channels, bundle.patch_size, seed)
    return Tiles(array, {"kind": "seeded_normal", "count": count, "seed": seed, "sha256": tiles_digest(array)})


# ---- the accuracy gate --------------------------------------------------------------------------


@dataclass(frozen=True)
class GateBar:
    """What a compiled model must reach against PyTorch fp32 on the gate tiles.

    ``max_abs_diff`` is relative to the logit scale (``max(1, max |reference logit|)``): real CT
    gives logits in the tens, where float32 summation order alone moves the fourth digit.
    ``min_class_dice`` counts classes with at least ``min_class_voxels`` reference voxels in the
    tiles; a few voxels' Dice says nothing. Tile Dice is stricter than case Dice (no Gaussian
    weighting or mirror averaging), hence 0.98 here; per-class Dice >= 0.99 of whole segmentations
    is what the end-to-end benchmark and the demo test check.
    """

    max_abs_diff: float | None = None
    min_argmax_agreement: float | None = None
    min_class_dice: float | None = None
    min_class_voxels: int = 1000


GATE_BARS: dict[str, GateBar] = {
    "fp32": GateBar(max_abs_diff=1e-3),
    "bf16": GateBar(min_argmax_agreement=0.995, min_class_dice=0.98),
    "int8": GateBar(min_argmax_agreement=0.995, min_class_dice=0.98),
}


def class_dice_of_argmax(reference: np.ndarray, candidate: np.ndarray, min_voxels: int = 1) -> dict[int, float]:
    """Dice of each foreground class with ``min_voxels`` or more in the reference's argmax, candidate vs reference."""
    from tucker_export.validation.metrics import label_dice

    ref = reference.argmax(axis=1)
    cand = candidate.argmax(axis=1)
    labels, counts = np.unique(ref, return_counts=True)
    kept = [int(label) for label, count in zip(labels.tolist(), counts.tolist(), strict=True) if label and count >= min_voxels]
    return label_dice(cand, ref, kept)


def judge_gate(reference: np.ndarray, candidate: np.ndarray, precision: str, *, label: str) -> dict[str, Any]:
    """The gate's figures, its bar, ``passed`` and one failure clause per missed bar."""
    from tucker_export.exporter.onnx_export import compare_logits

    bar = GATE_BARS[precision]
    figures = compare_logits(reference, candidate)
    scale = max(1.0, float(np.abs(reference).max()))
    dice = class_dice_of_argmax(reference, candidate, bar.min_class_voxels)
    failures = []
    if bar.max_abs_diff is not None and not figures["max_abs_diff"] <= bar.max_abs_diff * scale:
        failures.append(
            f"{label}: max abs logit diff {figures['max_abs_diff']:.3g} > {bar.max_abs_diff:g} x logit scale {scale:.3g}"
        )
    if bar.min_argmax_agreement is not None and not figures["argmax_agreement"] >= bar.min_argmax_agreement:
        failures.append(
            f"{label}: argmax agreement {100 * figures['argmax_agreement']:.2f}% < {100 * bar.min_argmax_agreement:.1f}%"
        )
    if bar.min_class_dice is not None:
        low = {k: v for k, v in dice.items() if not v >= bar.min_class_dice}
        if low:
            worst = ", ".join(f"class {k} {v:.3f}" for k, v in sorted(low.items()))
            failures.append(f"{label}: tile Dice vs PyTorch below {bar.min_class_dice:g} ({worst})")
    return {
        **{k: float(v) for k, v in figures.items()},
        "logit_scale": scale,
        "class_dice": {str(k): round(v, 5) for k, v in dice.items()},
        "bar": asdict(bar),
        "passed": not failures,
        "failures": failures,
    }


def run_in_batches(infer, array: np.ndarray, batch: int = 2) -> np.ndarray:
    return np.concatenate([infer(array[i:i + batch]) for i in range(0, len(array), batch)])


def median_latency_ms(infer, sample: np.ndarray, repeats: int = 3) -> float:
    """Median wall time of ``repeats`` calls after one untimed call (so first-call set-up is not counted)."""
    infer(sample)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        infer(sample)
        times.append(time.perf_counter() - started)
    return float(np.median(times) * 1000.0)


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

    from tucker_export._io import write_bytes_atomic
    from tucker_export.bundle import Bundle, utc_now
    from tucker_export.engines import openvino_backend as ovb
    from tucker_export.engines.runners import physical_cores
    from tucker_export.exporter.onnx_export import torch_reference

    ov_version = ovb.openvino_version()  # BackendUnavailableError in one sentence without OpenVINO
    capabilities = ovb.cpu_capabilities()
    cpu = detect_cpu()
    bundle = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
    threads = threads or physical_cores()
    selected = [normalize_cpu_precision(p) for p in precisions] if precisions else [default_cpu_precision(cpu, capabilities)]
    selected = list(dict.fromkeys(selected))
    for precision in selected:
        check_precision_supported(precision, cpu, capabilities)
    if "int8" in selected and calibration_dir is None:
        raise ConfigurationError(
            "int8 needs calibration scans: add --calibration-dir SCANS (a folder of CT scans like the ones you will segment)."
        )
    if gate_tiles < 1:
        raise ConfigurationError(f"--gate-tiles must be at least 1, got {gate_tiles}.")
    selected_folds = bundle.resolve_folds(list(folds) if folds else None)
    onnx_entries = {fold: fp32_onnx_entry(bundle, fold) for fold in selected_folds}  # every missing export first
    onnx_paths = {fold: bundle.verify_file(entry["file"], entry["sha256"]) for fold, (_, entry) in onnx_entries.items()}

    calibration: Tiles | None = None
    if calibration_dir is not None:
        n_calibration = calibration_tiles if "int8" in selected else 0
        if "int8" in selected and calibration_tiles < 1:
            raise ConfigurationError(f"--calibration-tiles must be at least 1, got {calibration_tiles}.")
        both = tiles_from_scans(bundle, calibration_dir, n_calibration + gate_tiles, seed=seed, progress=progress)
        # Held-out gate tiles: the last ones drawn, never seen by the quantizer.
        n_gate = min(gate_tiles, len(both)) if not n_calibration else min(gate_tiles, max(1, len(both) // 5))
        gate = Tiles(both.array[-n_gate:], {**both.source, "count": n_gate, "sha256": tiles_digest(both.array[-n_gate:]),
                                            "role": "held out from calibration" if n_calibration else "gate"})
        if n_calibration:
            calibration = Tiles(both.array[:-n_gate], {**both.source, "count": len(both) - n_gate,
                                                       "sha256": tiles_digest(both.array[:-n_gate])})
    elif gate_scans is not None:
        gate = tiles_from_scans(bundle, gate_scans, gate_tiles, seed=seed, progress=progress, max_cases=max_gate_cases)
    else:
        gate = seeded_tiles(bundle, gate_tiles, seed=seed)

    results: list[CpuBuildResult] = []
    failures: list[str] = []
    jobs = [(fold, precision) for fold in selected_folds for precision in selected]
    references: dict[Any, np.ndarray] = {}
    for fold, precision in tqdm(jobs, desc="build (openvino)", unit="model", disable=not progress):
        onnx_key_, onnx_entry = onnx_entries[fold]
        key = cpu_engine_key(fold, precision, cpu, ov_version, onnx_entry["sha256"])
        model = ovb.read_onnx(onnx_paths[fold])
        calibration_record = None
        if precision == "int8":
            assert calibration is not None
            logger.info("Quantizing fold %s to int8 on %d calibration tiles (NNCF).", fold, len(calibration))
            model = ovb.quantize_int8(model, list(calibration.array[:, None]), seed=seed)
            calibration_record = calibration.source
        built = ovb.compile_model(model, precision, threads, export=write)
        if fold not in references:
            references[fold] = torch_reference(bundle.build_network(fold), gate.array)
        session = ovb.OpenVinoSession(built.compiled)
        candidate = run_in_batches(session.infer, gate.array)
        verdict = judge_gate(references[fold], candidate, precision, label=f"fold {fold} {precision}")
        verdict["tiles"] = gate.source
        latency = median_latency_ms(session.infer, gate.array[:1])
        logger.info(
            "%s: max |diff| %.2e, argmax %.3f%%, %.1f ms per tile%s", key, verdict["max_abs_diff"],
            100 * verdict["argmax_agreement"], latency, "" if verdict["passed"] else " - MISSES ITS BAR",
        )
        engine_file = engine_sha = None
        size = len(built.blob or b"")
        if verdict["passed"] and write and built.blob is not None:
            engine_file = cpu_engine_relpath(fold, precision, cpu, ov_version, onnx_entry["sha256"])
            write_bytes_atomic(bundle.artifact_path(engine_file), built.blob)
            engine_sha = hashlib.sha256(built.blob).hexdigest()  # the bytes just written; no re-read
        record = cpu_engine_record(
            key=key, fold=fold, precision=precision, cpu=cpu, openvino_version=ov_version, onnx_key=onnx_key_,
            onnx_entry=onnx_entry, engine_file=engine_file, engine_sha256=engine_sha, size_bytes=size, gate=verdict,
            latency_ms=round(latency, 3), calibration=calibration_record, compile_seconds=built.seconds, built=utc_now(),
        )
        record["threads"] = threads
        if write:
            _replace_records(bundle, record, fold=fold, precision=precision, cpu=cpu, keep_file=engine_file)
        results.append(CpuBuildResult(record, built.compiled if verdict["passed"] else None))
        failures.extend(verdict["failures"])
    if failures:
        hint = (
            "the gate ran on seeded noise tiles, where logits are near ties: give --calibration-dir SCANS to gate "
            "on tiles of real scans, or use a higher precision"
            if gate.source["kind"] == "seeded_normal" else "use a higher precision"
        )
        raise ValidationFailedError(
            f"{len(failures)} compiled model(s) missed their accuracy bar and were not shipped: {'; '.join(failures)}; "
            f"{hint}."
        )
    return results


def _replace_records(bundle: Bundle, record: dict[str, Any], *, fold: Fold, precision: str, cpu: CpuInfo,
                     keep_file: str | None) -> None:
    for old_key in superseded_cpu_records(bundle.manifest, fold=fold, precision=precision, cpu=cpu, keep_key=record["key"]):
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
    manifest: dict[str, Any], *, folds: Sequence[Fold], precision: str, cpu: CpuInfo, openvino_version: str,
    onnx_sha256: dict[Any, str | None],
) -> dict[Any, dict[str, Any]] | None:
    """The passing record of every fold for ``precision`` on this CPU, or None when a fold has none."""
    from tucker_export.engines.cpu_keys import cpu_engine_candidates, cpu_engine_mismatch

    found: dict[Any, dict[str, Any]] = {}
    for fold in folds:
        fits = [
            r for r in cpu_engine_candidates(manifest, fold=fold, precision=precision)
            if r.get("gate", {}).get("passed") and r.get("file")
            and cpu_engine_mismatch(r, cpu=cpu, openvino_version=openvino_version, onnx_sha256=onnx_sha256[fold]) is None
        ]
        if not fits:
            return None
        found[fold] = fits[0]
    return found


def rank_cpu_precisions(
    manifest: dict[str, Any], *, folds: Sequence[Fold], cpu: CpuInfo, openvino_version: str,
    onnx_sha256: dict[Any, str | None], default: str,
) -> list[str]:
    """Precisions to try for ``--precision auto``: those gated for every fold, fastest measured first,
    then ``default`` (built on first use), then fp32."""
    from tucker_export.engines.cpu_keys import CPU_PRECISIONS

    timed: list[tuple[float, str]] = []
    for precision in CPU_PRECISIONS:
        records = gated_fitting_records(manifest, folds=folds, precision=precision, cpu=cpu,
                                        openvino_version=openvino_version, onnx_sha256=onnx_sha256)
        if records:
            timed.append((sum(float(r.get("latency_ms") or 0.0) for r in records.values()), precision))
    ranked = [p for _, p in sorted(timed)]
    return list(dict.fromkeys([*ranked, default, "fp32"]))


@dataclass
class CpuModels:
    """What OpenVINO runners open, per fold: a verified ``.blob`` path or a compiled model in memory."""

    precision: str
    models: dict[Any, Any]
    note: str


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
    from tucker_export.engines.cpu_keys import cpu_build_command, find_cpu_engine_record
    from tucker_export.errors import EngineError, TuckerExportError

    ov_version = ovb.openvino_version()
    capabilities = ovb.cpu_capabilities()
    cpu = detect_cpu()
    shas = {fold: fp32_onnx_entry(bundle, fold)[1]["sha256"] for fold in folds}
    default = default_cpu_precision(cpu, capabilities)
    order = (
        rank_cpu_precisions(bundle.manifest, folds=folds, cpu=cpu, openvino_version=ov_version, onnx_sha256=shas,
                            default=default)
        if precision == "auto" else [normalize_cpu_precision(precision)]
    )
    writable = os.access(bundle.path, os.W_OK)
    first_problem: TuckerExportError | None = None
    for candidate in order:
        try:
            check_precision_supported(candidate, cpu, capabilities)
            models: dict[Any, Any] = {}
            records: dict[Any, dict[str, Any]] = {}
            missing: list[Fold] = []
            for fold in folds:
                try:
                    record = find_cpu_engine_record(
                        bundle.manifest, fold=fold, precision=candidate, cpu=cpu, openvino_version=ov_version,
                        bundle_path=bundle.path, onnx_sha256=shas[fold],
                    )
                except EngineError as error:
                    logger.info("%s", error)
                    missing.append(fold)
                    continue
                if not record.get("gate", {}).get("passed"):
                    raise EngineError(
                        f"The OpenVINO {candidate} model of fold {fold} missed its accuracy bar when it was built "
                        f"({'; '.join(record.get('gate', {}).get('failures', [])) or 'see bundle.json'}); use "
                        f"--precision fp32."
                    )
                if not record.get("file") or not bundle.artifact_path(record["file"]).is_file():
                    missing.append(fold)
                    continue
                models[fold] = bundle.verify_file(record["file"], record["sha256"])
                records[fold] = record
            if missing:
                if candidate == "int8":
                    raise EngineError(
                        f"Bundle {bundle.path} has no OpenVINO {candidate} model for this CPU ({cpu.kind}) of fold(s) "
                        f"{', '.join(str(f) for f in missing)}; build them with `{cpu_build_command(bundle.path, candidate)}`."
                    )
                logger.info(
                    "Compiling OpenVINO %s for this CPU (%s), fold(s) %s, and gating it against PyTorch (once per CPU kind).",
                    candidate, cpu.kind, ", ".join(str(f) for f in missing),
                )
                built = build_cpu_engines(
                    bundle, [candidate], folds=missing, gate_scans=tile_source, max_gate_cases=2, threads=threads,
                    progress=False, write=writable,
                )
                if not writable:
                    logger.warning("Bundle %s is read-only: the compiled models are kept in memory for this run only.", bundle.path)
                models.update({r.record["fold"]: r.compiled for r in built})
                records.update({r.record["fold"]: r.record for r in built})
            latency = [records[f].get("latency_ms") for f in folds]
            note = f"{candidate}, gated for {cpu.kind}"
            if all(latency):
                note += f", {sum(latency) / len(latency):.0f} ms per tile"  # type: ignore[arg-type]
            return CpuModels(candidate, models, note)
        except TuckerExportError as error:
            if precision != "auto":
                raise
            logger.info("OpenVINO %s not used: %s", candidate, error)
            first_problem = first_problem or error
    assert first_problem is not None
    raise first_problem
