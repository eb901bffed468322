"""`export-triton`: the demo bundle's repository parses into Triton's ModelConfig; bad input is one sentence."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("tritonclient.grpc.model_config_pb2")

from google.protobuf import text_format  # noqa: E402
from tritonclient.grpc import model_config_pb2  # noqa: E402

from tucker_export.errors import BundleError, ConfigurationError, EngineError  # noqa: E402
from tucker_export.scaleout.triton import (  # noqa: E402
    TritonOptions,
    export_triton_repository,
    instance_groups,
    parse_gpu_list,
    tensor_specs,
)


def _parse(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def _bundle_copy(demo_bundle: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(demo_bundle, copy)
    return copy


def _fake_engine(bundle_path: Path, *, gpu_name: str, cc: tuple[int, int], trt: str = "10.8.0.43",
                 onnx_sha256: str | None = None, profile: tuple[int, int, int] = (1, 2, 4)) -> str:
    """An engine record as `build` writes it, with stand-in plan bytes (TensorRT cannot run here)."""
    from tucker_export._io import sha256_file
    from tucker_export.bundle import Bundle
    from tucker_export.engines.keys import (
        ENGINES_SECTION,
        BatchProfile,
        GpuInfo,
        engine_key,
        engine_record,
        engine_relpath,
    )

    bundle = Bundle.load(bundle_path)
    onnx_entry = bundle.onnx_entry(0, "fp32")
    gpu = GpuInfo(0, gpu_name, cc)
    sha = onnx_sha256 or onnx_entry["sha256"]
    relpath = engine_relpath(0, "fp32", gpu, trt, sha)
    plan = bundle_path / relpath
    plan.parent.mkdir(parents=True, exist_ok=True)
    plan.write_bytes(f"plan for {gpu.kind}".encode())
    key = engine_key(0, "fp32", gpu, trt, sha)
    record = engine_record(
        key=key, fold=0, precision="fp32", gpu=gpu, trt_version=trt, trt_api={"major": 10},
        onnx_key="fold_0.fp32", onnx_entry={**onnx_entry, "sha256": sha}, engine_file=relpath,
        engine_sha256=sha256_file(plan), size_bytes=plan.stat().st_size, profile=BatchProfile(*profile),
        workspace_gib=4.0, tf32=False, timing_cache_file="", build_seconds=1.0, built="2026-12-04T00:00:00+00:00",
    )
    bundle.record(ENGINES_SECTION, key, record)
    return key


def test_onnx_repository_parses_into_model_config(demo_bundle, tmp_path):
    repo = tmp_path / "repo"
    result = export_triton_repository(demo_bundle, repo, TritonOptions(gpus=(0, 1), name="demo"))
    assert [m.name for m in result.models] == ["demo_fold_0_fp32"]
    model_dir = repo / "demo_fold_0_fp32"
    config = _parse(model_dir / "config.pbtxt")
    manifest = json.loads((demo_bundle / "bundle.json").read_text())
    entry = manifest["onnx"]["fold_0.fp32"]

    assert config.name == "demo_fold_0_fp32" and config.backend == "onnxruntime"
    assert config.max_batch_size == entry["max_batch"]
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [
        ("input", model_config_pb2.TYPE_FP32, entry["input"]["shape"][1:])]
    assert [(t.name, list(t.dims)) for t in config.output] == [("logits", entry["output"]["shape"][1:])]
    assert config.HasField("dynamic_batching")
    assert [(g.kind, list(g.gpus)) for g in config.instance_group] == [
        (model_config_pb2.ModelInstanceGroup.KIND_GPU, [0]), (model_config_pb2.ModelInstanceGroup.KIND_GPU, [1])]
    assert config.parameters["tucker_export.onnx_sha256"].string_value == entry["sha256"]
    assert (model_dir / "1" / "model.onnx").read_bytes() == (demo_bundle / entry["file"]).read_bytes()


def test_rerun_refuses_existing_models_unless_overwrite(demo_bundle, tmp_path):
    repo = tmp_path / "repo"
    export_triton_repository(demo_bundle, repo, TritonOptions(gpus=None, cpu_instances=2))
    with pytest.raises(ConfigurationError, match="overwrite=True"):
        export_triton_repository(demo_bundle, repo, TritonOptions())
    export_triton_repository(demo_bundle, repo, TritonOptions(overwrite=True))
    names = [p.name for p in repo.iterdir()]
    assert len(names) == 1 and not any(n.startswith(".") for n in names)  # no staging leftovers


def test_tensorrt_repository_has_one_labelled_plan_per_gpu_kind(demo_bundle, tmp_path):
    bundle = _bundle_copy(demo_bundle, tmp_path)
    h200 = _fake_engine(bundle, gpu_name="NVIDIA H200", cc=(9, 0), profile=(1, 2, 4))
    l4 = _fake_engine(bundle, gpu_name="NVIDIA L4", cc=(8, 9), profile=(1, 2, 2))
    repo = tmp_path / "repo"
    result = export_triton_repository(bundle, repo, TritonOptions(backend="tensorrt", name="demo"))
    model_dir = repo / "demo_fold_0_fp32_trt"
    config = _parse(model_dir / "config.pbtxt")

    assert config.backend == "tensorrt"
    assert dict(config.cc_model_filenames) == {"9.0": "model.nvidia-h200-sm90.plan", "8.9": "model.nvidia-l4-sm89.plan"}
    assert config.parameters["tucker_export.engine_key.9.0"].string_value == h200
    assert config.parameters["tucker_export.engine_key.8.9"].string_value == l4
    assert config.max_batch_size == 2  # the batch range every plan accepts
    assert sorted(p.name for p in (model_dir / "1").iterdir()) == sorted(config.cc_model_filenames.values())
    assert result.models[0].engine_keys == {"nvidia-h200-sm90": h200, "nvidia-l4-sm89": l4}


def test_tensorrt_refuses_missing_stale_or_ambiguous_engines(demo_bundle, tmp_path):
    bundle = _bundle_copy(demo_bundle, tmp_path)
    tensorrt = TritonOptions(backend="tensorrt")
    with pytest.raises(EngineError, match="no TensorRT engine of fold 0 fp32.*tucker-export build"):
        export_triton_repository(bundle, tmp_path / "a", tensorrt)

    _fake_engine(bundle, gpu_name="NVIDIA A100-SXM4-80GB", cc=(8, 0))
    _fake_engine(bundle, gpu_name="NVIDIA A30", cc=(8, 0))
    with pytest.raises(ConfigurationError, match="share 8.0.*--gpu-kind"):
        export_triton_repository(bundle, tmp_path / "b", tensorrt)
    export_triton_repository(bundle, tmp_path / "c", tensorrt, gpu_kinds=("nvidia-a30-sm80",))

    _fake_engine(bundle, gpu_name="NVIDIA H200", cc=(9, 0), onnx_sha256="0" * 64)
    with pytest.raises(EngineError, match="older ONNX export"):
        export_triton_repository(bundle, tmp_path / "d", tensorrt, gpu_kinds=("nvidia-h200-sm90",))
    assert not (tmp_path / "d").exists()


def test_onnx_that_does_not_match_the_bundle_is_refused(demo_bundle, tmp_path):
    bundle = _bundle_copy(demo_bundle, tmp_path)
    manifest_path = bundle / "bundle.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["onnx"]["fold_0.fp32"]["input"]["name"] = "images"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="does not match the bundle.*tucker-export export"):
        export_triton_repository(bundle, tmp_path / "repo")


def test_plain_decisions():
    assert parse_gpu_list("0, 2,2") == (0, 2) and parse_gpu_list("none") is None
    with pytest.raises(ConfigurationError, match="not GPU numbers"):
        parse_gpu_list("first")
    assert instance_groups(None, 3) == [{"name": "cpu", "kind": "KIND_CPU", "count": 3}]
    fixed = {"inputs": [{"name": "x", "elem_type": 1, "shape": [1, 1, 8, 8, 8]}],
             "outputs": [{"name": "y", "elem_type": 10, "shape": [1, 3, 8, 8, 8]}]}
    batched, inputs, outputs = tensor_specs(fixed)
    assert not batched and inputs[0].dims == (1, 1, 8, 8, 8) and outputs[0].data_type == "TYPE_FP16"
    with pytest.raises(BundleError, match="symbolic dim"):
        tensor_specs({"inputs": [{"name": "x", "elem_type": 1, "shape": [None, 1, None, 8, 8]}],
                      "outputs": [{"name": "y", "elem_type": 1, "shape": [None, 3, 8, 8, 8]}]})
    with pytest.raises(ConfigurationError, match="Unknown Triton backend 'tflite'"):
        TritonOptions(backend="tflite")


def test_cli_bad_input_is_one_sentence(demo_bundle, tmp_path):
    from click.testing import CliRunner

    from tucker_export.cli import cli

    runner = CliRunner()
    for args, expected in ((["-p", "fp16"], "no fp16 ONNX export of fold 0"),
                           (["--backend", "tflite"], "Unknown Triton backend"),
                           (["--backend", "tensorrt", "--gpus", "none"], "GPUs only")):
        result = runner.invoke(cli, ["export-triton", str(demo_bundle), "-o", str(tmp_path / "repo"), *args])
        assert result.exit_code == 1, result.output
        assert expected in result.output and "Traceback" not in result.output
    report = tmp_path / "triton.json"
    result = runner.invoke(cli, ["export-triton", str(demo_bundle), "-o", str(tmp_path / "repo"), "--report", str(report)])
    assert result.exit_code == 0, result.output
    assert json.loads(report.read_text())["models"][0]["max_batch_size"] == 4
