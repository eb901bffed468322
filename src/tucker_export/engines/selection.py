"""Which backend runs a bundle here, and why.

``auto`` takes, in order:

1. a TensorRT engine, when the device is a CUDA GPU, tensorrt imports, and the bundle has an
   engine for every fold whose key matches this GPU, this TensorRT and the current ONNX export;
1b. on the CPU with ``--precision auto`` (or bf16/int8): OpenVINO, at the fastest precision whose
   compiled model passed its accuracy gate for this CPU kind (``tucker-export build --backend
   openvino``), else compiled and gated on first use at bf16 (where the CPU has it) or fp32;
2. ONNX Runtime on the best provider for the device (CUDA provider on a GPU when onnxruntime-gpu
   is installed, the CPU provider on the CPU), when the bundle has the ONNX exports;
3. PyTorch (eager; fp16 autocast on CUDA), which always works from the bundle's weights.

Each step that is skipped says why in the reason (e.g. "no TensorRT engine: ... was built for
another GPU; rebuild it with `tucker-export build ...`"), and the choice is logged. The decision
itself (``decide_backend``) is a pure function of what was found, tested without GPUs.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tucker_export.engines.keys import GpuInfo, cuda_devices, export_command, find_engine_record
from tucker_export.engines.runners import ORT_CUDA, OnnxRuntimeRunner, Runner, TensorRTRunner, TorchRunner
from tucker_export.errors import BackendUnavailableError, BundleError, ConfigurationError, TuckerExportError
from tucker_export.exporter.rebuild import build_network

if TYPE_CHECKING:
    import torch

    from tucker_export.bundle import Bundle
    from tucker_export.nnunet.loading import Fold

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "trt", "ort", "openvino", "torch")
PRECISIONS = ("auto", "fp32", "fp16", "bf16", "int8")
_ALIASES = {"tensorrt": "trt", "onnxruntime": "ort", "onnx": "ort", "pytorch": "torch", "ov": "openvino"}


def normalize_backend(choice: str) -> str:
    name = _ALIASES.get(choice.strip().lower(), choice.strip().lower())
    if name not in BACKENDS:
        raise ConfigurationError(f"Backend {choice!r} is not one of {', '.join(BACKENDS)}.")
    return name


def check_backend_precision(backend: str, precision: str) -> None:
    """bf16 and int8 are OpenVINO's; fp16 is TensorRT's, ORT's and CUDA autocast's."""
    if precision not in PRECISIONS:
        raise ConfigurationError(f"Precision {precision!r} is not one of {', '.join(PRECISIONS)}.")
    if precision in ("bf16", "int8") and backend not in ("auto", "openvino"):
        raise ConfigurationError(f"Precision {precision} runs on the openvino backend (the CPU), not {backend}.",
                                 option="backend", use="openvino")
    if precision == "fp16" and backend == "openvino":
        raise ConfigurationError("OpenVINO on the CPU runs fp32, bf16 or int8, not fp16.", option="precision", use="bf16")


def uses_openvino(backend: str, precision: str, device_type: str) -> bool:
    """Whether ``auto``/``openvino`` should look at OpenVINO: the CPU, and a precision it runs."""
    if device_type != "cpu":
        return False
    return backend == "openvino" or (backend == "auto" and precision in ("auto", "bf16", "int8"))


def onnx_precision(precision: str) -> str:
    """The ONNX export a precision runs from (``auto``/bf16/int8: fp32, which OpenVINO lowers itself)."""
    return "fp32" if precision in ("auto", "bf16", "int8") else precision


# ---- the decision -------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackendDecision:
    backend: str  # "trt", "ort" or "torch"
    reason: str


def _first_sentence(error: BaseException | str) -> str:
    text = str(error).strip()
    return text[:-1] if text.endswith(".") else text


def decide_backend(
    choice: str,
    *,
    device_type: str,
    precision: str,
    trt_problem: TuckerExportError | None,
    onnx_problem: TuckerExportError | None,
    ort_providers: Sequence[str],
    openvino_problem: TuckerExportError | None = None,
    openvino_note: str = "",
) -> BackendDecision:
    """Pure decision over what was found; an explicit choice that cannot run raises its problem.

    ``openvino_problem`` is only consulted when ``uses_openvino(choice, precision, device_type)``:
    None there means OpenVINO has a gated model (or just built one) for every fold.
    """
    choice = normalize_backend(choice)
    check_backend_precision(choice, precision)
    if choice == "openvino":
        if device_type != "cpu":
            raise BackendUnavailableError(f"OpenVINO runs on the CPU here, and the device is {device_type}.",
                                          option="device", use="cpu")
        if openvino_problem is not None:
            raise openvino_problem
        return BackendDecision("openvino", f"requested{f' ({openvino_note})' if openvino_note else ''}")
    if choice == "trt":
        if trt_problem is not None:
            raise trt_problem
        return BackendDecision("trt", "requested")
    if choice == "ort":
        if onnx_problem is not None:
            raise onnx_problem
        if device_type == "cuda" and ORT_CUDA not in ort_providers:
            raise BackendUnavailableError(
                "ONNX Runtime here has no CUDAExecutionProvider (the CPU-only onnxruntime wheel); install "
                "onnxruntime-gpu or run on the CPU.", option="device", use="cpu",
            )
        return BackendDecision("ort", f"requested ({'CUDA' if device_type == 'cuda' else 'CPU'} provider)")
    if choice == "torch":
        return BackendDecision("torch", "requested")

    # auto
    skipped: list[str] = []
    if uses_openvino(choice, precision, device_type):
        if openvino_problem is None:
            return BackendDecision("openvino", f"OpenVINO CPU{f' ({openvino_note})' if openvino_note else ''}")
        if precision in ("bf16", "int8"):
            raise openvino_problem
        skipped.append(f"no OpenVINO: {_first_sentence(openvino_problem)}")
    if device_type == "cuda":
        if trt_problem is None:
            return BackendDecision("trt", "a TensorRT engine matches this GPU, TensorRT version and ONNX export")
        skipped.append(f"no TensorRT: {_first_sentence(trt_problem)}")
    if onnx_problem is None:
        if device_type == "cpu":
            fp = " (fp32)" if precision == "auto" else ""
            return BackendDecision("ort", "; ".join([*skipped, f"ONNX Runtime CPU provider{fp}"]))
        if ORT_CUDA in ort_providers:
            return BackendDecision("ort", "; ".join([*skipped, "ONNX Runtime CUDA provider"]))
        skipped.append("no ONNX Runtime CUDA provider (CPU-only onnxruntime wheel)")
    else:
        skipped.append(f"no ONNX Runtime: {_first_sentence(onnx_problem)}")
    fp_note = " (fp32: autocast is CUDA-only)" if precision == "fp16" and device_type != "cuda" else ""
    return BackendDecision("torch", "; ".join([*skipped, f"PyTorch eager{fp_note}"]))


# ---- probing the bundle -------------------------------------------------------------------------


def _device_gpu(device: torch.device) -> GpuInfo:
    devices = {gpu.index: gpu for gpu in cuda_devices()}
    index = device.index or 0
    if index not in devices:
        raise BackendUnavailableError(f"CUDA device {index} is not visible (devices: {sorted(devices) or 'none'}).")
    return devices[index]


def engine_problem(bundle: Bundle, precision: str, folds: Sequence[Fold], device: torch.device) -> TuckerExportError | None:
    """None when every fold has a fitting TensorRT engine on ``device``, else the first reason why not."""
    from tucker_export.engines.tensorrt_backend import import_tensorrt

    if device.type != "cuda":
        return BackendUnavailableError(f"TensorRT runs on CUDA GPUs and the device is {device}.")
    try:
        trt = import_tensorrt()
        gpu = _device_gpu(device)
        for fold in folds:
            find_engine_record(
                bundle.engine_records(), onnx_sha256=bundle.onnx_sha256(fold, precision), fold=fold,
                precision=precision, gpu=gpu, trt_version=str(trt.__version__), bundle_path=bundle.path,
            )
    except TuckerExportError as error:
        return error
    return None


def onnx_problem(bundle: Bundle, precision: str, folds: Sequence[Fold]) -> TuckerExportError | None:
    """None when every fold has an ONNX export of ``precision`` on disk, else why not."""
    for fold in folds:
        try:
            entry = bundle.onnx_entry(fold, precision)
        except BundleError as error:
            return error
        if not bundle.artifact_path(entry["file"]).is_file():
            return BundleError(f"Bundle {bundle.path} lacks {entry['file']}; run `{export_command(bundle.path, precision)}`.")
    return None


@dataclass
class RunnerFactory:
    """Makes an (unopened) runner per fold for the chosen backend."""

    bundle: Bundle
    backend: str
    precision: str
    device: torch.device
    reason: str
    threads: int | None = None
    cpu_models: Any = None  # cpu_build.CpuModels for OpenVINO

    def __call__(self, fold: Fold) -> Runner:
        if self.backend == "trt":
            return self._tensorrt(fold)
        if self.backend == "openvino":
            from tucker_export.engines.runners import OpenVinoRunner

            return OpenVinoRunner(self.cpu_models.models[fold], precision=self.precision, threads=self.threads)
        if self.backend == "ort":
            entry = self.bundle.onnx_entry(fold, self.precision)
            path = self.bundle.verify_file(entry["file"], entry["sha256"])
            return OnnxRuntimeRunner(path, precision=self.precision, device=self.device, intra_op_threads=self.threads)
        bundle = self.bundle
        return TorchRunner(lambda: build_network(bundle, fold), precision=self.precision, device=self.device)

    def _tensorrt(self, fold: Fold) -> Runner:
        from tucker_export._io import sha256_file
        from tucker_export.engines.keys import check_engine_file
        from tucker_export.engines.tensorrt_backend import import_tensorrt

        record = find_engine_record(
            self.bundle.engine_records(), onnx_sha256=self.bundle.onnx_sha256(fold, self.precision), fold=fold,
            precision=self.precision, gpu=_device_gpu(self.device), trt_version=str(import_tensorrt().__version__),
            bundle_path=self.bundle.path,
        )
        path = self.bundle.artifact_path(record["file"])
        if not path.is_file():
            raise BundleError(f"Bundle {self.bundle.path} lacks {record['file']}; run `tucker-export build {self.bundle.path}`.")
        check_engine_file(record, sha256_file(path), self.bundle.path)
        return TensorRTRunner(path, precision=self.precision, device=self.device)


def select_backend(
    choice: str,
    bundle: Bundle,
    precision: str,
    device: str | torch.device,
    folds: Sequence[Fold] | None = None,
    *,
    tile_source: str | Path | None = None,
    threads: int | None = None,
) -> tuple[RunnerFactory, str]:
    """The runner factory for ``choice`` (``auto``, ``trt``, ``ort``, ``openvino``, ``torch``) and the reason; logs both.

    ``precision`` may be ``auto``: OpenVINO's fastest gated precision on the CPU, fp32 elsewhere.
    OpenVINO models missing for this CPU are compiled and gated here (on tiles of ``tile_source``,
    the scans about to be segmented, when given).
    """
    import onnxruntime as ort
    import torch

    device = torch.device(device)
    folds = bundle.resolve_folds(list(folds) if folds else None)
    choice = normalize_backend(choice)
    check_backend_precision(choice, precision)
    cpu_models = None
    openvino_problem: TuckerExportError | None = None
    if uses_openvino(choice, precision, device.type):
        from tucker_export.engines.cpu_build import resolve_cpu_models

        try:
            cpu_models = resolve_cpu_models(bundle, precision, folds, tile_source=tile_source, threads=threads)
        except TuckerExportError as error:
            openvino_problem = error
    plain_precision = onnx_precision(precision)
    needs_trt = choice == "trt" or (choice == "auto" and device.type == "cuda")
    decision = decide_backend(
        choice,
        device_type=device.type,
        precision=precision,
        trt_problem=engine_problem(bundle, plain_precision, folds, device) if needs_trt else None,
        onnx_problem=onnx_problem(bundle, plain_precision, folds) if choice in ("auto", "ort") else None,
        ort_providers=ort.get_available_providers(),
        openvino_problem=openvino_problem,
        openvino_note=cpu_models.note if cpu_models is not None else "",
    )
    resolved = cpu_models.precision if decision.backend == "openvino" else plain_precision
    logger.info("Backend %s on %s (%s): %s", decision.backend, device, resolved, decision.reason)
    factory = RunnerFactory(bundle, decision.backend, resolved, device, decision.reason, threads=threads,
                            cpu_models=cpu_models)
    return factory, decision.reason


def open_runners(
    stack: contextlib.ExitStack,
    bundle: Bundle,
    *,
    backend: str,
    precision: str,
    folds: Sequence[Fold],
    device: str | torch.device,
    tile_source: str | Path | None = None,
    threads: int | None = None,
) -> tuple[dict[Fold, Runner], str, str]:
    """Open one runner per fold on ``stack`` (closed when it unwinds); returns (runners, backend, reason).

    The precision actually run is ``runner.precision`` (``auto`` resolves in ``select_backend``).
    """
    factory, reason = select_backend(backend, bundle, precision, device, folds, tile_source=tile_source, threads=threads)
    runners = {fold: stack.enter_context(factory(fold)) for fold in bundle.resolve_folds(list(folds))}
    return runners, factory.backend, reason
