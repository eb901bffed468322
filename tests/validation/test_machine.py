"""`validation.machine`: the quiet / not-quiet verdict of a benchmark run."""

from __future__ import annotations

from tucker_export.validation.machine import MachineWatch, quiet_verdict


def test_quiet_means_a_low_start_load_and_little_cpu_used_by_others() -> None:
    assert quiet_verdict(1.2, 2.4, 2, others_cpu_s=5.0, wall_s=100.0)["quiet"]  # the run's own load at the end
    assert not quiet_verdict(2.5, 2.4, 2, others_cpu_s=0.0, wall_s=100.0)["quiet"]  # loaded when it started
    loaded = quiet_verdict(0.5, 2.4, 2, others_cpu_s=30.0, wall_s=100.0)
    assert not loaded["quiet"] and loaded["others_fraction_of_machine"] == 0.15
    assert not quiet_verdict(None, None, 2)["quiet"]  # unknown is not quiet
    verdict = MachineWatch().verdict()
    assert set(verdict) >= {"loadavg_1min_start", "others_cpu_s", "others_fraction_of_machine", "quiet", "rule"}


def test_every_benchmark_json_carries_the_machine_and_its_load(tmp_path, monkeypatch) -> None:
    import json

    from tucker_export.validation import machine

    monkeypatch.setattr("sys.argv", ["bench/x.py", "--fast"])
    line = machine.write_benchmark_json(tmp_path / "results" / "x.json", {"rows": [1, 2]}, MachineWatch())
    saved = json.loads((tmp_path / "results" / "x.json").read_text())
    assert saved["rows"] == [1, 2] and saved["command"].endswith("bench/x.py --fast")
    cpu = saved["environment"]
    assert {"cpu", "cpu_kind", "physical_cores", "loadavg_1min", "versions"} <= set(cpu)
    assert set(cpu["cpu_kind"]) >= {"model_name", "features", "kind"}
    load = saved["machine_load"]
    assert {"loadavg_1min_start", "loadavg_1min_end", "cores", "quiet"} <= set(load)
    assert line.endswith(f"wrote {tmp_path / 'results' / 'x.json'}") and ("quiet" in line)


def test_descendants_never_waited_for_count_as_the_benchmarks_own_cpu():
    import subprocess
    import sys
    import time
    from pathlib import Path

    watch = MachineWatch(count_descendants=True)
    # A child that burns 0.5 s of CPU and is left unreaped (a zombie keeps its CPU times), like Ray's daemons.
    burner = "import time\nwhile time.process_time() < 0.5: pass\n"
    child = subprocess.Popen([sys.executable, "-c", burner])
    stat = Path(f"/proc/{child.pid}/stat")
    for _ in range(600):  # until it has exited (state Z) and the 0.2 s sampler has seen it since
        if stat.read_text().rsplit(")", 1)[1].split()[0] == "Z":
            break
        time.sleep(0.05)
    time.sleep(0.6)
    seen = watch._descendants.cpu_by_pid.get(child.pid, 0.0)
    verdict = watch.verdict()
    child.wait()
    assert seen >= 0.45 and verdict["wall_s"] is not None
