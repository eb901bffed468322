"""What a benchmark's numbers depend on: the machine and its libraries, and how busy it was meanwhile.

``environment()`` records CPU, threads, library versions, GPUs and the load right now;
``MachineWatch`` measures the CPU time *other* processes used while a benchmark ran and
``quiet_verdict`` turns that into a quiet / not-quiet verdict (``describe_verdict`` prints it).
Nothing here asserts speed: the numbers are measurements of this machine at this moment, and the
load is recorded beside them.
"""

from __future__ import annotations

import os
import platform
import resource
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # pragma: no cover - not available on this platform
        return None


def environment() -> dict[str, Any]:
    """What the numbers depend on: CPU, threads, library versions, GPUs, and the load right now."""
    import torch

    from tucker_export._env import package_versions
    from tucker_export.engines.keys import cuda_devices
    from tucker_export.runtimes import physical_cores

    versions = package_versions(("tucker-export", "torch", "onnxruntime", "onnxruntime-gpu", "tensorrt", "openvino",
                                 "nncf", "nnunetv2", "numpy"), missing=None)
    from tucker_export.engines.cpu_keys import detect_cpu

    cpu = detect_cpu()  # one read of /proc/cpuinfo: model name and the ISA features the CPU engines key on
    gpus = [gpu.to_dict() for gpu in cuda_devices()]
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu.model_name,
        "cpu_kind": cpu.to_dict(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "physical_cores": physical_cores(),
        "torch_threads": torch.get_num_threads(),
        "onnxruntime_threads": physical_cores(),
        "loadavg_1min": loadavg(),
        "versions": versions,
        "cuda_devices": gpus,
    }


def busy_cpu_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy since boot (user, nice, system, irq, softirq, steal)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    except (OSError, ValueError, IndexError):
        return None
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    """CPU seconds of this process and its finished children (the benchmark's own work)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class _DescendantSampler:
    """The last CPU time seen of every descendant process, sampled from /proc every 0.2 s.

    Daemons a benchmark starts but does not wait for (Ray's GCS, raylet and actors) never reach
    RUSAGE_CHILDREN; without this their CPU time would count as other processes' load.
    """

    def __init__(self) -> None:
        import threading

        self.cpu_by_pid: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        tick = os.sysconf("SC_CLK_TCK")
        while not self._stop.wait(0.2):
            parents: dict[int, int] = {}
            cpu: dict[int, float] = {}
            for stat in Path("/proc").glob("[0-9]*/stat"):
                try:
                    fields = stat.read_text().rsplit(")", 1)[1].split()
                except (OSError, IndexError):
                    continue
                pid = int(stat.parent.name)
                parents[pid] = int(fields[1])
                cpu[pid] = (int(fields[11]) + int(fields[12])) / tick
            me = os.getpid()
            for pid in cpu:
                ancestor, hops = parents.get(pid), 0
                while ancestor not in (None, 0, 1, me) and hops < 64:
                    ancestor, hops = parents.get(ancestor), hops + 1
                if ancestor == me:
                    self.cpu_by_pid[pid] = cpu[pid]

    def stop(self) -> float:
        """CPU seconds of every descendant seen, finished or not."""
        self._stop.set()
        self._thread.join()
        return sum(self.cpu_by_pid.values())


class MachineWatch:
    """How busy the machine was with *other* work while a benchmark ran.

    The load average at the end counts the benchmark's own threads (a 2-thread benchmark on 2 cores
    ends near 2), so it cannot tell a quiet run from a loaded one. The CPU time the machine spent
    minus the benchmark's own (this process and its children) can: that is what others used.
    With ``count_descendants`` every process of this one's tree counts as its own, also those it
    never waits for (see ``_DescendantSampler``).
    """

    def __init__(self, *, count_descendants: bool = False) -> None:
        self.load_start = loadavg()
        self.busy_start = busy_cpu_seconds()
        self.own_start = _own_cpu_seconds()
        self.wall_start = time.perf_counter()
        self._descendants = _DescendantSampler() if count_descendants else None

    def _own_since_start(self) -> float:
        if self._descendants is None:
            return _own_cpu_seconds() - self.own_start
        own = resource.getrusage(resource.RUSAGE_SELF)
        # The sampler saw every child (waited for or not), so RUSAGE_CHILDREN would count them twice.
        return self._descendants.stop() + own.ru_utime + own.ru_stime - self.own_start

    def verdict(self) -> dict[str, Any]:
        wall = time.perf_counter() - self.wall_start
        own = self._own_since_start()
        busy_end = busy_cpu_seconds()
        others = None
        if self.busy_start is not None and busy_end is not None:
            others = max(0.0, (busy_end - self.busy_start) - own)
        return quiet_verdict(self.load_start, loadavg(), others_cpu_s=others, wall_s=wall)


QUIET_OTHERS_FRACTION = 0.10


def describe_verdict(verdict: Mapping[str, Any]) -> str:
    """One line for the end of a benchmark: the load, what others used, and whether the run may be published."""
    return (
        f"load average {verdict['loadavg_1min_start']} -> {verdict['loadavg_1min_end']} on {verdict['cores']} cores, "
        f"other processes {verdict['others_fraction_of_machine']} of the CPU: "
        f"{'quiet' if verdict['quiet'] else 'NOT quiet (do not publish)'}"
    )


def quiet_verdict(load_start: float | None, load_end: float | None, cores: int | None = None, *,
                  others_cpu_s: float | None = None, wall_s: float | None = None) -> dict[str, Any]:
    """Quiet: the 1-minute load was <= 1 per core when the run started, and other processes used at
    most 10 % of the machine's CPU time while it ran (when that can be measured).

    On shared machines load distorts even ratios (PyTorch suffers more than ONNX Runtime), so a
    figure from a loaded run must say so.
    """
    cores = cores or os.cpu_count() or 1
    # Under a second, /proc/stat's 10 ms ticks make the fraction noise.
    others_fraction = (others_cpu_s / (wall_s * cores)) if others_cpu_s is not None and wall_s and wall_s >= 1.0 else None
    quiet = (load_start is not None and load_start <= cores) and (
        others_fraction is None or others_fraction <= QUIET_OTHERS_FRACTION)
    return {
        "loadavg_1min_start": load_start, "loadavg_1min_end": load_end, "cores": cores,
        "others_cpu_s": None if others_cpu_s is None else round(others_cpu_s, 1),
        "others_fraction_of_machine": None if others_fraction is None else round(others_fraction, 3),
        "wall_s": None if wall_s is None else round(wall_s, 1), "quiet": bool(quiet),
        "rule": "quiet when the 1-minute load average is <= 1 per core at the start and other processes used "
                "<= 10 % of the machine's CPU time during the run (the end load counts the run's own threads)",
    }


def write_benchmark_json(path: str | Path, results: dict[str, Any], watch: MachineWatch) -> str:
    """Write a benchmark's ``results`` with its machine block and load verdict; returns the verdict line.

    Every benchmark script ends here (and may call it after each part, so a stopped run keeps what
    it measured): ``command`` (how to reproduce it), ``environment`` and ``machine_load`` are added
    where the script did not set them; the write is atomic.
    """
    import sys

    from tucker_export._io import write_json_atomic

    results.setdefault("command", " ".join([Path(sys.executable).name, *sys.argv]))
    results.setdefault("environment", environment())
    results["machine_load"] = watch.verdict()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, results)
    return f"{describe_verdict(results['machine_load'])}; wrote {path}"
