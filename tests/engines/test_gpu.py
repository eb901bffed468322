"""GPU paths: TensorRT builds and runs, ONNX Runtime CUDA with IO binding, PyTorch autocast.

Marked ``tensorrt`` / ``cuda`` and skipped on machines without them (this project's CI has neither,
so these have not run there; they are the checks to run on a GPU machine).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tucker_export.bundle import Bundle
from tucker_export.exporter.onnx_export import seeded_input
from tucker_export.exporter.rebuild import build_network

from .conftest import cuda_available, tensorrt_and_cuda

skip_without_tensorrt = pytest.mark.skipif(not tensorrt_and_cuda(), reason="needs the tensorrt package and a CUDA GPU")
skip_without_cuda = pytest.mark.skipif(not cuda_available(), reason="needs a CUDA GPU")


def _cpu_reference(bundle: Bundle, precision: str, x: np.ndarray) -> np.ndarray:
    from tucker_export.engines.runners import OnnxRuntimeRunner

    with OnnxRuntimeRunner(bundle.artifact_path(f"onnx/fold_0.{precision}.onnx")) as runner:
        return runner.infer(x)


@pytest.mark.tensorrt
@skip_without_tensorrt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_build_record_and_run(exported_bundle, precision):
    from tucker_export.engines.build import build_engines
    from tucker_export.engines.selection import select_backend

    records = build_engines(exported_bundle, (precision,), "0", "1:2:4", 2.0, folds=[0], progress=False)
    bundle = Bundle.load(exported_bundle)
    (record,) = records
    assert record["key"] in bundle.manifest["engines"] and record["tf32"] is False
    assert (exported_bundle / record["file"]).is_file() and (exported_bundle / record["timing_cache"]).is_file()
    factory, reason = select_backend("auto", bundle, precision, "cuda:0", folds=[0])
    assert factory.backend == "trt", reason
    x = seeded_input(5, bundle.num_input_channels, bundle.patch_size, seed=9)  # 5 > profile max: split in two calls
    with factory(0) as runner:
        out = runner.infer(x)
        out_cuda = runner.infer(torch.from_numpy(x).cuda())
    reference = _cpu_reference(bundle, precision, x)
    assert out_cuda.device.type == "cuda"
    if precision == "fp32":
        assert np.abs(out - reference).max() <= 1e-3
    else:
        assert np.mean(out.argmax(1) == reference.argmax(1)) >= 0.99


@pytest.mark.tensorrt
@skip_without_tensorrt
def test_tensorrt_refuses_an_engine_of_another_tensorrt(exported_bundle):
    from tucker_export.engines.build import build_engines
    from tucker_export.engines.selection import select_backend
    from tucker_export.errors import EngineMismatchError

    (record,) = build_engines(exported_bundle, ("fp16",), "0", "1:1:2", 2.0, folds=[0], progress=False)
    bundle = Bundle.load(exported_bundle)
    bundle.manifest["engines"][record["key"]]["tensorrt"]["version"] = "0.0.1"
    bundle.save()
    with pytest.raises(EngineMismatchError, match="was built with TensorRT 0.0.1"):
        select_backend("trt", Bundle.load(exported_bundle), "fp16", "cuda:0", folds=[0])
    factory, reason = select_backend("auto", Bundle.load(exported_bundle), "fp16", "cuda:0", folds=[0])
    assert factory.backend != "trt" and "rebuild it with `tucker-export build" in reason


@pytest.mark.cuda
@skip_without_cuda
def test_torch_runner_autocast_on_cuda(exported_bundle):
    from tucker_export.engines.runners import TorchRunner

    bundle = Bundle.load(exported_bundle)
    x = seeded_input(2, bundle.num_input_channels, bundle.patch_size, seed=4)
    with TorchRunner(build_network(bundle, 0), precision="fp16", device="cuda:0") as runner:
        assert runner.precision == "fp16"
        out = runner.infer(torch.from_numpy(x).cuda())
    assert out.dtype == torch.float32 and out.device.type == "cuda"
    reference = _cpu_reference(bundle, "fp32", x)
    assert np.mean(out.cpu().numpy().argmax(1) == reference.argmax(1)) >= 0.99


@pytest.mark.cuda
@skip_without_cuda
def test_onnxruntime_cuda_io_binding(exported_bundle):
    import onnxruntime as ort

    from tucker_export.engines.runners import ORT_CUDA, OnnxRuntimeRunner

    if ORT_CUDA not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu (CUDAExecutionProvider) is not installed")
    bundle = Bundle.load(exported_bundle)
    x = seeded_input(2, bundle.num_input_channels, bundle.patch_size, seed=6)
    with OnnxRuntimeRunner(bundle.artifact_path("onnx/fold_0.fp32.onnx"), device="cuda:0") as runner:
        assert runner.providers_used[0] == ORT_CUDA
        out = runner.infer(torch.from_numpy(x).cuda())
    assert out.device.type == "cuda"
    assert np.abs(out.cpu().numpy() - _cpu_reference(bundle, "fp32", x)).max() <= 1e-3
