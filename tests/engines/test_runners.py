"""Runners: one interface over PyTorch and ONNX Runtime on the CPU (GPU paths: see test_gpu.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tucker_export.bundle import Bundle
from tucker_export.engines.runners import (
    ORT_CPU,
    ORT_CUDA,
    OnnxRuntimeRunner,
    TorchRunner,
    ort_providers_for,
    physical_cores,
)
from tucker_export.errors import BackendUnavailableError, EngineError
from tucker_export.exporter.onnx_export import seeded_input
from tucker_export.exporter.rebuild import build_network


@pytest.fixture
def batch(exported_bundle) -> np.ndarray:
    bundle = Bundle.load(exported_bundle)
    return seeded_input(3, bundle.num_input_channels, bundle.patch_size, seed=5)


def test_onnxruntime_and_torch_runners_agree_and_keep_the_input_kind(exported_bundle, batch):
    bundle = Bundle.load(exported_bundle)
    with TorchRunner(build_network(bundle, 0)) as torch_runner, OnnxRuntimeRunner(
        bundle.artifact_path("onnx/fold_0.fp32.onnx"), intra_op_threads=1
    ) as ort_runner:
        reference = torch_runner.infer(batch)
        out = ort_runner.infer(batch)
        assert isinstance(reference, np.ndarray) and isinstance(out, np.ndarray) and out.dtype == np.float32
        assert out.shape == (3, bundle.num_segmentation_heads, *bundle.patch_size)
        assert np.abs(out - reference).max() <= 1e-3
        tensor_out = ort_runner.infer(torch.from_numpy(batch))
        assert isinstance(tensor_out, torch.Tensor) and tensor_out.device.type == "cpu"
        np.testing.assert_allclose(tensor_out.numpy(), out, atol=1e-6)
        torch_out = torch_runner.infer(torch.from_numpy(batch))
        assert isinstance(torch_out, torch.Tensor)
        assert ort_runner.providers_used == [ORT_CPU]


def test_fp16_onnx_file_runs_on_the_cpu_runner(exported_bundle, batch):
    bundle = Bundle.load(exported_bundle)
    with OnnxRuntimeRunner(bundle.artifact_path("onnx/fold_0.fp16.onnx"), precision="fp16") as runner:
        out = runner.infer(batch)
    assert out.dtype == np.float32 and np.isfinite(out).all()


def test_runner_must_be_opened(exported_bundle, batch):
    runner = OnnxRuntimeRunner(Bundle.load(exported_bundle).artifact_path("onnx/fold_0.fp32.onnx"))
    with pytest.raises(EngineError, match="is not open; use it as `with runner"):
        runner.infer(batch)
    with runner:
        runner.infer(batch[:1])
    assert runner.session is None  # closed on exit


def test_missing_onnx_file_is_named(tmp_path):
    with pytest.raises(EngineError, match="does not exist; run `tucker-export export` first"):
        with OnnxRuntimeRunner(tmp_path / "none.onnx"):
            pass


def test_torch_runner_on_cpu_runs_fp32_like_nnunet(exported_bundle):
    runner = TorchRunner(lambda: build_network(Bundle.load(exported_bundle), 0), precision="fp16")
    assert runner.precision == "fp32"


def test_ort_provider_choice():
    assert ort_providers_for("cpu", [ORT_CPU]) == [ORT_CPU]
    assert ort_providers_for("cuda", [ORT_CUDA, ORT_CPU], device_index=1) == [(ORT_CUDA, {"device_id": 1}), ORT_CPU]
    with_trt_ep = ort_providers_for("cuda", ["TensorrtExecutionProvider", ORT_CUDA, ORT_CPU])
    assert [p[0] if isinstance(p, tuple) else p for p in with_trt_ep] == [ORT_CUDA, ORT_CPU]
    with pytest.raises(BackendUnavailableError, match="no CUDAExecutionProvider"):
        ort_providers_for("cuda", [ORT_CPU])


def test_session_options_follow_the_benchmark_defaults(tmp_path):
    import onnxruntime as ort

    options = OnnxRuntimeRunner(tmp_path / "x.onnx").session_options()
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert options.intra_op_num_threads == physical_cores() >= 1
    with pytest.raises(EngineError, match="Graph optimisation level 'max'"):
        OnnxRuntimeRunner(tmp_path / "x.onnx", graph_optimization="max").session_options()
