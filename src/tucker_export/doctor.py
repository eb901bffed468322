"""`tucker-export doctor`: what this machine can run, and why not the rest.

Every probe is defensive: a missing or broken optional package is reported, never raised,
because the point of the command is to explain an environment that may be half set up.
"""

from __future__ import annotations

import importlib
import platform
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from tucker_export.engines.keys import GpuInfo, cuda_devices


@dataclass
class Backend:
    name: str
    usable: bool
    why: str


@dataclass
class CpuReport:
    """The CPU as the CPU engines see it: model, the ISA features that matter, OpenVINO's precisions."""

    model_name: str
    kind: str
    features: list[str]
    openvino_capabilities: list[str]
    precisions: dict[str, str]  # fp32/bf16/int8 -> "yes (...)" or "no: why"


@dataclass
class Diagnostics:
    python: str
    platform: str
    packages: dict[str, str]
    onnxruntime_providers: list[str]
    cuda_devices: list[GpuInfo]
    backends: list[Backend] = field(default_factory=list)
    cpu: CpuReport | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _package_version(module_name: str) -> str:
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return "not installed"
    except Exception as error:  # a broken install (e.g. missing shared library) is worth reporting
        return f"broken ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
    return str(getattr(module, "__version__", "unknown"))


def _nnunet_version() -> str:
    from tucker_export._env import package_version

    return package_version("nnunetv2")


def onnxruntime_providers() -> list[str]:
    try:
        import onnxruntime
    except ImportError:
        return []
    return list(onnxruntime.get_available_providers())


def openvino_capabilities() -> tuple[list[str], str | None]:
    """OpenVINO's CPU capabilities, or why there are none."""
    try:
        from tucker_export.engines.openvino_backend import cpu_capabilities

        return cpu_capabilities(), None
    except Exception as error:  # BackendUnavailableError, or a broken install
        return [], str(error).splitlines()[0] if str(error) else type(error).__name__


def cpu_precisions(features: list[str], capabilities: list[str], problem: str | None) -> dict[str, str]:
    """Which OpenVINO CPU precisions work here, and on which units (plain logic, tested with fake CPUs)."""
    if problem is not None:
        return {p: f"no: {problem}" for p in ("fp32", "bf16", "int8")}
    bf16_units = "AMX" if "amx" in features else "AVX512-BF16" if "bf16" in features else "emulated"
    int8_units = "AMX" if "amx" in features else "VNNI" if "vnni" in features else "no VNNI"
    return {
        "fp32": "yes" + (" (AVX-512)" if "avx512" in features else ""),
        "bf16": f"yes ({bf16_units})" if "BF16" in capabilities else "no: OpenVINO reports no BF16 on this CPU",
        "int8": f"yes ({int8_units}; calibrate with build --calibration-dir)" if "INT8" in capabilities
        else "no: OpenVINO reports no INT8 on this CPU",
    }


def backend_availability(
    packages: dict[str, str], providers: list[str], devices: list[GpuInfo]
) -> list[Backend]:
    """Which inference backends work here, each with the reason (plain logic, tested without GPUs)."""
    has_cuda = bool(devices)
    torch_ok = not packages["torch"].startswith(("not installed", "broken"))
    ort_ok = not packages["onnxruntime"].startswith(("not installed", "broken"))
    trt_ok = not packages["tensorrt"].startswith(("not installed", "broken"))
    backends = [
        Backend("torch (cpu)", torch_ok, "PyTorch imports" if torch_ok else f"torch is {packages['torch']}"),
        Backend(
            "torch (cuda)",
            torch_ok and has_cuda,
            "a CUDA device is visible to PyTorch" if has_cuda else "no CUDA device visible to PyTorch",
        ),
        Backend(
            "ort (cpu)",
            ort_ok and "CPUExecutionProvider" in providers,
            "onnxruntime has the CPU provider" if ort_ok else f"onnxruntime is {packages['onnxruntime']}",
        ),
    ]
    for provider, label in (("CUDAExecutionProvider", "ort (cuda)"),):
        if provider not in providers:
            why = f"onnxruntime has no {provider}: install the `gpu` extra (onnxruntime-gpu)"
        elif not has_cuda:
            why = f"{provider} is installed but no CUDA device is visible"
        else:
            why = f"{provider} available"
        backends.append(Backend(label, provider in providers and has_cuda, why))
    if not trt_ok:
        trt_why = "tensorrt is not installed: install the `trt` extra on a machine with an NVIDIA GPU"
    elif not has_cuda:
        trt_why = f"tensorrt {packages['tensorrt']} is installed but no CUDA device is visible"
    else:
        trt_why = f"tensorrt {packages['tensorrt']} with {len(devices)} CUDA device(s)"
    backends.append(Backend("trt", trt_ok and has_cuda, trt_why))
    ov_version = packages.get("openvino", "not installed")
    ov_ok = not ov_version.startswith(("not installed", "broken"))
    backends.append(Backend(
        "openvino (cpu)", ov_ok,
        f"openvino {ov_version} (CPU plugin)" if ov_ok else f"openvino is {ov_version}: `pip install openvino`",
    ))
    return backends


def collect_diagnostics() -> Diagnostics:
    packages = {
        "tucker_export": _package_version("tucker_export"),
        "torch": _package_version("torch"),
        "nnunetv2": _nnunet_version(),
        "onnx": _package_version("onnx"),
        "onnxruntime": _package_version("onnxruntime"),
        "tensorrt": _package_version("tensorrt"),
        "openvino": _package_version("openvino"),
    }
    providers = onnxruntime_providers()
    devices = cuda_devices()
    from tucker_export.engines.cpu_keys import detect_cpu

    cpu = detect_cpu()
    capabilities, problem = openvino_capabilities()
    return Diagnostics(
        python=sys.version.split()[0],
        platform=platform.platform(),
        packages=packages,
        onnxruntime_providers=providers,
        cuda_devices=devices,
        backends=backend_availability(packages, providers, devices),
        cpu=CpuReport(cpu.model_name, cpu.kind, list(cpu.features), capabilities,
                      cpu_precisions(list(cpu.features), capabilities, problem)),
    )


def format_diagnostics(diagnostics: Diagnostics) -> str:
    lines = [f"python        {diagnostics.python} ({diagnostics.platform})"]
    for name, version in diagnostics.packages.items():
        lines.append(f"{name:<13} {version}")
    lines.append(f"ort providers {', '.join(diagnostics.onnxruntime_providers) or 'none'}")
    if diagnostics.cuda_devices:
        for device in diagnostics.cuda_devices:
            lines.append(
                f"cuda:{device.index}        {device.name}, compute capability "
                f"{'.'.join(map(str, device.compute_capability))}, {device.total_memory_bytes / 2**30:.1f} GiB"
            )
    else:
        lines.append("cuda devices  none")
    if diagnostics.cpu is not None:
        cpu = diagnostics.cpu
        lines.append(f"cpu           {cpu.model_name} ({', '.join(cpu.features) or 'no AVX-512/VNNI/AMX'}); kind {cpu.kind}")
        lines.append("cpu precisions (openvino) " + "; ".join(f"{k} {v}" for k, v in cpu.precisions.items()))
    lines.append("")
    lines.append("backends")
    for backend in diagnostics.backends:
        mark = "yes" if backend.usable else "no "
        lines.append(f"  {mark} {backend.name:<15} {backend.why}")
    return "\n".join(lines)
