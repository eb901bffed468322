"""`tucker-export build`: TensorRT engines for the GPUs of this machine, filed in the bundle.

The plan (which fold, precision and GPU kind; from which ONNX file; under which key, engine path
and timing cache; with which batch profile) is plain code over the manifest (``plan_builds``), so
it is tested without TensorRT. Only ``build_serialized_engine`` touches TensorRT.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tucker_export._io import sha256_file, write_bytes_atomic
from tucker_export.bundle import onnx_key
from tucker_export.engines.keys import (
    ENGINES_SECTION,
    BatchProfile,
    GpuInfo,
    cuda_devices,
    engine_key,
    engine_record,
    engine_relpath,
    export_command,
    one_per_kind,
    parse_gpu_selection,
    superseded_records,
    timing_cache_relpath,
)
from tucker_export.errors import BackendUnavailableError, BundleError, ConfigurationError

if TYPE_CHECKING:
    from tucker_export.bundle import Bundle
    from tucker_export.nnunet.loading import Fold

logger = logging.getLogger(__name__)

DEFAULT_WORKSPACE_GIB = 4.0


@dataclass(frozen=True)
class BuildJob:
    """One engine to build: everything decided before TensorRT is called."""

    fold: Fold
    precision: str
    gpu: GpuInfo
    onnx_key: str
    onnx_file: str
    onnx_sha256: str
    input_name: str
    sample_shape: tuple[int, ...]  # (C, *patch)
    key: str
    engine_file: str
    timing_cache_file: str
    profile: BatchProfile
    workspace_gib: float


def available_precisions(bundle: Bundle) -> tuple[str, ...]:
    """Precisions that have an ONNX export in the bundle, fp32 first."""
    present = {entry.get("precision") for entry in bundle.onnx_entries().values()}
    return tuple(p for p in ("fp32", "fp16") if p in present)


def plan_builds(
    bundle: Bundle,
    *,
    folds: Sequence[Fold],
    precisions: Sequence[str],
    gpus: Sequence[GpuInfo],
    trt_version: str,
    batch_profile: BatchProfile | None,
    workspace_gib: float,
) -> list[BuildJob]:
    """One job per fold, precision and GPU kind among ``gpus``; refuses missing or malformed ONNX entries.

    Every problem is collected and raised once (BundleError), each naming the fix.
    """
    if workspace_gib <= 0:
        raise ConfigurationError(
            f"The builder workspace must be a positive number of GiB, got {workspace_gib}.", option="workspace_gib"
        )
    if not gpus:
        raise ConfigurationError("No GPU selected for the build.")
    problems: list[str] = []
    jobs: list[BuildJob] = []
    for fold in folds:
        for precision in precisions:
            key = onnx_key(fold, precision)
            entry = bundle.onnx_entries().get(key)
            if entry is None:
                problems.append(f"no ONNX export {key} (run `{export_command(bundle.path, precision)}`)")
                continue
            stale = bundle.stale_onnx_reason(fold, entry)
            if stale is not None:
                problems.append(f"ONNX export {key} {stale} (run `{export_command(bundle.path, precision)}`)")
                continue
            shape = entry.get("input", {}).get("shape", [])
            if len(shape) < 3 or not isinstance(shape[0], str) or not all(isinstance(d, int) for d in shape[1:]):
                problems.append(
                    f"ONNX export {key} has input shape {shape}, not (batch, C, *patch) with a dynamic batch axis "
                    f"(re-run `{export_command(bundle.path, precision)}`)"
                )
                continue
            profile = batch_profile or BatchProfile.default_for(int(entry.get("max_batch", 1)))
            for gpu in one_per_kind(list(gpus)):
                jobs.append(
                    BuildJob(
                        fold=fold,
                        precision=precision,
                        gpu=gpu,
                        onnx_key=key,
                        onnx_file=entry["file"],
                        onnx_sha256=entry["sha256"],
                        input_name=entry.get("input", {}).get("name", "input"),
                        sample_shape=tuple(int(d) for d in shape[1:]),
                        key=engine_key(fold, precision, gpu, trt_version, entry["sha256"]),
                        engine_file=engine_relpath(fold, precision, gpu, trt_version, entry["sha256"]),
                        timing_cache_file=timing_cache_relpath(gpu, trt_version),
                        profile=profile,
                        workspace_gib=workspace_gib,
                    )
                )
    if problems:
        raise BundleError(f"Bundle {bundle.path} cannot be built: {'; '.join(problems)}.")
    return jobs


def require_tensorrt_and_cuda() -> tuple[str, list[GpuInfo]]:
    """TensorRT's version and the CUDA devices, or one sentence saying which is missing."""
    from tucker_export.engines.tensorrt_backend import import_tensorrt

    trt = import_tensorrt()  # BackendUnavailableError in one sentence when absent
    devices = cuda_devices()
    if not devices:
        raise BackendUnavailableError(
            f"TensorRT {trt.__version__} is installed but no CUDA GPU is visible, so no engine can be built here."
        )
    return str(trt.__version__), devices


