"""Engine keys, batch profiles, timing-cache paths and manifest records: every TensorRT decision that is not a TensorRT call.

A serialized TensorRT engine runs only on the GPU model (compute capability) and the exact
TensorRT version it was built with, and only means something for the ONNX file it was built
from. So an engine is filed under a key made of exactly those things, and loading checks each of
them against the machine and the bundle before handing the bytes to TensorRT.

Key::

    fold_<f>.<precision>.<gpu-kind>.trt<version>.<onnx sha256[:12]>
    e.g. fold_0.fp16.nvidia-h200-sm90.trt10.8.0.43.3f2a9c01b7de

``gpu-kind`` is the GPU's name as a slug plus its compute capability; GPUs of the same kind share
engines and one timing cache. Paths inside the bundle::

    engines/<gpu-kind>/fold_<f>.<precision>.trt<version>.<sha12>.engine
    timing_caches/<gpu-kind>.trt<version>.cache   (timing caches are TensorRT-version specific)
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

# The bundle owns its section names and the export command; they are re-exported for the engine modules.
from tucker_export.bundle import ENGINES_SECTION, export_command  # noqa: F401
from tucker_export.errors import ConfigurationError, EngineError, EngineMismatchError

# ---- GPUs ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuInfo:
    """One CUDA device as TensorRT cares about it."""

    index: int
    name: str
    compute_capability: tuple[int, int]
    total_memory_bytes: int = 0

    @property
    def sm(self) -> str:
        return f"sm{self.compute_capability[0]}{self.compute_capability[1]}"

    @property
    def kind(self) -> str:
        """``nvidia-h200-sm90``: engines and timing caches are shared by GPUs of one kind."""
        return f"{slug(self.name)}-{self.sm}"

    def describe(self) -> str:
        return f"{self.name} ({self.sm})"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["compute_capability"] = list(self.compute_capability)
        data["kind"] = self.kind
        return data


def slug(text: str) -> str:
    """Lower case, runs of anything but letters and digits become one '-'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def cuda_devices() -> list[GpuInfo]:
    """The CUDA devices torch sees (empty without CUDA); torch is already a dependency, so no extra package."""
    import torch

    if not torch.cuda.is_available():
        return []
    devices = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        devices.append(GpuInfo(index, props.name, (props.major, props.minor), int(props.total_memory)))
    return devices


def parse_gpu_selection(selection: str, devices: list[GpuInfo]) -> list[GpuInfo]:
    """``all`` or a comma list of device indices (``0,1``) -> those devices; unknown indices are refused."""
    text = selection.strip().lower()
    if not devices:
        raise EngineError("No CUDA device is visible, so no GPU can be selected.")
    if text in ("", "all"):
        return list(devices)
    by_index = {d.index: d for d in devices}
    chosen: list[GpuInfo] = []
    for part in text.replace(" ", "").split(","):
        if not part.isdigit():
            raise ConfigurationError(f"The GPU selection is 'all' or device numbers like 0,1; got {selection!r}.",
                                     option="gpus")
        index = int(part)
        if index not in by_index:
            have = ", ".join(str(i) for i in by_index)
            raise ConfigurationError(f"GPU {index} does not exist on this machine (devices: {have}).")
        if by_index[index] not in chosen:
            chosen.append(by_index[index])
    return chosen


def one_per_kind(gpus: list[GpuInfo]) -> list[GpuInfo]:
    """The first GPU of each kind: an engine built on one H200 runs on every H200."""
    seen: dict[str, GpuInfo] = {}
    for gpu in gpus:
        seen.setdefault(gpu.kind, gpu)
    return list(seen.values())


