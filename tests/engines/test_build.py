"""The build plan over a real bundle manifest, and `build` without TensorRT (this machine): no TensorRT calls."""

from __future__ import annotations

import importlib.util

import pytest
from click.testing import CliRunner

from tucker_export.bundle import Bundle
from tucker_export.engines.build import available_precisions, build_engines, plan_builds
from tucker_export.engines.keys import BatchProfile, GpuInfo
from tucker_export.errors import BackendUnavailableError, BundleError, ConfigurationError

from .conftest import tensorrt_and_cuda

H200 = GpuInfo(0, "NVIDIA H200", (9, 0))
H200_B = GpuInfo(1, "NVIDIA H200", (9, 0))
L4 = GpuInfo(2, "NVIDIA L4", (8, 9))
TRT = "10.8.0.43"


def _plan(bundle: Bundle, **overrides):
    options = {
        "folds": bundle.folds, "precisions": ("fp32", "fp16"),
        "gpus": [H200, H200_B, L4], "trt_version": TRT, "batch_profile": None, "workspace_gib": 4.0,
    }
    return plan_builds(bundle, **{**options, **overrides})


def test_one_job_per_fold_precision_and_gpu_kind(exported_bundle):
    bundle = Bundle.load(exported_bundle)
    jobs = _plan(bundle)
    assert len(jobs) == 2 * 2 * 2  # folds x precisions x GPU kinds (the two H200s share)
    assert {job.gpu.index for job in jobs} == {0, 2}
    job = next(j for j in jobs if (j.fold, j.precision, j.gpu.index) == (1, "fp16", 0))
    onnx_entry = bundle.manifest["onnx"]["fold_1.fp16"]
    assert job.onnx_file == "onnx/fold_1.fp16.onnx" and job.onnx_sha256 == onnx_entry["sha256"]
    assert job.key == f"fold_1.fp16.nvidia-h200-sm90.trt{TRT}.{onnx_entry['sha256'][:12]}"
    assert job.engine_file == f"engines/nvidia-h200-sm90/fold_1.fp16.trt{TRT}.{onnx_entry['sha256'][:12]}.engine"
    assert job.timing_cache_file == f"timing_caches/nvidia-h200-sm90.trt{TRT}.cache"
    assert job.input_name == "input" and job.sample_shape == (1, 16, 16, 16)
    # the default profile tops out at the export's --max-batch
    assert job.profile == BatchProfile(1, 4, 4)


def test_given_profile_and_workspace_are_used(exported_bundle):
    jobs = _plan(Bundle.load(exported_bundle), batch_profile=BatchProfile(1, 2, 8), workspace_gib=2.5, gpus=[L4])
    assert {(j.profile, j.workspace_gib) for j in jobs} == {(BatchProfile(1, 2, 8), 2.5)}


def test_missing_exports_are_all_named_with_the_export_command(exported_bundle):
    bundle = Bundle.load(exported_bundle)
    bundle.remove_record("onnx", "fold_0.fp16")
    bundle.remove_record("onnx", "fold_1.fp16")
    with pytest.raises(BundleError) as caught:
        _plan(bundle)
    message = str(caught.value)
    assert "no ONNX export fold_0.fp16" in message and "no ONNX export fold_1.fp16" in message
    assert f"`tucker-export export {bundle.path} --precision fp16`" in message
    assert available_precisions(bundle) == ("fp32",)


def test_static_batch_exports_are_refused(exported_bundle):
    bundle = Bundle.load(exported_bundle)
    bundle.manifest["onnx"]["fold_0.fp32"]["input"]["shape"] = [1, 1, 16, 16, 16]
    with pytest.raises(BundleError, match="not \\(batch, C, \\*patch\\) with a dynamic batch axis"):
        _plan(bundle, precisions=("fp32",))


def test_bad_workspace_is_refused(exported_bundle):
    with pytest.raises(ConfigurationError, match="workspace must be a positive number.*workspace_gib"):
        _plan(Bundle.load(exported_bundle), workspace_gib=0)


@pytest.mark.skipif(tensorrt_and_cuda(), reason="this machine has TensorRT and a GPU")
def test_build_without_tensorrt_or_cuda_says_so_in_one_sentence(exported_bundle):
    with pytest.raises(BackendUnavailableError) as caught:
        build_engines(exported_bundle, ("fp16",), "all", "1:2:4", 4.0, progress=False)
    message = str(caught.value)
    assert "\n" not in message and message.endswith(".") and message.count(". ") == 0
    if importlib.util.find_spec("tensorrt") is None:
        assert message.startswith("TensorRT is not installed")
    else:
        assert "no CUDA GPU is visible" in message


@pytest.mark.skipif(tensorrt_and_cuda(), reason="this machine has TensorRT and a GPU")
def test_build_command_exits_1_without_tensorrt(exported_bundle):
    from tucker_export.cli.build import build_command

    try:  # through the real CLI group when the lead has registered the command there
        from tucker_export.cli import cli

        registered = "build" in cli.commands
    except ImportError:
        registered = False
    if registered:
        result = CliRunner().invoke(cli, ["build", str(exported_bundle), "--precision", "fp16"])
        assert result.exit_code == 1
        assert result.output.strip().count("\n") == 0 and ("TensorRT" in result.output)
    result = CliRunner().invoke(build_command, [str(exported_bundle), "--precision", "fp16"])
    assert isinstance(result.exception, BackendUnavailableError)


def test_build_command_refuses_a_bad_profile_before_any_work(exported_bundle):
    from tucker_export.cli.build import build_command

    result = CliRunner().invoke(build_command, [str(exported_bundle), "--batch", "4:2:1"])
    assert isinstance(result.exception, ConfigurationError)
    assert "1 <= MIN <= OPT <= MAX" in str(result.exception)
