"""`infer --ray` on a local Ray started here: 2 CPU workers, the trained demo model, 4 cases."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from tucker_export.errors import ConfigurationError, EngineError  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=128 * 2**20)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def serial_output(demo_crops, demo_bundle, tmp_path_factory) -> Path:
    from tucker_export.inference import run_inference

    out = tmp_path_factory.mktemp("serial")
    report = run_inference(demo_crops.test_images_dir, out, bundle_path=demo_bundle, backend="ort", precision="fp32",
                           progress=False)
    assert len(report.results) == 4 and not report.failed
    return out


def _on_ray(demo_bundle, scans, out, **options):
    from tucker_export.scaleout.ray_inference import run_inference_on_ray

    options = {"workers": 2, "backend": "ort", "precision": "fp32", "progress": False, **options}
    return run_inference_on_ray(scans, out, bundle_path=demo_bundle, **options)


def _voxels(folder: Path) -> dict[str, np.ndarray]:
    import SimpleITK as sitk

    return {p.name: sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in sorted(folder.glob("*.nii.gz"))}


def test_outputs_match_serial_infer_and_say_who_ran_them(local_ray, demo_crops, demo_bundle, serial_output, tmp_path):
    report = _on_ray(demo_bundle, demo_crops.test_images_dir, tmp_path / "out")
    assert [r.status for r in report.results] == ["done"] * 4
    ours, serial = _voxels(tmp_path / "out"), _voxels(serial_output)
    assert ours.keys() == serial.keys() and len(ours) == 4
    for name in ours:
        np.testing.assert_array_equal(ours[name], serial[name], err_msg=name)
    data = report.to_dict()
    assert {c["worker"] for c in data["cases"]} <= {"worker-0", "worker-1"}
    assert all(c["device"].startswith("cpu:") for c in data["cases"])
    assert [w["backend"] for w in data["workers"]] == ["ort", "ort"]
    assert data["ray"]["started_here"] is False  # the test's Ray was reused, and is left running
    json.dumps(data)

    again = _on_ray(demo_bundle, demo_crops.test_images_dir, tmp_path / "out")
    assert [r.status for r in again.results] == ["skipped"] * 4
    assert again.workers == [] and again.backend == "none"  # no worker was even started


def test_a_corrupt_case_is_reported_and_the_others_finish(local_ray, demo_crops, demo_bundle, tmp_path):
    scans = tmp_path / "scans"
    shutil.copytree(demo_crops.test_images_dir, scans)
    (scans / "broken_0000.nii.gz").write_bytes(b"\x1f\x8b not really a NIfTI")
    report = _on_ray(demo_bundle, scans, tmp_path / "out")
    status = {r.name: r.status for r in report.results}
    assert status.pop("broken") == "failed"
    assert set(status.values()) == {"done"} and len(status) == 4
    assert "broken" in report.summary()
    assert not (tmp_path / "out" / "broken.nii.gz").exists()


def test_a_killed_worker_has_its_case_redone_and_leaves_nothing_half_written(
        local_ray, demo_crops, demo_bundle, serial_output, tmp_path):
    out = tmp_path / "out"
    killed: list[str] = []

    def kill_first_worker(case_name: str, worker: dict) -> None:
        if killed:
            return
        killed.append(case_name)
        # What a worker killed mid-export leaves: nnU-Net's file under its temporary name.
        (out / f".{case_name}.abcd1234.nii.gz").write_bytes(b"half")
        os.kill(worker["pid"], signal.SIGKILL)

    report = _on_ray(demo_bundle, demo_crops.test_images_dir, out, on_dispatch=kill_first_worker)
    assert [r.status for r in report.results] == ["done"] * 4
    redone = next(r for r in report.results if r.name == killed[0])
    assert any("retried after 1 worker death" in w for w in redone.warnings)
    assert len(report.workers) == 3  # two, and one started in place of the dead one
    assert sorted(p.name for p in out.iterdir()) == sorted(_voxels(serial_output))  # no hidden leftovers
    ours, serial = _voxels(out), _voxels(serial_output)
    for name in ours:
        np.testing.assert_array_equal(ours[name], serial[name], err_msg=name)


def test_an_engine_for_another_device_kind_is_refused(local_ray, demo_crops, demo_bundle, tmp_path):
    from tucker_export.bundle import Bundle
    from tucker_export.engines.cpu_keys import CPU_ENGINES_SECTION

    bundle_copy = tmp_path / "bundle"
    shutil.copytree(demo_bundle, bundle_copy)
    bundle = Bundle.load(bundle_copy)
    onnx = bundle.onnx_entry(0, "fp32")
    bundle.record(CPU_ENGINES_SECTION, "fold_0.int8.other", {
        "fold": 0, "precision": "int8", "cpu": {"kind": "some-other-cpu"}, "openvino": {"version": "0"},
        "onnx": {"sha256": onnx["sha256"]}, "file": "cpu_engines/some-other-cpu/fold_0.int8.xml",
        "sha256": "0" * 64, "gate": {"passed": True},
    })
    bundle.save()
    with pytest.raises(EngineError, match="no OpenVINO int8 model for this CPU"):
        _on_ray(bundle_copy, demo_crops.test_images_dir, tmp_path / "out", backend="openvino", precision="int8")
    assert not list((tmp_path / "out").glob("*.nii.gz"))


def test_bad_settings_are_one_sentence(demo_crops, demo_bundle, tmp_path):
    from click.testing import CliRunner

    from tucker_export.cli import cli

    with pytest.raises(ConfigurationError, match="at least 1"):
        _on_ray(demo_bundle, demo_crops.test_images_dir, tmp_path / "out", cpus_per_worker=0)
    result = CliRunner().invoke(cli, ["infer", "-i", str(demo_crops.test_images_dir), "-o", str(tmp_path / "o"),
                                      "-b", str(demo_bundle), "--ray", "127.0.0.1:9"])
    assert result.exit_code == 1 and "Nothing answers at the Ray address" in result.output
    assert "Traceback" not in result.output
    result = CliRunner().invoke(cli, ["infer", "-i", str(demo_crops.test_images_dir), "-o", str(tmp_path / "o"),
                                      "-b", str(demo_bundle), "--workers", "2"])
    assert result.exit_code == 2 and "--workers needs --ray" in result.output
