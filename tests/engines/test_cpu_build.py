"""OpenVINO CPU engines: tiles, the accuracy gate, the precision ranking, and build/select/refuse on a real bundle."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from click.testing import CliRunner

from tucker_export.bundle import Bundle
from tucker_export.engines.cpu_build import build_cpu_engines, rank_cpu_precisions, resolve_cpu_models
from tucker_export.engines.cpu_gate import (
    GATE_BARS,
    class_dice_of_argmax,
    crop_positions,
    crop_tile,
    judge_gate,
    split_counts,
)
from tucker_export.engines.cpu_keys import CPU_ENGINES_SECTION, CpuInfo, cpu_engine_key, detect_cpu
from tucker_export.engines.runners import OpenVinoRunner
from tucker_export.engines.selection import decide_backend, select_backend
from tucker_export.errors import (
    BackendUnavailableError,
    BundleError,
    ConfigurationError,
    EngineError,
    ValidationFailedError,
)
from tucker_export.exporter.rebuild import build_network

openvino = pytest.importorskip("openvino")


# ---- plain code -----------------------------------------------------------------------------------


def test_tiles_are_seeded_crops_padded_like_nnunet():
    rng_a, rng_b = np.random.default_rng(3), np.random.default_rng(3)
    assert crop_positions((40, 50, 60), (16, 16, 16), 5, rng_a) == crop_positions((40, 50, 60), (16, 16, 16), 5, rng_b)
    assert all(c == (0, 0) for c in crop_positions((8, 8), (16, 16), 3, np.random.default_rng(0)))
    tile = crop_tile(np.ones((1, 8, 20), np.float32), (0, 2), (16, 16))
    assert tile.shape == (1, 16, 16) and tile[0, :8].sum() == 8 * 16 and tile[0, 8:].sum() == 0
    assert split_counts(7, 3) == [3, 2, 2] and split_counts(2, 4) == [1, 1, 0, 0]


def _logits(labels: np.ndarray, classes: int = 3) -> np.ndarray:
    return np.eye(classes, dtype=np.float32)[labels].transpose(0, 4, 1, 2, 3)


def test_gate_bars_per_precision(monkeypatch):
    ref_labels = np.zeros((2, 4, 4, 4), int)
    ref_labels[:, :2] = 1
    ref_labels[:, 3, :1] = 2
    monkeypatch.setitem(GATE_BARS, "bf16", dataclasses.replace(GATE_BARS["bf16"], min_class_voxels=1))
    reference = _logits(ref_labels)
    assert judge_gate(reference, reference + 1e-4, "fp32", label="f0")["passed"]
    failed = judge_gate(reference, reference + 0.01, "fp32", label="f0")
    assert not failed["passed"] and failed["failures"] == ["f0: max abs logit diff 0.01 > 0.001 x logit scale 1"]
    assert judge_gate(50 * reference, 50 * reference + 0.01, "fp32", label="f0")["passed"]  # relative to the logits
    moved = ref_labels.copy()
    moved[0, 3, 0, :2] = 0  # two voxels of class 2 lost: argmax 98.4 %, class 2 Dice 12/14
    verdict = judge_gate(reference, _logits(moved), "bf16", label="f0 bf16")
    assert not verdict["passed"]
    assert verdict["failures"][0] == "f0 bf16: argmax agreement 98.44% < 99.5%"
    assert verdict["failures"][1] == "f0 bf16: tile Dice vs PyTorch below 0.98 (class 2 0.857)"
    assert class_dice_of_argmax(reference, reference) == {1: 1.0, 2: 1.0}
    assert class_dice_of_argmax(reference, reference, min_voxels=9) == {1: 1.0}  # 8 voxels of class 2: too few


CPU = CpuInfo("Test CPU", 6, 143, frozenset({"avx512f", "amx_bf16"}))


def _rec(precision, latency, passed=True, sha="a" * 64, fold=0):
    return {"key": cpu_engine_key(fold, precision, CPU, "1.0", sha), "fold": fold, "precision": precision,
            "cpu": CPU.to_dict(), "openvino": {"version": "1.0"}, "onnx": {"sha256": sha}, "file": "f.blob",
            "gate": {"passed": passed}, "latency_ms": latency}


def test_auto_precision_takes_the_fastest_gated_model_then_the_default():
    records = {r["key"]: r for r in (_rec("fp32", 30.0), _rec("bf16", 12.0), _rec("int8", 8.0, passed=False))}
    kwargs = dict(folds=[0], cpu=CPU, openvino_version="1.0", onnx_sha256={0: "a" * 64})
    assert rank_cpu_precisions(records, default="bf16", **kwargs) == ["bf16", "fp32"]
    stale = dict(kwargs, onnx_sha256={0: "b" * 64})
    assert rank_cpu_precisions(records, default="bf16", **stale) == ["bf16", "fp32"]
    assert rank_cpu_precisions({}, default="fp32", **kwargs) == ["fp32"]
    records["int8ok"] = _rec("int8", 5.0)
    assert rank_cpu_precisions(records, default="bf16", **kwargs)[0] == "int8"


def test_decision_table_with_openvino():
    common = dict(device_type="cpu", trt_problem=None, onnx_problem=None, ort_providers=("CPUExecutionProvider",))
    assert decide_backend("auto", precision="auto", openvino_note="bf16", **common).backend == "openvino"
    fallback = decide_backend("auto", precision="auto", openvino_problem=BackendUnavailableError("OpenVINO is not installed."), **common)
    assert fallback.backend == "ort" and fallback.reason == "no OpenVINO: OpenVINO is not installed; ONNX Runtime CPU provider (fp32)"
    assert decide_backend("auto", precision="fp32", **common).backend == "ort"  # an ORT precision keeps ORT
    with pytest.raises(EngineError):
        decide_backend("auto", precision="bf16", openvino_problem=EngineError("no bf16."), **common)
    with pytest.raises(ConfigurationError, match="Precision bf16 runs on the openvino backend"):
        decide_backend("ort", precision="bf16", **common)
    with pytest.raises(ConfigurationError, match="not fp16"):
        decide_backend("openvino", precision="fp16", **common)
    with pytest.raises(BackendUnavailableError, match="OpenVINO runs on the CPU"):
        decide_backend("openvino", precision="auto", **{**common, "device_type": "cuda"})


# ---- on a real (random-weight) bundle -----------------------------------------------------------


def test_fp32_build_records_the_gate_and_runs_like_pytorch(exported_bundle):
    bundle = Bundle.load(exported_bundle)
    results = build_cpu_engines(bundle, ["fp32"], folds=[0], progress=False)
    record = results[0].record
    assert record["gate"]["passed"] and record["gate"]["max_abs_diff"] < 1e-3
    assert record["gate"]["tiles"]["kind"] == "seeded_normal" and record["calibration"] is None
    assert record["cpu"]["kind"] == detect_cpu().kind and record["latency_ms"] > 0
    saved = json.loads((exported_bundle / "bundle.json").read_text())[CPU_ENGINES_SECTION][record["key"]]
    assert saved["file"].startswith(f"cpu_engines/{detect_cpu().kind}/fold_0.fp32.ov")
    x = np.random.default_rng(1).standard_normal((3, bundle.num_input_channels, *bundle.patch_size), dtype=np.float32)
    import torch

    with torch.inference_mode():
        expected = build_network(bundle, 0)(torch.from_numpy(x)).numpy()
    with OpenVinoRunner(exported_bundle / saved["file"], precision="fp32") as runner:
        assert np.abs(runner.infer(x) - expected).max() < 1e-3
        assert isinstance(runner.infer(torch.from_numpy(x)), torch.Tensor)


def test_a_precision_that_misses_its_bar_is_recorded_not_shipped(exported_bundle):
    # Random weights give near-tie logits, which bf16 flips: the gate must catch it.
    from tucker_export.engines.openvino_backend import cpu_capabilities

    if "BF16" not in cpu_capabilities():
        pytest.skip("this CPU has no bf16 in OpenVINO")
    bundle = Bundle.load(exported_bundle)
    with pytest.raises(ValidationFailedError, match=r"missed their accuracy bar and were not shipped: fold 0 bf16: argmax"):
        build_cpu_engines(bundle, ["bf16"], folds=[0], progress=False)
    (record,) = Bundle.load(exported_bundle).manifest[CPU_ENGINES_SECTION].values()
    assert record["file"] is None and not record["gate"]["passed"]
    with pytest.raises(EngineError, match="missed its accuracy bar when it was built"):
        resolve_cpu_models(Bundle.load(exported_bundle), "bf16", [0])
    # auto goes past the failed bf16 to fp32, built and gated on first use.
    factory, reason = select_backend("auto", Bundle.load(exported_bundle), "auto", "cpu", [0])
    assert factory.backend == "openvino" and factory.precision == "fp32" and "gated for" in reason


def test_foreign_stale_or_corrupt_compiled_models_are_never_used(exported_bundle):
    bundle = Bundle.load(exported_bundle)
    (result,) = build_cpu_engines(bundle, ["fp32"], folds=[0], progress=False)
    key = result.record["key"]
    # Another CPU kind's model: refused, and a model for this CPU is compiled beside it.
    foreign = dict(result.record, cpu={**result.record["cpu"], "kind": "amd-epyc-9654-f25m17-avx512"}, key="foreign")
    bundle.remove_record(CPU_ENGINES_SECTION, key)
    bundle.record(CPU_ENGINES_SECTION, "foreign", foreign)
    models = resolve_cpu_models(Bundle.load(exported_bundle), "fp32", [0])
    assert not isinstance(models.models[0], (str,)) and key in Bundle.load(exported_bundle).manifest[CPU_ENGINES_SECTION]
    assert "foreign" in Bundle.load(exported_bundle).manifest[CPU_ENGINES_SECTION]
    # A blob whose bytes changed: one sentence naming the file.
    blob = exported_bundle / Bundle.load(exported_bundle).manifest[CPU_ENGINES_SECTION][key]["file"]
    blob.write_bytes(b"corrupt")
    with pytest.raises(BundleError, match="does not match the bundle manifest"):
        resolve_cpu_models(Bundle.load(exported_bundle), "fp32", [0])


def test_bad_requests_are_one_sentence(exported_bundle, monkeypatch):
    from tucker_export.cli import cli
    from tucker_export.engines import openvino_backend

    result = CliRunner().invoke(cli, ["build", str(exported_bundle), "--backend", "openvino", "--precision", "int8"])
    assert result.exit_code == 1 and "int8 needs calibration scans" in result.output and "(--calibration-dir)" in result.output
    result = CliRunner().invoke(cli, ["build", str(exported_bundle), "--backend", "openvino", "--precision", "int8",
                                      "--calibration-dir", str(exported_bundle / "nowhere")])
    assert result.exit_code == 1 and "nowhere do not exist" in result.output
    assert "Traceback" not in result.output
    monkeypatch.setattr(openvino_backend, "cpu_capabilities", lambda: ["FP32", "INT8"])
    with pytest.raises(EngineError, match="has no bf16 support in OpenVINO"):
        build_cpu_engines(exported_bundle, ["bf16"], progress=False)
    bundle = Bundle.load(exported_bundle)
    bundle.remove_record("onnx", "fold_1.fp32")
    with pytest.raises(BundleError, match="no fp32 ONNX export of fold 1, which OpenVINO compiles from"):
        build_cpu_engines(bundle, ["fp32"], progress=False)
