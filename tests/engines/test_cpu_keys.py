"""CPU engine keys: the CPU kind, keys and paths, and refusal of foreign or stale compiled models (no OpenVINO needed)."""

from __future__ import annotations

import pytest

from tucker_export.engines.cpu_keys import (
    CpuInfo,
    check_precision_supported,
    cpu_engine_key,
    cpu_engine_mismatch,
    cpu_engine_relpath,
    find_cpu_engine_record,
    normalize_cpu_precision,
    parse_cpuinfo,
    short_openvino_version,
    superseded_cpu_records,
)
from tucker_export.errors import ConfigurationError, EngineError, EngineMismatchError

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Platinum 8480+ CPU @ 2.00GHz
flags\t\t: fpu sse avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8

processor\t: 1
model name\t: something else
"""
OV = "2026.4.1-22982-e213a147257-releases/2026/4"
SAPPHIRE = parse_cpuinfo(CPUINFO)
OLD_XEON = CpuInfo("Intel(R) Xeon(R) CPU E5-2690 v4 @ 2.60GHz", 6, 79, frozenset({"avx2"}))
SHA = "3f2a9c01b7de" + "0" * 52


def test_cpu_kind_names_model_and_the_features_kernels_depend_on():
    assert SAPPHIRE.kind == "intel-xeon-platinum-8480-f6m143-avx512-vnni-bf16-amx"
    assert SAPPHIRE.has_native_bf16 and SAPPHIRE.has_amx
    assert OLD_XEON.kind == "intel-xeon-e5-2690-v4-f6m79"
    assert not OLD_XEON.has_native_bf16
    assert "no AVX-512/VNNI/AMX" in OLD_XEON.describe()
    assert parse_cpuinfo("").model_name  # never empty, even without /proc/cpuinfo fields


def test_keys_and_paths():
    key = cpu_engine_key(0, "bf16", SAPPHIRE, OV, SHA)
    assert key == "fold_0.bf16.intel-xeon-platinum-8480-f6m143-avx512-vnni-bf16-amx.ov2026.4.1.3f2a9c01b7de"
    assert cpu_engine_relpath(0, "bf16", SAPPHIRE, OV, SHA) == (
        "cpu_engines/intel-xeon-platinum-8480-f6m143-avx512-vnni-bf16-amx/fold_0.bf16.ov2026.4.1.3f2a9c01b7de.blob"
    )
    assert short_openvino_version(OV) == "2026.4.1"


def test_precisions():
    assert normalize_cpu_precision("BF16") == "bf16" and normalize_cpu_precision("float32") == "fp32"
    with pytest.raises(ConfigurationError, match="'fp16' is not one of fp32, bf16, int8"):
        normalize_cpu_precision("fp16")
    check_precision_supported("bf16", SAPPHIRE, ["FP32", "BF16", "INT8"])
    with pytest.raises(EngineError, match=r"no bf16 support in OpenVINO .* use precision='fp32'"):
        check_precision_supported("bf16", OLD_XEON, ["FP32", "INT8"])


def _record(cpu=SAPPHIRE, version=OV, sha=SHA, precision="bf16", fold=0):
    return {
        "key": cpu_engine_key(fold, precision, cpu, version, sha), "fold": fold, "precision": precision,
        "cpu": cpu.to_dict(), "openvino": {"version": version}, "onnx": {"sha256": sha}, "file": "x.blob",
        "gate": {"passed": True},
    }


def test_a_foreign_or_stale_compiled_model_is_refused_with_the_reason():
    assert cpu_engine_mismatch(_record(), cpu=SAPPHIRE, openvino_version=OV, onnx_sha256=SHA) is None
    assert "was compiled for intel-xeon-e5-2690-v4-f6m79 and this CPU is intel-xeon-platinum" in cpu_engine_mismatch(
        _record(cpu=OLD_XEON), cpu=SAPPHIRE, openvino_version=OV, onnx_sha256=SHA)
    assert "compiled with OpenVINO 2025.1.0 and this machine has OpenVINO 2026.4.1" in cpu_engine_mismatch(
        _record(version="2025.1.0"), cpu=SAPPHIRE, openvino_version=OV, onnx_sha256=SHA).replace(OV, "2026.4.1")
    assert "older ONNX export (sha256 3f2a9c01b7de, now 111111111111)" in cpu_engine_mismatch(
        _record(), cpu=SAPPHIRE, openvino_version=OV, onnx_sha256="1" * 64)
    assert "no longer in the bundle" in cpu_engine_mismatch(_record(), cpu=SAPPHIRE, openvino_version=OV, onnx_sha256=None)


def test_find_record_prefers_this_cpu_kind_and_names_the_rebuild_command():
    manifest = {"cpu_engines": {r["key"]: r for r in (_record(cpu=OLD_XEON), _record(version="2025.1.0"))}}
    with pytest.raises(EngineMismatchError) as error:
        find_cpu_engine_record(manifest["cpu_engines"], fold=0, precision="bf16", cpu=SAPPHIRE, openvino_version=OV,
                               bundle_path="b", onnx_sha256=SHA)
    assert "compiled with OpenVINO 2025.1.0" in str(error.value)
    assert "`tucker-export build b --backend openvino --precision bf16`" in str(error.value)
    with pytest.raises(EngineError, match="no OpenVINO int8 model for fold 0.*--calibration-dir SCANS"):
        find_cpu_engine_record(manifest["cpu_engines"], fold=0, precision="int8", cpu=SAPPHIRE, openvino_version=OV,
                               bundle_path="b", onnx_sha256=SHA)
    good = _record()
    manifest["cpu_engines"][good["key"]] = good
    assert find_cpu_engine_record(manifest["cpu_engines"], fold=0, precision="bf16", cpu=SAPPHIRE, openvino_version=OV,
                                  bundle_path="b", onnx_sha256=SHA) is good
    assert superseded_cpu_records(manifest["cpu_engines"], fold=0, precision="bf16", cpu=SAPPHIRE, keep_key=good["key"]) == [
        _record(version="2025.1.0")["key"]
    ]
