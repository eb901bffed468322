"""CPU engine keys and manifest records: every OpenVINO decision that is not an OpenVINO call.

A compiled OpenVINO model (``CompiledModel.export_model``) holds kernels chosen for the CPU's
instruction set (AVX-512, AMX) by one OpenVINO build, and only means something for the ONNX file
it was compiled from. So it is filed, like a TensorRT engine, under a key made of exactly those
things, and loading checks each of them against the machine and the bundle first; a foreign or
stale entry is refused (and rebuilt by ``infer``), never used.

Key::

    fold_<f>.<precision>.<cpu-kind>.ov<version>.<onnx sha256[:12]>
    e.g. fold_0.bf16.intel-xeon-processor-f6m143-avx512-vnni-bf16-amx.ov2026.4.1.3f2a9c01b7de

``cpu-kind`` is the CPU's model name as a slug, its family/model numbers and the instruction-set
features OpenVINO's kernels depend on. Paths inside the bundle::

    cpu_engines/<cpu-kind>/fold_<f>.<precision>.ov<version>.<sha12>.blob
"""

from __future__ import annotations

import platform
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tucker_export.bundle import CPU_ENGINES_SECTION
from tucker_export.engines.keys import same_slot_records, sha_prefix, slug
from tucker_export.errors import ConfigurationError, EngineError, EngineMismatchError

CPU_PRECISIONS = ("fp32", "bf16", "int8")

# Instruction-set features that change which kernels OpenVINO's CPU plugin compiles, in key order.
_KEY_FEATURES = (
    ("avx512", ("avx512f",)),
    ("vnni", ("avx512_vnni", "avx_vnni")),
    ("bf16", ("avx512_bf16",)),
    ("amx", ("amx_bf16", "amx_int8", "amx_tile")),
)


@dataclass(frozen=True)
class CpuInfo:
    """The CPU as OpenVINO's kernels care about it."""

    model_name: str
    family: int | None = None
    model: int | None = None
    flags: frozenset[str] = field(default_factory=frozenset)

    @property
    def features(self) -> tuple[str, ...]:
        """``('avx512', 'vnni', 'bf16', 'amx')``-style: the key features this CPU has."""
        return tuple(name for name, flags in _KEY_FEATURES if any(f in self.flags for f in flags))

    @property
    def kind(self) -> str:
        """CPUs of one kind share compiled models: model name, family/model, key features."""
        family_model = f"f{self.family}m{self.model}" if self.family is not None and self.model is not None else ""
        parts = [slug(_trim_model_name(self.model_name)), family_model, *self.features]
        return "-".join(part for part in parts if part) or "unknown-cpu"

    @property
    def has_native_bf16(self) -> bool:
        return "avx512_bf16" in self.flags or "amx_bf16" in self.flags

    @property
    def has_amx(self) -> bool:
        return "amx_bf16" in self.flags or "amx_int8" in self.flags

    def describe(self) -> str:
        features = ", ".join(self.features) or "no AVX-512/VNNI/AMX"
        return f"{self.model_name} ({features})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "family": self.family,
            "model": self.model,
            "features": list(self.features),
            "kind": self.kind,
        }


def _trim_model_name(name: str) -> str:
    """``Intel(R) Xeon(R) Platinum 8480+ CPU @ 2.00GHz`` -> ``Intel Xeon Platinum 8480+``: marks and clock
    say nothing about the kernels."""
    name = re.sub(r"\((R|TM|r|tm)\)", "", name)
    name = re.sub(r"@.*$", "", name)
    name = re.sub(r"\b(CPU|Processor)\b", "", name)
    return " ".join(name.split())


def parse_cpuinfo(text: str) -> CpuInfo:
    """The first processor block of ``/proc/cpuinfo``."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        name, _, value = line.partition(":")
        fields.setdefault(name.strip(), value.strip())

    def number(name: str) -> int | None:
        value = fields.get(name, "")
        return int(value) if value.isdigit() else None

    return CpuInfo(
        model_name=fields.get("model name") or fields.get("Model name") or platform.processor() or "unknown CPU",
        family=number("cpu family"),
        model=number("model"),
        flags=frozenset(fields.get("flags", "").split()),
    )


def detect_cpu(cpuinfo_path: str | Path = "/proc/cpuinfo") -> CpuInfo:
    """This machine's CPU (Linux ``/proc/cpuinfo``; elsewhere only the model name, no features)."""
    try:
        return parse_cpuinfo(Path(cpuinfo_path).read_text(errors="replace"))
    except OSError:
        return CpuInfo(model_name=platform.processor() or platform.machine() or "unknown CPU")


def normalize_cpu_precision(precision: str) -> str:
    name = {"float32": "fp32", "f32": "fp32", "bfloat16": "bf16"}.get(precision.strip().lower(), precision.strip().lower())
    if name not in CPU_PRECISIONS:
        raise ConfigurationError(f"OpenVINO precision {precision!r} is not one of {', '.join(CPU_PRECISIONS)}.")
    return name


def check_precision_supported(precision: str, cpu: CpuInfo, capabilities: list[str] | tuple[str, ...]) -> None:
    """bf16 only where OpenVINO reports BF16 for this CPU; int8 where it reports INT8."""
    wanted = {"bf16": "BF16", "int8": "INT8"}.get(precision)
    if wanted and wanted not in capabilities:
        raise EngineError(
            f"This CPU ({cpu.describe()}) has no {precision} support in OpenVINO (it reports "
            f"{', '.join(capabilities) or 'nothing'}).", option="precision", use="fp32",
        )


