"""TensorRT 10.x/11.x API detection and build settings, error naming: plain logic, no TensorRT needed.

``detect_api`` only looks at which members a module has, so it is exercised here on namespaces that
carry the member names NVIDIA documents for each version (10.x: STRONGLY_TYPED and the deprecated
EXPLICIT_BATCH creation flags, FP16 and TF32 builder flags; 11.x: no FP16 flag and no EXPLICIT_BATCH).
They are name lists, not behaviour: nothing here claims that a real TensorRT build ran.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest

from tucker_export.engines.tensorrt_backend import (
    describe_parser_error,
    detect_api,
    nodes_named_in,
    plan_build_settings,
)
from tucker_export.errors import BackendUnavailableError, EngineError


def _module(version: str, creation: list[str], builder: list[str], v3: bool = True, parser_names: bool = True):
    def members(names):
        return SimpleNamespace(**{name: index for index, name in enumerate(names)})

    context = SimpleNamespace(execute_async_v3=None, set_tensor_address=None) if v3 else SimpleNamespace(execute_async_v2=None)
    return SimpleNamespace(
        __version__=version,
        NetworkDefinitionCreationFlag=members(creation),
        BuilderFlag=members(builder),
        IExecutionContext=context,
        IBuilderConfig=SimpleNamespace(set_memory_pool_limit=None),
        ParserError=SimpleNamespace(node_name=None) if parser_names else SimpleNamespace(node=None),
    )


TRT10 = _module("10.8.0.43", ["EXPLICIT_BATCH", "STRONGLY_TYPED"], ["FP16", "INT8", "TF32", "BF16"])
TRT11 = _module("11.3.0.1", ["STRONGLY_TYPED"], ["TF32", "DEBUG"])
TRT11_NO_FLAG = _module("11.9.0", [], ["TF32"])
TRT8 = _module("8.6.1", ["EXPLICIT_BATCH"], ["FP16", "TF32"], v3=True, parser_names=False)


def test_detects_10x():
    api = detect_api(TRT10)
    assert (api.major, api.family) == (10, "10.x")
    assert api.strongly_typed_flag and api.explicit_batch_flag and api.fp16_builder_flag and api.tf32_flag
    assert api.v3_execution and api.memory_pool_limit and api.parser_node_names


def test_detects_11x_by_its_members():
    api = detect_api(TRT11)
    assert api.family == "11.x"
    assert not api.fp16_builder_flag and not api.explicit_batch_flag and api.strongly_typed_flag


@pytest.mark.parametrize("module", [TRT10, TRT11, TRT11_NO_FLAG], ids=["10.x", "11.x", "11.x-without-flag"])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_build_settings_are_strongly_typed_without_fp16_flag_and_tf32_off(module, precision):
    settings = plan_build_settings(detect_api(module), precision)
    # precision comes from the ONNX graph on both versions: never the FP16 builder flag
    assert "FP16" not in settings.set_flags and settings.set_flags == ()
    # EXPLICIT_BATCH is ignored since 10.0 and gone in 11: never set
    assert "EXPLICIT_BATCH" not in settings.network_flags
    assert settings.network_flags == (("STRONGLY_TYPED",) if module is not TRT11_NO_FLAG else ())
    assert settings.clear_flags == ("TF32",) and settings.tf32 is False


def test_old_tensorrt_is_refused_in_one_sentence():
    with pytest.raises(BackendUnavailableError, match=r"^TensorRT 8\.6\.1 is too old; .*10\.x or 11\.x\.$"):
        plan_build_settings(detect_api(TRT8), "fp16")


def test_unknown_precision_is_refused():
    with pytest.raises(EngineError, match="Precision 'int8' cannot be built"):
        plan_build_settings(detect_api(TRT10), "int8")


def test_parser_errors_name_the_onnx_node():
    nodes = [("/encoder/stages.0/conv/Conv", "Conv"), ("/encoder/stages.0/norm/InstanceNormalization", "InstanceNormalization")]
    # TensorRT 10 reports the name itself ...
    assert describe_parser_error(index=1, node_name="/x/Resize", operator="Resize", desc="unsupported mode", nodes=nodes) == (
        "ONNX node '/x/Resize' (Resize): unsupported mode"
    )
    # ... older parsers only the index, which is looked up in the ONNX graph
    assert describe_parser_error(index=1, node_name=None, operator=None, desc=" bad scale ", nodes=nodes) == (
        "ONNX node '/encoder/stages.0/norm/InstanceNormalization' (InstanceNormalization): bad scale"
    )
    assert describe_parser_error(index=-1, node_name="", operator=None, desc="model is empty", nodes=nodes) == (
        "the ONNX graph: model is empty"
    )


def test_builder_errors_are_traced_to_onnx_nodes():
    names = ["/dec/conv/Conv", "/dec/conv/Conv_1", "/enc/norm/InstanceNormalization"]
    messages = [
        "[myelin] Error in layer /dec/conv/Conv_1: no implementation obeys reformatting-free rules",
        "Could not find any implementation for node /enc/norm/InstanceNormalization.",
    ]
    assert nodes_named_in(messages, names) == ["/dec/conv/Conv_1", "/enc/norm/InstanceNormalization"]
    assert nodes_named_in(["out of memory"], names) == []


def test_importing_the_engines_package_does_not_import_tensorrt():
    import subprocess

    code = (
        "import sys, tucker_export.engines, tucker_export.engines.selection, tucker_export.engines.build, "
        "tucker_export.cli.build, tucker_export.engines.tensorrt_backend;"
        "print('tensorrt' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"
