"""`doctor`'s decisions, fed machines this one is not (a GPU with TensorRT, a broken OpenVINO)."""

from __future__ import annotations

import json

from tucker_export.doctor import Diagnostics, backend_availability, collect_diagnostics, format_diagnostics
from tucker_export.engines.keys import GpuInfo

H200 = GpuInfo(0, "NVIDIA H200", (9, 0), 141 * 2**30)


def _packages(**changes: str) -> dict[str, str]:
    return {"tucker_export": "0.1.0", "torch": "2.11", "nnunetv2": "2.6", "onnx": "1.17", "onnxruntime": "1.20",
            "tensorrt": "not installed", "openvino": "2025.1", **changes}


def test_gpu_machine_with_tensorrt_and_onnxruntime_gpu():
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    backends = {b.name: b for b in backend_availability(_packages(tensorrt="10.8.0"), providers, [H200])}
    assert backends["trt"].usable and "1 CUDA device" in backends["trt"].why
    assert backends["ort (cuda)"].usable and backends["ort (cpu)"].usable
    text = format_diagnostics(Diagnostics("3.11", "Linux", _packages(tensorrt="10.8.0"), providers, [H200],
                                          backend_availability(_packages(tensorrt="10.8.0"), providers, [H200])))
    assert "cuda:0        NVIDIA H200, compute capability 9.0, 141.0 GiB" in text


def test_cpu_machine_says_why_each_gpu_backend_is_missing():
    backends = {b.name: b for b in backend_availability(_packages(openvino="broken (OSError: libtbb)"),
                                                        ["CPUExecutionProvider"], [])}
    assert not backends["trt"].usable and "install the `trt` extra" in backends["trt"].why
    assert not backends["ort (cuda)"].usable and "onnxruntime-gpu" in backends["ort (cuda)"].why
    assert not backends["openvino (cpu)"].usable and "broken" in backends["openvino (cpu)"].why


def test_this_machine_reports_as_json():
    data = json.loads(json.dumps(collect_diagnostics().to_dict()))
    assert data["packages"]["tucker_export"] and "CPUExecutionProvider" in data["onnxruntime_providers"]
    assert data["cpu"]["kind"]