def _plan_requested_builds(
    bundle: Bundle,
    *,
    precisions: Sequence[str] | None,
    gpus: str,
    devices: list[GpuInfo],
    batch_profile: BatchProfile | str | None,
    workspace_gib: float,
    folds: Sequence[Fold] | None,
    trt_version: str,
) -> list[BuildJob]:
    """``build_engines``' arguments as parsed selections, handed to ``plan_builds``."""
    from tucker_export.exporter.onnx_export import normalize_precisions

    if isinstance(batch_profile, str):
        batch_profile = BatchProfile.parse(batch_profile)
    selected_precisions = normalize_precisions(precisions) if precisions else available_precisions(bundle)
    if not selected_precisions:
        raise BundleError(
            f"Bundle {bundle.path} has no ONNX export to build from; run `{export_command(bundle.path, 'fp16')}` first."
        )
    selected_gpus = parse_gpu_selection(gpus, devices)
    return plan_builds(
        bundle,
        folds=bundle.resolve_folds(list(folds) if folds else None),
        precisions=selected_precisions,
        gpus=selected_gpus,
        trt_version=trt_version,
        batch_profile=batch_profile,
        workspace_gib=workspace_gib,
    )


def _remove_superseded_engines(bundle: Bundle, job: BuildJob, engine_path: Path) -> None:
    """Drop the records (and files) of older engines for the same fold, precision and GPU kind as ``job``.

    An older record may point at the path just written (another key, the same file), and that file must stay.
    """
    for old_key in superseded_records(bundle.engine_records(), fold=job.fold, precision=job.precision, gpu=job.gpu, keep_key=job.key):
        old = bundle.engine_records(ENGINES_SECTION)[old_key]
        old_path = bundle.artifact_path(old.get("file", ""))
        if old.get("file") and old_path.is_file() and old_path != engine_path:
            old_path.unlink()
        bundle.remove_record(ENGINES_SECTION, old_key)
        logger.info("Replaced engine %s", old_key)


def _build_and_record_engine(bundle: Bundle, job: BuildJob, trt_version: str) -> dict[str, Any]:
    """Build ``job``'s engine with TensorRT, write it and the updated timing cache, and record it; the record."""
    from tucker_export.bundle import utc_now
    from tucker_export.engines.tensorrt_backend import build_serialized_engine

    onnx_path = bundle.verify_file(job.onnx_file, job.onnx_sha256)
    cache_path = bundle.artifact_path(job.timing_cache_file)
    logger.info("Building %s on GPU %d (%s), batch %s", job.key, job.gpu.index, job.gpu.name, job.profile)
    built = build_serialized_engine(
        onnx_path,
        precision=job.precision,
        input_name=job.input_name,
        sample_shape=job.sample_shape,
        profile=job.profile,
        workspace_gib=job.workspace_gib,
        timing_cache=cache_path.read_bytes() if cache_path.is_file() else None,
        device_index=job.gpu.index,
    )
    engine_path = bundle.artifact_path(job.engine_file)
    write_bytes_atomic(engine_path, built.engine)
    write_bytes_atomic(cache_path, built.timing_cache)
    record = engine_record(
        key=job.key,
        fold=job.fold,
        precision=job.precision,
        gpu=job.gpu,
        trt_version=trt_version,
        trt_api=built.api.to_dict(),
        onnx_key=job.onnx_key,
        onnx_entry=bundle.onnx_entries()[job.onnx_key],
        engine_file=job.engine_file,
        engine_sha256=sha256_file(engine_path),
        size_bytes=len(built.engine),
        profile=job.profile,
        workspace_gib=job.workspace_gib,
        tf32=built.settings.tf32,
        timing_cache_file=job.timing_cache_file,
        build_seconds=built.seconds,
        built=utc_now(),
    )
    _remove_superseded_engines(bundle, job, engine_path)
    bundle.record(ENGINES_SECTION, job.key, record)
    return record


def build_engines(
    bundle: Bundle | str | Path,
    precisions: Sequence[str] | None = None,
    gpus: str = "all",
    batch_profile: BatchProfile | str | None = None,
    workspace_gib: float = DEFAULT_WORKSPACE_GIB,
    *,
    folds: Sequence[Fold] | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Build one engine per fold, precision and GPU kind present, record each in ``bundle.json``; returns the records.

    ``precisions=None`` builds every precision the bundle has an ONNX export for.
    ``batch_profile`` is ``MIN:OPT:MAX`` (default ``1:max_batch:max_batch`` from the export).
    Raises BackendUnavailableError in one sentence without tensorrt or a CUDA GPU.
    """
    from tqdm.auto import tqdm

    from tucker_export.bundle import Bundle

    # Without TensorRT or a GPU nothing below can happen: say so before reading anything else.
    trt_version, devices = require_tensorrt_and_cuda()
    bundle = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
    jobs = _plan_requested_builds(
        bundle,
        precisions=precisions,
        gpus=gpus,
        devices=devices,
        batch_profile=batch_profile,
        workspace_gib=workspace_gib,
        folds=folds,
        trt_version=trt_version,
    )
    return [
        _build_and_record_engine(bundle, job, trt_version)
        for job in tqdm(jobs, desc="build", unit="engine", disable=not progress)
    ]


def format_build_table(records: Sequence[dict[str, Any]]) -> str:
    lines = [f"{'engine':<60} {'batch':>7} {'MB':>7} {'s':>6}"]
    for r in records:
        p = r["profile"]
        lines.append(
            f"{r['file']:<60} {p['min']}:{p['opt']}:{p['max']:>3} {r['size_bytes'] / 1e6:>7.1f} {r['build_seconds']:>6.1f}"
        )
    return "\n".join(lines)