# ---- keys and paths -----------------------------------------------------------------------------


def short_openvino_version(full_version: str) -> str:
    """``2026.4.1-22982-e213a147257-releases/2026/4`` -> ``2026.4.1``."""
    return full_version.split("-", 1)[0].strip() or "unknown"


def cpu_engine_key(fold: Any, precision: str, cpu: CpuInfo, openvino_version: str, onnx_sha256: str) -> str:
    return f"fold_{fold}.{precision}.{cpu.kind}.ov{short_openvino_version(openvino_version)}.{sha_prefix(onnx_sha256)}"


def cpu_engine_relpath(fold: Any, precision: str, cpu: CpuInfo, openvino_version: str, onnx_sha256: str) -> str:
    version = short_openvino_version(openvino_version)
    return f"{CPU_ENGINES_SECTION}/{cpu.kind}/fold_{fold}.{precision}.ov{version}.{sha_prefix(onnx_sha256)}.blob"


def cpu_build_command(bundle_path: Any, precision: str) -> str:
    extra = " --calibration-dir SCANS" if precision == "int8" else ""
    return f"tucker-export build {bundle_path} --backend openvino --precision {precision}{extra}"


# ---- manifest records ---------------------------------------------------------------------------


def cpu_engine_record(
    *,
    key: str,
    fold: Any,
    precision: str,
    cpu: CpuInfo,
    openvino_version: str,
    onnx_key: str,
    onnx_entry: dict[str, Any],
    engine_file: str | None,
    engine_sha256: str | None,
    size_bytes: int,
    gate: dict[str, Any],
    latency_ms: float | None,
    calibration: dict[str, Any] | None,
    compile_seconds: float,
    built: str,
) -> dict[str, Any]:
    """The ``bundle.json`` entry of one compiled CPU model: what ``cpu_engine_mismatch`` compares, and how it did."""
    return {
        "key": key,
        "backend": "openvino",
        "file": engine_file,
        "sha256": engine_sha256,
        "size_bytes": size_bytes,
        "fold": fold,
        "precision": precision,
        "cpu": cpu.to_dict(),
        "openvino": {"version": openvino_version},
        "onnx": {"key": onnx_key, "file": onnx_entry["file"], "sha256": onnx_entry["sha256"]},
        "input": onnx_entry.get("input", {}),
        "output": onnx_entry.get("output", {}),
        "gate": gate,
        "latency_ms": latency_ms,
        "calibration": calibration,
        "compile_seconds": round(compile_seconds, 2),
        "built": built,
    }


def cpu_engine_mismatch(
    record: dict[str, Any], *, cpu: CpuInfo, openvino_version: str, onnx_sha256: str | None
) -> str | None:
    """Why ``record`` cannot be used here (a clause for a sentence), or None when it fits."""
    built_cpu = record.get("cpu", {})
    if built_cpu.get("kind") != cpu.kind:
        return f"was compiled for {built_cpu.get('kind', 'an unknown CPU')} and this CPU is {cpu.kind}"
    built_version = record.get("openvino", {}).get("version")
    if built_version != openvino_version:
        return f"was compiled with OpenVINO {built_version} and this machine has OpenVINO {openvino_version}"
    if onnx_sha256 is None:
        return "was compiled from an ONNX export that is no longer in the bundle"
    built_onnx = record.get("onnx", {}).get("sha256")
    if built_onnx != onnx_sha256:
        return (
            f"was compiled from an older ONNX export (sha256 {sha_prefix(built_onnx or '')}, now "
            f"{sha_prefix(onnx_sha256)})"
        )
    return None


def cpu_engine_candidates(records: Mapping[str, dict[str, Any]], *, fold: Any, precision: str) -> list[dict[str, Any]]:
    return [
        r for r in records.values()
        if str(r.get("fold")) == str(fold) and r.get("precision") == precision
    ]


def find_cpu_engine_record(
    records: Mapping[str, dict[str, Any]],
    *,
    fold: Any,
    precision: str,
    cpu: CpuInfo,
    openvino_version: str,
    bundle_path: Any,
    onnx_sha256: str | None,
) -> dict[str, Any]:
    """The record for ``fold``/``precision`` that fits this CPU, OpenVINO and ONNX file.

    Raises EngineMismatchError (one sentence, with the rebuild command) when the bundle has
    compiled models for this fold and precision but none fits, EngineError when it has none.
    """
    candidates = cpu_engine_candidates(records, fold=fold, precision=precision)
    command = cpu_build_command(bundle_path, precision)
    if not candidates:
        raise EngineError(
            f"Bundle {bundle_path} has no OpenVINO {precision} model for fold {fold}; build one with `{command}`."
        )
    reasons = []
    for record in candidates:
        reason = cpu_engine_mismatch(record, cpu=cpu, openvino_version=openvino_version, onnx_sha256=onnx_sha256)
        if reason is None:
            return record
        reasons.append((record, reason))
    same_kind = [item for item in reasons if item[0].get("cpu", {}).get("kind") == cpu.kind]
    _, reason = (same_kind or reasons)[0]
    raise EngineMismatchError(
        f"The OpenVINO {precision} model of fold {fold} {reason}; rebuild it with `{command}`."
    )


def superseded_cpu_records(records: Mapping[str, dict[str, Any]], *, fold: Any, precision: str, cpu: CpuInfo, keep_key: str) -> list[str]:
    """Keys of older compiled models of the same fold, precision and CPU kind that a new build replaces."""
    return same_slot_records(records, fold=fold, precision=precision, device=("cpu", cpu.kind), keep_key=keep_key)