# ---- batch profiles -----------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchProfile:
    """TensorRT optimization profile of the batch axis: engines accept min..max, tuned for opt."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise ConfigurationError(
                f"Batch profile {self.min}:{self.opt}:{self.max} must satisfy 1 <= MIN <= OPT <= MAX."
            )

    @classmethod
    def parse(cls, text: str) -> BatchProfile:
        """``MIN:OPT:MAX`` (e.g. ``1:2:4``); a single number ``N`` means ``N:N:N``."""
        parts = text.strip().split(":")
        if len(parts) == 1:
            parts = parts * 3
        if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
            raise ConfigurationError(f"Batch profile {text!r} is not MIN:OPT:MAX with whole numbers, e.g. 1:2:4.")
        return cls(*(int(p) for p in parts))

    @classmethod
    def default_for(cls, max_batch: int) -> BatchProfile:
        """Tuned for the largest batch (the predictor fills batches with tiles and mirror variants)."""
        return cls(1, max_batch, max_batch)

    def shapes(self, sample_shape: tuple[int, ...] | list[int]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """min/opt/max input shapes for ``set_shape`` from the per-sample shape ``(C, *patch)``."""
        sample = tuple(int(s) for s in sample_shape)
        return (self.min, *sample), (self.opt, *sample), (self.max, *sample)

    def check_batch(self, batch: int) -> None:
        if not self.min <= batch <= self.max:
            raise EngineError(
                f"Batch {batch} is outside the engine's profile {self}; rebuild it with a batch profile covering it.",
                option="batch_profile",
            )

    def __str__(self) -> str:
        return f"{self.min}:{self.opt}:{self.max}"

    def to_dict(self) -> dict[str, int]:
        return {"min": self.min, "opt": self.opt, "max": self.max}

    @classmethod
    def from_dict(cls, data: dict[str, int]) -> BatchProfile:
        return cls(int(data["min"]), int(data["opt"]), int(data["max"]))


def split_batch(batch: int, profile: BatchProfile) -> list[tuple[int, int]]:
    """(start, stop) slices that keep every engine call within ``profile.max``."""
    return [(start, min(start + profile.max, batch)) for start in range(0, batch, profile.max)]


# ---- keys and paths -----------------------------------------------------------------------------


def sha_prefix(sha256: str) -> str:
    return sha256[:12]


def engine_key(fold: Any, precision: str, gpu: GpuInfo, trt_version: str, onnx_sha256: str) -> str:
    return f"fold_{fold}.{precision}.{gpu.kind}.trt{trt_version}.{sha_prefix(onnx_sha256)}"


def engine_relpath(fold: Any, precision: str, gpu: GpuInfo, trt_version: str, onnx_sha256: str) -> str:
    return f"engines/{gpu.kind}/fold_{fold}.{precision}.trt{trt_version}.{sha_prefix(onnx_sha256)}.engine"


def timing_cache_relpath(gpu: GpuInfo, trt_version: str) -> str:
    return f"timing_caches/{gpu.kind}.trt{trt_version}.cache"


def rebuild_command(bundle_path: Any, precision: str) -> str:
    return f"tucker-export build {bundle_path} --precision {precision}"


# ---- manifest records ---------------------------------------------------------------------------


def engine_record(
    *,
    key: str,
    fold: Any,
    precision: str,
    gpu: GpuInfo,
    trt_version: str,
    trt_api: dict[str, Any],
    onnx_key: str,
    onnx_entry: dict[str, Any],
    engine_file: str,
    engine_sha256: str,
    size_bytes: int,
    profile: BatchProfile,
    workspace_gib: float,
    tf32: bool,
    timing_cache_file: str,
    build_seconds: float,
    built: str,
) -> dict[str, Any]:
    """The ``bundle.json`` entry of one engine: everything ``check_engine_record`` compares, and how it was built."""
    return {
        "key": key,
        "file": engine_file,
        "sha256": engine_sha256,
        "size_bytes": size_bytes,
        "fold": fold,
        "precision": precision,
        "gpu": {"name": gpu.name, "compute_capability": list(gpu.compute_capability), "kind": gpu.kind},
        "tensorrt": {"version": trt_version, **trt_api},
        "onnx": {"key": onnx_key, "file": onnx_entry["file"], "sha256": onnx_entry["sha256"]},
        "input": onnx_entry.get("input", {}),
        "output": onnx_entry.get("output", {}),
        "profile": profile.to_dict(),
        "workspace_gib": workspace_gib,
        "tf32": tf32,
        "strongly_typed": True,
        "timing_cache": timing_cache_file,
        "build_seconds": round(build_seconds, 1),
        "built": built,
    }


def engine_mismatch(
    record: dict[str, Any], *, gpu: GpuInfo, trt_version: str, onnx_sha256: str | None
) -> str | None:
    """Why ``record`` cannot be used here (a clause for a sentence), or None when it fits."""
    built_gpu = record.get("gpu", {})
    built_cc = tuple(built_gpu.get("compute_capability", ()))
    if built_gpu.get("name") != gpu.name or built_cc != gpu.compute_capability:
        cc = f"sm{built_cc[0]}{built_cc[1]}" if len(built_cc) == 2 else "unknown sm"
        return f"was built for {built_gpu.get('name', 'an unknown GPU')} ({cc}) and this GPU is {gpu.describe()}"
    built_trt = record.get("tensorrt", {}).get("version")
    if built_trt != trt_version:
        return f"was built with TensorRT {built_trt} and this machine has TensorRT {trt_version}"
    built_onnx = record.get("onnx", {}).get("sha256")
    if onnx_sha256 is None:
        return "was built from an ONNX export that is no longer in the bundle"
    if built_onnx != onnx_sha256:
        return (
            f"was built from an older ONNX export (sha256 {sha_prefix(built_onnx or '')}, now "
            f"{sha_prefix(onnx_sha256)})"
        )
    return None


def find_engine_record(
    records: Mapping[str, dict[str, Any]],
    *,
    onnx_sha256: str | None,
    fold: Any,
    precision: str,
    gpu: GpuInfo,
    trt_version: str,
    bundle_path: Any,
) -> dict[str, Any]:
    """Among ``records`` (a bundle's TensorRT engine records), the one for ``fold``/``precision`` that fits
    this GPU, TensorRT and the current ONNX export (checksum ``onnx_sha256``, None when there is none).

    Raises EngineMismatchError with one sentence and the rebuild command when the bundle has
    engines for this fold and precision but none fits, and EngineError when it has none at all.
    """
    candidates = [
        r for r in records.values()
        if str(r.get("fold")) == str(fold) and r.get("precision") == precision
    ]
    command = rebuild_command(bundle_path, precision)
    if not candidates:
        raise EngineError(f"Bundle {bundle_path} has no TensorRT engine for fold {fold} {precision}; build one with `{command}`.")
    reasons = []
    for record in candidates:
        reason = engine_mismatch(record, gpu=gpu, trt_version=trt_version, onnx_sha256=onnx_sha256)
        if reason is None:
            return record
        reasons.append((record, reason))
    # Prefer the explanation about an engine for this GPU kind (TensorRT or ONNX changed) over
    # one about another GPU: it is the one the user most likely expected to load.
    same_kind = [item for item in reasons if item[0].get("gpu", {}).get("kind") == gpu.kind]
    record, reason = (same_kind or reasons)[0]
    raise EngineMismatchError(f"The TensorRT engine for fold {fold} {precision} {reason}; rebuild it with `{command}`.")


def check_engine_file(record: dict[str, Any], actual_sha256: str, bundle_path: Any) -> None:
    if actual_sha256 != record.get("sha256"):
        raise EngineMismatchError(
            f"Engine file {record.get('file')} differs from the one recorded in the manifest (sha256 "
            f"{sha_prefix(actual_sha256)}, recorded {sha_prefix(record.get('sha256') or '')}); rebuild it with "
            f"`{rebuild_command(bundle_path, record.get('precision', 'fp16'))}`."
        )


def superseded_records(records: Mapping[str, dict[str, Any]], *, fold: Any, precision: str, gpu: GpuInfo, keep_key: str) -> list[str]:
    """Keys of older engines of the same fold, precision and GPU kind that a new build replaces."""
    return same_slot_records(records, fold=fold, precision=precision, device=("gpu", gpu.kind), keep_key=keep_key)


def same_slot_records(
    records: Mapping[str, dict[str, Any]], *, fold: Any, precision: str, device: tuple[str, str], keep_key: str
) -> list[str]:
    """Keys other than ``keep_key`` of records for the same fold, precision and device kind.

    ``device`` is the record field and kind, ``("gpu", kind)`` for TensorRT engines and ``("cpu", kind)``
    for OpenVINO models: one slot holds one engine, so a new build replaces these.
    """
    field, kind = device
    return [
        key for key, r in records.items()
        if key != keep_key
        and str(r.get("fold")) == str(fold)
        and r.get("precision") == precision
        and r.get(field, {}).get("kind") == kind
    ]
