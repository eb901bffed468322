"""Engine keys, batch profiles, GPU selection and the "does this engine fit here" check, without TensorRT."""

from __future__ import annotations

import pytest

from tucker_export.engines.keys import (
    BatchProfile,
    GpuInfo,
    check_engine_file,
    engine_key,
    engine_mismatch,
    engine_record,
    engine_relpath,
    find_engine_record,
    one_per_kind,
    parse_gpu_selection,
    rebuild_command,
    split_batch,
    superseded_records,
    timing_cache_relpath,
)
from tucker_export.errors import ConfigurationError, EngineError, EngineMismatchError

H200 = GpuInfo(0, "NVIDIA H200", (9, 0), 141 << 30)
H200_B = GpuInfo(1, "NVIDIA H200", (9, 0), 141 << 30)
A100 = GpuInfo(2, "NVIDIA A100-SXM4-80GB", (8, 0), 80 << 30)
SHA = "3f2a9c01b7de" + "0" * 52
NEW_SHA = "99aa" + "1" * 60
TRT = "10.8.0.43"


def _onnx_entry(sha: str = SHA, precision: str = "fp16") -> dict:
    return {
        "file": f"onnx/fold_0.{precision}.onnx",
        "sha256": sha,
        "precision": precision,
        "input": {"name": "input", "shape": ["batch", 1, 64, 64, 64], "dtype": "float32"},
        "output": {"name": "logits", "shape": ["batch", 5, 64, 64, 64], "dtype": "float32"},
        "max_batch": 4,
    }


def _record(gpu: GpuInfo = H200, trt: str = TRT, sha: str = SHA, precision: str = "fp16", fold: int = 0) -> dict:
    key = engine_key(fold, precision, gpu, trt, sha)
    return engine_record(
        key=key, fold=fold, precision=precision, gpu=gpu, trt_version=trt, trt_api={"api": "10.x"},
        onnx_key=f"fold_{fold}.{precision}", onnx_entry=_onnx_entry(sha, precision),
        engine_file=engine_relpath(fold, precision, gpu, trt, sha), engine_sha256="e" * 64, size_bytes=123,
        profile=BatchProfile(1, 2, 4), workspace_gib=4.0, tf32=False,
        timing_cache_file=timing_cache_relpath(gpu, trt), build_seconds=12.3, built="2025-01-01T00:00:00+00:00",
    )


def _manifest(*records: dict, onnx_sha: str = SHA) -> dict:
    return {"onnx": {"fold_0.fp16": _onnx_entry(onnx_sha)}, "engines": {r["key"]: r for r in records}}


# ---- GPU kinds and keys -------------------------------------------------------------------------


def test_gpu_kind_is_a_slug_with_compute_capability():
    assert H200.kind == "nvidia-h200-sm90"
    assert A100.kind == "nvidia-a100-sxm4-80gb-sm80"
    assert H200.describe() == "NVIDIA H200 (sm90)"


def test_key_and_paths_name_fold_precision_gpu_trt_and_onnx_checksum():
    assert engine_key(0, "fp16", H200, TRT, SHA) == "fold_0.fp16.nvidia-h200-sm90.trt10.8.0.43.3f2a9c01b7de"
    assert engine_relpath("all", "fp32", A100, TRT, SHA) == (
        "engines/nvidia-a100-sxm4-80gb-sm80/fold_all.fp32.trt10.8.0.43.3f2a9c01b7de.engine"
    )
    assert timing_cache_relpath(H200, TRT) == "timing_caches/nvidia-h200-sm90.trt10.8.0.43.cache"
    # GPUs of one kind share a key, and so one engine and one timing cache
    assert engine_key(0, "fp16", H200, TRT, SHA) == engine_key(0, "fp16", H200_B, TRT, SHA)


def test_gpu_selection_and_one_engine_per_kind():
    devices = [H200, H200_B, A100]
    assert parse_gpu_selection("all", devices) == devices
    assert parse_gpu_selection("2, 0", devices) == [A100, H200]
    assert parse_gpu_selection("0,0", devices) == [H200]
    assert one_per_kind(devices) == [H200, A100]
    with pytest.raises(ConfigurationError, match="GPU 5 does not exist on this machine"):
        parse_gpu_selection("5", devices)
    with pytest.raises(ConfigurationError, match="The GPU selection is 'all'.*\\(gpus\\)"):
        parse_gpu_selection("first", devices)
    with pytest.raises(EngineError, match="No CUDA device"):
        parse_gpu_selection("all", [])


# ---- batch profiles -----------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [("1:2:4", (1, 2, 4)), ("2", (2, 2, 2)), (" 1:1:8 ", (1, 1, 8))])
def test_batch_profile_parses(text, expected):
    profile = BatchProfile.parse(text)
    assert (profile.min, profile.opt, profile.max) == expected
    assert str(BatchProfile.parse(str(profile))) == str(profile)


