"""`bench`: ORT runner latency, option parsers, the bundle report (sizes, counts, skips), the sweep's JSON and PNG,
CLI errors. Latency statistics and peak memory are in test_timing.py, the quiet verdict in test_machine.py.

Random-weight factory models keep this file fast; they say nothing about accuracy or speed, so no test
compares timings (a shared CPU makes any "faster than" assertion flaky) and no test expects a Dice.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np
import pytest
import SimpleITK as sitk
from click.testing import CliRunner
from factories import make_model_folder

from tucker_export.bundle import Bundle
from tucker_export.cli import _Group
from tucker_export.cli.bench import bench_command
from tucker_export.errors import ConfigurationError
from tucker_export.validation.bench import bench_bundle, format_bench_report
from tucker_export.validation.bench_common import parse_batch_sizes
from tucker_export.validation.sweep import parse_rank_factors
from tucker_export.validation.timing import latency

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    """A 2-fold factory model, its rank-0.5 bundle with fp32 ONNX, one CT-like image and its label map."""
    from tucker_export.exporter.decompose import decompose_model
    from tucker_export.exporter.onnx_export import export_bundle
    from tucker_export.exporter.ranks import RankPolicy

    root = tmp_path_factory.mktemp("bench")
    model_dir = make_model_folder(root / "model", folds=(0, 1), features=(16, 32, 64))
    bundle = decompose_model(model_dir, root / "bundle", policy=RankPolicy(mode="relative", factor=0.5), progress=False)
    export_bundle(bundle, precisions=("fp32",), progress=False)
    images, labels = root / "images", root / "labels"
    images.mkdir()
    labels.mkdir()
    rng = np.random.default_rng(0)
    image = sitk.GetImageFromArray(rng.normal(0, 300, (18, 22, 20)).astype(np.int16))
    image.SetSpacing((1.2, 1.0, 1.5))
    sitk.WriteImage(image, str(images / "case0_0000.nii.gz"))
    label = sitk.GetImageFromArray(rng.integers(0, 4, (18, 22, 20)).astype(np.uint8))
    label.CopyInformation(image)
    sitk.WriteImage(label, str(labels / "case0.nii.gz"))
    return {"root": root, "model": model_dir, "bundle": root / "bundle", "images": images, "labels": labels}


def _group() -> click.Group:
    """The command under the CLI's own error handling (one sentence, exit 1), whether or not cli.py registers it."""

    @click.group(cls=_Group)
    @click.pass_context
    def group(ctx: click.Context) -> None:
        ctx.obj = {"verbosity": -1}

    group.add_command(bench_command, "bench")
    return group


# ---- latency ------------------------------------------------------------------------------------


def test_latency_of_an_onnx_runtime_runner(setup) -> None:
    from tucker_export.engines.runners import OnnxRuntimeRunner

    with OnnxRuntimeRunner(setup["bundle"] / "onnx" / "fold_0.fp32.onnx") as runner:
        stats = latency(runner, (1, 16, 16, 16), batch_sizes=(2,), warmup=1, repeats=3)
    assert stats[2].min_s <= stats[2].median_s <= stats[2].max_s
    assert stats[2].per_patch_median_s == pytest.approx(stats[2].median_s / 2)


def test_option_parsers() -> None:
    assert parse_batch_sizes("1,2, 4,2") == (1, 2, 4)
    assert parse_rank_factors("0.9,0.5 0.9") == (0.9, 0.5)
    for bad, message in (("0", r"\(0, 1\]"), ("1.2", r"\(0, 1\]"), ("x", "not a number"), ("", "At least one")):
        with pytest.raises(ConfigurationError, match=message):
            parse_rank_factors(bad)
    with pytest.raises(ConfigurationError, match="not an integer"):
        parse_batch_sizes("1,two")


# ---- one bundle ---------------------------------------------------------------------------------


