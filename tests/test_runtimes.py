"""The runtime adapters: one ONNX Runtime session factory, one torch callable, one thread scope."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tucker_export.errors import EngineError
from tucker_export.runtimes import (
    ort_session,
    ort_session_options,
    physical_cores,
    torch_callable,
    torch_threads,
)


def test_session_options_default_to_the_measured_fastest() -> None:
    import onnxruntime as ort

    options = ort_session_options()
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert options.intra_op_num_threads == physical_cores()
    assert ort_session_options(threads=1, sequential=False, inter_op_threads=1).inter_op_num_threads == 1


def test_bad_level_and_unloadable_model_are_engine_errors(tmp_path) -> None:
    with pytest.raises(EngineError, match="'max' is not one of none, basic, extended, all"):
        ort_session_options(graph_optimization="max")
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx model")
    with pytest.raises(EngineError, match=r"ONNX Runtime cannot load .*broken\.onnx"):
        ort_session(broken)


def test_session_runs_a_serialized_model() -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["input"], ["logits"])], "relu",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    out = ort_session(model.SerializeToString()).run(None, {"input": np.array([[-1, 0, 2]], np.float32)})[0]
    assert onnx.checker.check_model(model) is None and out.tolist() == [[0, 0, 2]]


def test_torch_callable_runs_in_inference_mode_and_autocast_returns_fp32() -> None:
    torch.manual_seed(0)
    network = torch.nn.Conv3d(1, 2, 3, padding=1)
    batch = torch.randn(1, 1, 4, 4, 4)
    out = torch_callable(network)(batch)
    assert out.is_inference() and not network.training
    torch.testing.assert_close(out, network(batch).detach())
    bf16 = torch_callable(network, "cpu", autocast=torch.bfloat16)(batch)
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(bf16, out, atol=0.05, rtol=0.05)


def test_torch_threads_restores_the_previous_count() -> None:
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with torch_threads(None):
        assert torch.get_num_threads() == before