@pytest.mark.parametrize("text", ["4:2:1", "0:1:2", "1:2", "a:b:c", "1:2:3:4", "", "1.5:2:3", "-1:1:1"])
def test_batch_profile_refuses_bad_text(text):
    with pytest.raises(ConfigurationError) as caught:
        BatchProfile.parse(text)
    assert "\n" not in str(caught.value)


def test_batch_profile_shapes_checks_and_splits():
    profile = BatchProfile(1, 2, 4)
    assert profile.shapes((1, 64, 64, 64)) == ((1, 1, 64, 64, 64), (2, 1, 64, 64, 64), (4, 1, 64, 64, 64))
    assert BatchProfile.default_for(4) == BatchProfile(1, 4, 4)
    assert BatchProfile.from_dict(profile.to_dict()) == profile
    profile.check_batch(4)
    with pytest.raises(EngineError, match="Batch 5 is outside the engine's profile 1:2:4"):
        profile.check_batch(5)
    assert split_batch(10, profile) == [(0, 4), (4, 8), (8, 10)]
    assert split_batch(3, profile) == [(0, 3)]


# ---- manifest records and the mismatch check ----------------------------------------------------


def test_record_has_what_loading_compares():
    record = _record()
    assert record["gpu"] == {"name": "NVIDIA H200", "compute_capability": [9, 0], "kind": "nvidia-h200-sm90"}
    assert record["tensorrt"]["version"] == TRT and record["onnx"]["sha256"] == SHA
    assert record["profile"] == {"min": 1, "opt": 2, "max": 4} and record["tf32"] is False
    assert record["input"]["shape"] == ["batch", 1, 64, 64, 64]


def test_matching_engine_is_found():
    manifest = _manifest(_record(A100), _record(H200))
    found = find_engine_record(manifest["engines"], onnx_sha256=SHA, fold=0, precision="fp16", gpu=H200_B, trt_version=TRT, bundle_path="b")
    assert found["gpu"]["name"] == "NVIDIA H200"
    assert engine_mismatch(found, gpu=H200, trt_version=TRT, onnx_sha256=SHA) is None


def _refusal(manifest: dict, gpu: GpuInfo = H200, trt: str = TRT) -> str:
    with pytest.raises(EngineMismatchError) as caught:
        find_engine_record(manifest["engines"], onnx_sha256=manifest["onnx"]["fold_0.fp16"]["sha256"], fold=0,
                           precision="fp16", gpu=gpu, trt_version=trt, bundle_path="/data/bundle")
    message = str(caught.value)
    # one sentence that ends with the rebuild command
    assert message.endswith("rebuild it with `tucker-export build /data/bundle --precision fp16`.")
    assert message.count(". ") == 0 and "\n" not in message
    return message


def test_engine_for_another_gpu_is_refused():
    message = _refusal(_manifest(_record(A100)))
    assert "was built for NVIDIA A100-SXM4-80GB (sm80) and this GPU is NVIDIA H200 (sm90)" in message


def test_engine_for_another_tensorrt_is_refused():
    message = _refusal(_manifest(_record(H200, trt="10.3.0")))
    assert "was built with TensorRT 10.3.0 and this machine has TensorRT 10.8.0.43" in message


def test_engine_from_an_older_onnx_export_is_refused():
    message = _refusal(_manifest(_record(H200), onnx_sha=NEW_SHA))
    assert "was built from an older ONNX export (sha256 3f2a9c01b7de, now 99aa11111111)" in message


def test_the_explanation_prefers_the_engine_of_this_gpu_kind():
    message = _refusal(_manifest(_record(A100), _record(H200, trt="10.3.0")))
    assert "TensorRT 10.3.0" in message


def test_missing_engine_says_how_to_build_one():
    with pytest.raises(EngineError) as caught:
        find_engine_record({}, onnx_sha256=SHA, fold=0, precision="fp16", gpu=H200, trt_version=TRT, bundle_path="b")
    assert not isinstance(caught.value, EngineMismatchError)
    assert str(caught.value) == (
        "Bundle b has no TensorRT engine for fold 0 fp16; build one with `tucker-export build b --precision fp16`."
    )


def test_changed_engine_file_is_refused():
    record = _record()
    check_engine_file(record, "e" * 64, "b")
    with pytest.raises(EngineMismatchError, match="differs from the one recorded"):
        check_engine_file(record, "f" * 64, "b")


def test_a_new_build_supersedes_older_engines_of_the_same_gpu_kind_only():
    old_trt, other_gpu, current = _record(H200, trt="10.3.0"), _record(A100), _record(H200)
    manifest = _manifest(old_trt, other_gpu, current)
    assert superseded_records(manifest["engines"], fold=0, precision="fp16", gpu=H200, keep_key=current["key"]) == [old_trt["key"]]


def test_rebuild_command():
    assert rebuild_command("b", "fp32") == "tucker-export build b --precision fp32"