def test_bench_bundle_report(setup) -> None:
    report = bench_bundle(setup["bundle"], backends=("torch", "ort", "trt", "onnxruntime"), precisions=("fp32", "fp16"),
                          batch_sizes=(1, 2), warmup=1, repeats=2)
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    manifest = Bundle.load(setup["bundle"]).manifest

    # params and MACs are the manifest's, and their ratios agree with the counts
    for fold, figures in data["compute"].items():
        totals = manifest["folds"][fold]["totals"]
        for key in ("params_before", "params_after", "macs_before", "macs_after"):
            assert figures[key] == totals[key]
        assert figures["params_ratio"] == pytest.approx(totals["params_after"] / totals["params_before"])
        assert figures["macs_ratio"] == pytest.approx(totals["macs_after"] / totals["macs_before"])
        assert figures["macs_speedup_bound"] == pytest.approx(1 / figures["macs_ratio"])
    # sizes are the files' own
    for key, entry in manifest["onnx"].items():
        assert data["sizes"]["onnx"][key]["bytes"] == (setup["bundle"] / entry["file"]).stat().st_size
    for fold, entry in manifest["folds"].items():
        assert data["sizes"]["weights"][fold] == (setup["bundle"] / entry["weights"]["file"]).stat().st_size

    results = {(r["backend"], r["precision"]): r for r in data["results"]}
    assert list(results) == [("torch", "fp32"), ("torch", "fp16"), ("ort", "fp32"), ("ort", "fp16"),
                             ("trt", "fp32"), ("trt", "fp16")]  # "onnxruntime" is ort, measured once
    assert {k for k, r in results.items() if r["status"] == "measured"} == {("torch", "fp32"), ("ort", "fp32")}
    assert "CUDA" in results[("torch", "fp16")]["reason"]
    assert "no fp16 ONNX export" in results[("ort", "fp16")]["reason"]
    assert results[("trt", "fp32")]["status"] == "skipped" and results[("trt", "fp32")]["reason"]
    for key in (("torch", "fp32"), ("ort", "fp32")):
        (fold,) = results[key]["folds"]  # folds 0 and 1 share their ranks: one is timed for both
        assert fold["fold"] == "0" and fold["same_structure"] == ["0", "1"]
        assert [s["batch_size"] for s in fold["latency"]] == [1, 2]
        assert fold["memory"]["peak_rss_bytes"] > 0 and fold["memory"]["rss_scope"]
        assert results[key]["end_to_end"] is None
    text = format_bench_report(report)
    assert "skipped ort fp16" in text and "median" in text


def test_bench_bundle_end_to_end_per_case(setup) -> None:
    report = bench_bundle(setup["bundle"], backends=("ort",), batch_sizes=(1,), warmup=0, repeats=1,
                          input_dir=setup["images"], use_mirroring=False)
    e2e = report.results[0].end_to_end
    assert e2e is not None and e2e.settings["mirroring"] is False and e2e.settings["folds"] == ["0", "1"]
    (case,) = e2e.cases
    assert case["case"] == "case0" and case["status"] == "done"
    parts = [case["check_s"], case["read_s"], case["preprocess_s"], case["network_s"], case["export_s"]]
    assert all(p >= 0 for p in parts) and case["total_s"] == pytest.approx(sum(parts))
    assert e2e.summary["done"] == 1 and e2e.memory["peak_rss_bytes"] > 0


# ---- CLI ----------------------------------------------------------------------------------------


