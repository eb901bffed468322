"""The only module that imports OpenVINO (and NNCF for int8), lazily.

What is decided here is only how to call OpenVINO: which compile properties a precision means,
how a compiled model is exported and imported, how NNCF quantizes. Which model, key, file and gate
is plain code in ``cpu_keys`` and ``cpu_build``.

Precisions on the CPU plugin:

- ``fp32``: ``INFERENCE_PRECISION_HINT=f32``. This has to be said explicitly: on CPUs with AMX or
  AVX512-BF16, OpenVINO's default hint is bf16;
- ``bf16``: ``INFERENCE_PRECISION_HINT=bf16`` (only where the CPU reports BF16);
- ``int8``: an NNCF-quantized model (FakeQuantize before the convolutions); what is not quantized
  runs at f32.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tucker_export.errors import BackendUnavailableError, EngineError

logger = logging.getLogger(__name__)

_HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}


def import_openvino() -> Any:
    try:
        import openvino
    except ImportError as error:
        raise BackendUnavailableError(
            f"OpenVINO is not installed ({error}); `pip install openvino` (a CPU wheel) enables the openvino backend."
        ) from None
    return openvino


def openvino_version() -> str:
    return str(import_openvino().get_version())


def cpu_capabilities() -> list[str]:
    """What OpenVINO's CPU plugin says this CPU can do (``FP32``, ``BF16``, ``INT8``, ...)."""
    ov = import_openvino()
    try:
        return [str(c) for c in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")]
    except Exception as error:  # OpenVINO raises RuntimeError subclasses of its own
        raise BackendUnavailableError(f"OpenVINO's CPU plugin cannot start here ({error}).") from error


def compile_properties(precision: str, threads: int) -> dict[str, str]:
    """CPU plugin properties for ``precision``: one stream of ``threads`` threads, latency hint."""
    if precision not in _HINTS:
        raise EngineError(f"OpenVINO precision {precision!r} is not one of {', '.join(_HINTS)}.")
    return {
        "INFERENCE_PRECISION_HINT": _HINTS[precision],
        "PERFORMANCE_HINT": "LATENCY",
        "NUM_STREAMS": "1",
        "INFERENCE_NUM_THREADS": str(max(1, int(threads))),
    }


def read_onnx(onnx_path: str | Path) -> Any:
    ov = import_openvino()
    try:
        return ov.Core().read_model(str(onnx_path))
    except Exception as error:
        raise EngineError(f"OpenVINO cannot read {onnx_path} ({str(error).strip().splitlines()[0]}).") from error


# Kept in higher precision by int8: the segmentation head (its logits are the output) and the 1x1
# factor convolutions of Tucker layers (``first``/``last``). Measured on the demo model, fold 1,
# Tucker 0.3, 200 calibration tiles: argmax agreement with PyTorch 98.5 % with every convolution
# quantized, 99.4 % sparing the head, 99.8 % sparing the head and the factors.
INT8_KEPT_PATTERNS = (".*seg_layers.*", ".*/first/.*", ".*/last/.*")


def quantize_int8(model: Any, tiles: Sequence[np.ndarray], *, seed: int = 0) -> Any:
    """NNCF post-training quantization of an OpenVINO model, calibrated on ``tiles`` (each ``(1, C, *patch)``).

    MIXED preset (symmetric weights, asymmetric activations: nnU-Net's activations after
    LeakyReLU are not symmetric), ``INT8_KEPT_PATTERNS`` left unquantized, every tile used, so the
    result depends only on the tiles, which the caller seeds.
    """
    try:
        import nncf
    except ImportError as error:
        raise BackendUnavailableError(
            f"int8 needs NNCF, which is not installed ({error}); `pip install nncf`."
        ) from None
    if not tiles:
        raise EngineError("int8 calibration needs at least one tile.")
    logging.getLogger("nncf").setLevel(logging.WARNING)
    np.random.seed(seed)  # NNCF draws from numpy's global generator in some of its algorithms
    return nncf.quantize(
        model,
        nncf.Dataset(list(tiles)),
        preset=nncf.QuantizationPreset.MIXED,
        subset_size=len(tiles),
        ignored_scope=nncf.IgnoredScope(patterns=list(INT8_KEPT_PATTERNS), validate=False),
    )


@dataclass
class CompiledCpuModel:
    """A compiled model, its exported bytes, and how long compiling took."""

    compiled: Any
    blob: bytes | None
    seconds: float


def compile_model(model: Any, precision: str, threads: int, *, export: bool = True) -> CompiledCpuModel:
    """Compile ``model`` (an ``ov.Model`` or a path OpenVINO reads) for the CPU; ``export`` also serializes it."""
    ov = import_openvino()
    started = time.perf_counter()
    try:
        compiled = ov.Core().compile_model(model, "CPU", compile_properties(precision, threads))
    except Exception as error:
        raise EngineError(f"OpenVINO could not compile the model for {precision} ({str(error).strip().splitlines()[0]}).") from error
    seconds = time.perf_counter() - started
    blob = None
    if export:
        stream = io.BytesIO()
        compiled.export_model(stream)
        blob = stream.getvalue()
    return CompiledCpuModel(compiled, blob, seconds)


def import_compiled(blob: bytes, precision: str, threads: int) -> Any:
    """A compiled model back from ``export_model`` bytes (the caller has checked its key)."""
    ov = import_openvino()
    try:
        return ov.Core().import_model(io.BytesIO(blob), "CPU", compile_properties(precision, threads))
    except Exception as error:
        raise EngineError(f"OpenVINO cannot load the compiled model ({str(error).strip().splitlines()[0]}).") from error


class OpenVinoSession:
    """One infer request over a compiled model: numpy (B, C, *patch) in, float32 logits out."""

    def __init__(self, compiled: Any) -> None:
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        self._output = compiled.output(0)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        # share_outputs: OpenVINO would otherwise copy the output once itself, and a second copy is
        # needed anyway because the request reuses its buffer on the next call. At 128^3 with 118
        # classes the output is 1 GB: each extra copy is a fresh allocation whose page faults cost
        # 0.3-2 s of kernel time (measured), more than the network itself.
        result = self.request.infer({0: batch}, share_inputs=True, share_outputs=True)
        return np.array(result[self._output], dtype=np.float32, copy=True)

    def close(self) -> None:
        self.request = None
        self.compiled = None
