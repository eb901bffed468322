"""Backend choice: the pure decision table, and select/open on a CPU machine with a real bundle."""

from __future__ import annotations

import contextlib
import logging

import numpy as np
import pytest

from tucker_export.bundle import Bundle
from tucker_export.engines.runners import ORT_CPU, ORT_CUDA, OnnxRuntimeRunner, TorchRunner
from tucker_export.engines.selection import (
    decide_backend,
    normalize_backend,
    open_runners,
    select_backend,
)
from tucker_export.errors import BackendUnavailableError, BundleError, ConfigurationError, EngineMismatchError

MISMATCH = EngineMismatchError(
    "The TensorRT engine for fold 0 fp16 was built with TensorRT 10.3.0 and this machine has TensorRT 10.8.0; "
    "rebuild it with `tucker-export build b --precision fp16`."
)
NO_ONNX = BundleError("Bundle b has no fp16 ONNX export of fold 0; run `tucker-export export b --precision fp16`.")


def _decide(choice="auto", device="cuda", trt=None, onnx=None, providers=(ORT_CUDA, ORT_CPU), precision="fp16"):
    return decide_backend(choice, device_type=device, precision=precision, trt_problem=trt, onnx_problem=onnx, ort_providers=providers)


def test_auto_prefers_a_matching_tensorrt_engine():
    decision = _decide()
    assert decision.backend == "trt" and "matches this GPU" in decision.reason


def test_auto_falls_back_to_onnxruntime_cuda_and_says_why():
    decision = _decide(trt=MISMATCH)
    assert decision.backend == "ort"
    assert decision.reason.startswith("no TensorRT: The TensorRT engine for fold 0 fp16 was built with TensorRT 10.3.0")
    assert decision.reason.endswith("ONNX Runtime CUDA provider")


def test_auto_on_gpu_without_cuda_provider_uses_torch():
    decision = _decide(trt=BackendUnavailableError("TensorRT is not installed."), providers=(ORT_CPU,))
    assert decision.backend == "torch"
    assert "no ONNX Runtime CUDA provider" in decision.reason and "TensorRT is not installed" in decision.reason


def test_auto_on_cpu_uses_onnxruntime_cpu_or_torch():
    assert _decide(device="cpu", providers=(ORT_CPU,)).backend == "ort"
    decision = _decide(device="cpu", onnx=NO_ONNX, providers=(ORT_CPU,))
    assert decision.backend == "torch"
    assert "no ONNX Runtime: Bundle b has no fp16 ONNX export" in decision.reason
    assert "autocast is CUDA-only" in decision.reason


def test_explicit_choices_raise_their_problem():
    with pytest.raises(EngineMismatchError):
        _decide("trt", trt=MISMATCH)
    with pytest.raises(BundleError):
        _decide("ort", onnx=NO_ONNX)
    with pytest.raises(BackendUnavailableError, match="CUDAExecutionProvider"):
        _decide("ort", providers=(ORT_CPU,))
    assert _decide("torch", trt=MISMATCH, onnx=NO_ONNX).backend == "torch"
    assert _decide("tensorrt").backend == "trt"


def test_backend_names():
    assert normalize_backend("ONNXRuntime") == "ort" and normalize_backend("pytorch") == "torch"
    assert normalize_backend("OV") == "openvino"
    with pytest.raises(ConfigurationError, match="Backend .tvm. is not one of auto, trt, ort, openvino, torch"):
        normalize_backend("tvm")


def test_select_on_this_cpu_machine(exported_bundle, caplog):
    bundle = Bundle.load(exported_bundle)
    with caplog.at_level(logging.INFO, logger="tucker_export.engines.selection"):
        factory, reason = select_backend("auto", bundle, "fp32", "cpu")
    assert factory.backend == "ort" and reason == "ONNX Runtime CPU provider"
    assert "Backend ort on cpu (fp32): ONNX Runtime CPU provider" in caplog.text
    assert isinstance(factory(0), OnnxRuntimeRunner)
    with pytest.raises(BackendUnavailableError, match="TensorRT runs on CUDA GPUs and the device is cpu"):
        select_backend("trt", bundle, "fp32", "cpu")
    torch_factory, _ = select_backend("torch", bundle, "fp32", "cpu")
    assert isinstance(torch_factory(1), TorchRunner)


def test_auto_without_exports_falls_back_to_torch(exported_bundle):
    bundle = Bundle.load(exported_bundle)
    bundle.remove_record("onnx", "fold_1.fp32")
    factory, reason = select_backend("auto", bundle, "fp32", "cpu")
    assert factory.backend == "torch" and "no fp32 ONNX export of fold 1" in reason


def test_changed_onnx_file_is_refused_when_opening(exported_bundle):
    bundle = Bundle.load(exported_bundle)
    (exported_bundle / "onnx" / "fold_0.fp32.onnx").write_bytes(b"changed")
    factory, _ = select_backend("ort", bundle, "fp32", "cpu")
    with pytest.raises(BundleError, match="does not match the bundle manifest"):
        factory(0)


def test_open_runners_gives_one_open_runner_per_fold(exported_bundle):
    bundle = Bundle.load(exported_bundle)
    x = np.zeros((1, bundle.num_input_channels, *bundle.patch_size), dtype=np.float32)
    with contextlib.ExitStack() as stack:
        runners, backend, reason = open_runners(stack, bundle, backend="auto", precision="fp16", folds=bundle.folds, device="cpu")
        assert backend == "ort" and set(runners) == {0, 1}
        assert all(r.infer(x).shape == (1, bundle.num_segmentation_heads, *bundle.patch_size) for r in runners.values())
    assert all(r.session is None for r in runners.values())


