"""The command line: help and doctor work without optional dependencies; errors are one sentence."""

from __future__ import annotations

import json
import subprocess
import sys

from click.testing import CliRunner

from tucker_export.cli import cli
from tucker_export.doctor import backend_availability


def test_help_lists_every_step() -> None:
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for command in ("decompose", "export", "build", "infer", "validate", "demo", "doctor", "inspect"):
        assert f"  {command}" in result.output


def test_import_and_help_do_not_load_heavy_or_optional_modules() -> None:
    code = (
        "import sys, tucker_export, tucker_export.cli;"
        "heavy = [m for m in ('torch', 'tensorrt', 'onnxruntime', 'nnunetv2') if m in sys.modules];"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


def test_doctor_json_without_tensorrt() -> None:
    result = CliRunner().invoke(cli, ["doctor", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["packages"]["nnunetv2"] != "not installed"
    names = {b["name"]: b for b in report["backends"]}
    assert names["ort (cpu)"]["usable"] is True
    if report["packages"]["tensorrt"] == "not installed":
        assert names["trt"]["usable"] is False and "not installed" in names["trt"]["why"]


def test_backend_reasons_without_gpu() -> None:
    packages = {"torch": "2.5", "onnxruntime": "1.20", "tensorrt": "10.3.0"}
    backends = {b.name: b for b in backend_availability(packages, ["CPUExecutionProvider"], [])}
    assert backends["trt"].usable is False
    assert "no CUDA device" in backends["trt"].why
    assert "onnxruntime-gpu" in backends["ort (cuda)"].why


def test_unknown_command_is_a_usage_error() -> None:
    result = CliRunner().invoke(cli, ["frobnicate"])
    assert result.exit_code == 2 and "No such command" in result.output


def test_verbosity_options_work_after_the_subcommand_too() -> None:
    import click

    from tucker_export.cli import _Group

    group = _Group("probe-group")

    @group.command("probe")
    @click.pass_context
    def probe(ctx: click.Context) -> None:
        click.echo(ctx.find_root().obj.get("verbosity", 0) if ctx.find_root().obj else 0)

    runner = CliRunner()
    assert runner.invoke(group, ["probe", "-q"]).output.strip() == "-1"
    assert runner.invoke(group, ["probe", "-vv"]).output.strip() == "2"
    assert runner.invoke(group, ["probe"]).output.strip() == "0"
    for command in ("decompose", "export", "build", "infer", "validate", "bench", "demo", "inspect"):
        help_text = CliRunner().invoke(cli, [command, "--help"]).output
        assert "-q, --quiet" in help_text and "-v, --verbose" in help_text, command


def test_cpu_precisions_for_doctor() -> None:
    from tucker_export.doctor import cpu_precisions

    amx = cpu_precisions(["avx512", "vnni", "bf16", "amx"], ["FP32", "BF16", "INT8"], None)
    assert amx == {"fp32": "yes (AVX-512)", "bf16": "yes (AMX)",
                   "int8": "yes (AMX; calibrate with build --calibration-dir)"}
    old = cpu_precisions([], ["FP32", "INT8"], None)
    assert old["bf16"].startswith("no: ") and old["int8"].startswith("yes (no VNNI")
    missing = cpu_precisions([], [], "OpenVINO is not installed")
    assert all(v == "no: OpenVINO is not installed" for v in missing.values())


def test_doctor_reports_the_cpu_and_openvino() -> None:
    result = CliRunner().invoke(cli, ["doctor"])
    assert result.exit_code == 0, result.output
    assert "cpu precisions (openvino)" in result.output and "openvino (cpu)" in result.output


def test_bf16_on_onnxruntime_is_one_sentence(tmp_path) -> None:
    result = CliRunner().invoke(cli, ["infer", "-i", str(tmp_path), "-o", str(tmp_path / "o"), "-b", str(tmp_path),
                                      "--backend", "ort", "--precision", "bf16"])
    assert result.exit_code == 1
    assert "Precision bf16 runs on the openvino backend (the CPU), not ort; use --backend openvino." in result.output