def test_cli_bench_writes_json(setup, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "bench.json"
    result = runner.invoke(_group(), ["bench", str(setup["bundle"]), "--backend", "ort", "--batch-sizes", "1",
                                      "--repeats", "2", "--warmup", "0", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "model-only latency" in result.output
    data = json.loads(out.read_text())
    assert data["kind"] == "tucker-export bench" and data["results"][0]["status"] == "measured"

    printed = runner.invoke(_group(), ["bench", str(setup["bundle"]), "--backend", "ort", "--batch-sizes", "1",
                                       "--repeats", "1", "--warmup", "0", "--json", "-"])
    assert printed.exit_code == 0, printed.output
    assert json.loads(printed.stdout)["settings"]["batch_sizes"] == [1]


def test_cli_sweep_writes_json_and_png(setup, tmp_path: Path) -> None:
    out = tmp_path / "results"
    result = CliRunner().invoke(_group(), [
        "bench", "--sweep-rank-factor", "0.5,0.25", "-m", str(setup["model"]), "-f", "0", "-i", str(setup["images"]),
        "--labels", str(setup["labels"]), "--out-dir", str(out), "--name", "tiny", "--repeats", "2", "--warmup", "0",
        "--work-dir", str(tmp_path / "work"), "--case-repeats", "2",
    ])
    assert result.exit_code == 0, result.output
    assert (out / "tiny.png").read_bytes()[:8] == PNG_SIGNATURE
    data = json.loads((out / "tiny.json").read_text())
    assert [r["label"] for r in data["rows"]] == ["original", "0.5", "0.25"]
    assert data["settings"]["tta"] == "off" and data["settings"]["backend"] == "ort"
    assert data["structures"] == ["structure_1", "structure_2", "structure_3"] and data["cases"] == ["case0"]
    original, half, quarter = data["rows"]
    assert original["rank_factor"] is None and original["rank_policy"]["mode"] == "none"
    assert original["speedup"]["batch_1"] == pytest.approx(1.0) and original["compute"]["macs_ratio"] == 1.0
    # the original compared with itself: every structure either agrees fully or is absent from both
    assert all(v in (1.0, None) for v in original["dice_vs_original"].values())
    assert 1.0 > half["compute"]["macs_ratio"] > quarter["compute"]["macs_ratio"]
    assert half["rank_policy"] == {**half["rank_policy"], "mode": "relative", "factor": 0.5}
    for row in data["rows"]:
        assert row["dice_vs_truth"] is not None and set(row["dice_vs_original"]) == set(data["structures"])
        assert row["onnx_bytes"] > 0 and set(row["per_case"]["case0"]) == {"vs_original", "vs_truth"}
        (case,) = row["end_to_end"]["cases"]
        assert case["case"] == "case0" and case["runs"] == 2 and case["network_s"] >= 0
        assert row["end_to_end"]["summary"]["done"] == 1 and row["end_to_end"]["settings"]["case_repeats"] == 2
    assert "Dice vs the original, per structure" in result.output


@pytest.mark.parametrize("args, message", [
    ([], "Give a BUNDLE to bench"),
    (["{bundle}", "--sweep-rank-factor", "0.5"], "not both"),
    (["--sweep-rank-factor", "0.5", "-i", "{images}", "--out-dir", "{tmp}"], "-m MODEL_DIR"),
    (["--sweep-rank-factor", "0.5", "-m", "{model}", "--out-dir", "{tmp}"], "-i IMAGES"),
    (["--sweep-rank-factor", "0.5", "-m", "{model}", "-i", "{images}"], "--out-dir"),
    (["--sweep-rank-factor", "1.5", "-m", "{model}", "-i", "{images}", "--out-dir", "{tmp}"], r"(0, 1]"),
    (["--sweep-rank-factor", "0.5", "-m", "{model}", "-i", "{images}", "--out-dir", "{tmp}", "--backend", "torch,ort"],
     "one backend"),
    (["--sweep-rank-factor", "0.5", "-m", "{model}", "-i", "{images}", "--out-dir", "{tmp}", "--json", "x.json"],
     "--json only applies to one bundle"),
    (["--demo", "-m", "{model}", "--out-dir", "{tmp}"], "without --demo"),
    (["{bundle}", "--labels", "{images}"], "--labels only applies to a sweep"),
    (["{bundle}", "--case-repeats", "2", "--sequential"], "--sequential and --case-repeats only apply to a sweep"),
    (["{bundle}", "--batch-sizes", "0"], ">= 1"),
    (["{bundle}", "--backend", "auto"], "not auto"),
    (["{bundle}", "--precision", "int4"], "int4"),
])
def test_cli_refuses_bad_combinations_in_one_sentence(setup, tmp_path: Path, args, message) -> None:
    values = {"bundle": setup["bundle"], "model": setup["model"], "images": setup["images"], "tmp": tmp_path / "out"}
    result = CliRunner().invoke(_group(), ["bench", *(a.format(**values) for a in args)])
    assert result.exit_code == 1, result.output
    error = result.stderr.strip()
    assert error.startswith("Error: ") and "\n" not in error and "Traceback" not in result.output
    assert message in error
    assert not (tmp_path / "out").exists()
