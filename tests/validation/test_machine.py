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
