"""`tucker-export bench`: latency, memory, size and compute of a bundle, and rank-factor sweeps.

Three layers, each usable alone:

- ``latency(runner_or_callable, input_shape, ...)``: model-only latency of one network call per
  batch size, after warm-up calls, as the median of N timed calls with its spread (min, max,
  p10/p90, IQR); per-patch latency is the call time divided by the batch.
- ``bench_bundle(bundle, ...)``: for every backend and precision asked for, the model-only latency
  on a seeded ``(B, C, *patch)`` input, the peak memory while the engine is open, and with
  ``input_dir`` the end-to-end time per case through ``run_inference`` (preprocess / network /
  export); plus parameters and MACs from the manifest and the ONNX, engine and weight file sizes.
  A backend that cannot run here (no TensorRT, no fp16 export, ...) is skipped and the reason kept.
- ``sweep_rank_factors(model_dir, factors, ...)``: decompose the model at each rank factor
  (relative policy), export, time the network, segment the images, and compare every segmentation
  per structure with the original model's (run through the same engine path from a rank-mode
  ``none`` bundle, so the comparison is engine to engine) and with ground truth labels if given.
  ``plot_sweep`` draws the trade-off (speed-up vs Dice per structure; MACs kept vs Dice).

Measurement choices (why the numbers mean what they say):

- Timing is ``time.perf_counter`` around the call; on CUDA the device is synchronised before and
  after, so asynchronous launches are not mistaken for finished work.
- Every input is seeded standard-normal data, like nnU-Net's z-scored CT intensities; the same
  seed gives every backend and every sweep row the same input.
- The sweep times its rows *interleaved* (round-robin, rotating the order each round): on a
  shared machine the load drifts, and timing one row after the other would turn that drift into a
  false speed-up. ``interleave=False`` times one row at a time (less memory: one session open).
  Its segmentation runs are interleaved the same way, case by case, after one untimed case.
- Peak RSS: the kernel's high-water mark (VmHWM) is reset before each measurement by writing 5 to
  ``/proc/self/clear_refs`` (Linux >= 4.0), so ``peak_rss_bytes`` is the peak *during* that
  measurement. Where the reset is not possible it is ``ru_maxrss``, the process-lifetime peak, and
  ``rss_scope`` says so. Memory freed by an earlier backend may be reused by a later one, so
  ``peak_rss_increase_bytes`` (peak minus RSS before) is a lower bound of what the engine needs.
- GPU memory: ``torch.cuda.max_memory_allocated`` covers PyTorch's allocator only (the torch
  backend and the buffers tucker-export passes to engines); ONNX Runtime and TensorRT allocate
  outside it, so the drop of free device memory (``torch.cuda.mem_get_info``) while the engine is
  open is recorded too.

Nothing here asserts speed: the numbers are measurements of this machine at this moment, and the
load average is recorded beside them.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import math
import os
import platform
import re
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tucker_export._io import atomic_path, write_json_atomic
from tucker_export.errors import ConfigurationError, InputImageError, ModelFolderError, TuckerExportError

if TYPE_CHECKING:
    import torch

    from tucker_export.bundle import Bundle
    from tucker_export.nnunet.loading import Fold

logger = logging.getLogger(__name__)

BENCH_BACKENDS: tuple[str, ...] = ("torch", "ort", "openvino", "trt")
DEFAULT_SEED = 0
SWEEP_FACTORS: tuple[float, ...] = (0.9, 0.7, 0.5, 0.3, 0.2, 0.1)
BASELINE_LABEL = "original"


# ---- small helpers ------------------------------------------------------------------------------


def _json_safe(value: Any) -> Any:
    """Plain JSON types: numpy scalars to Python, NaN/Inf to None (JSON has no NaN), paths to str."""
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    return value


def parse_batch_sizes(value: str | Sequence[int]) -> tuple[int, ...]:
    """``"1,2,4"`` or ``[1, 2, 4]`` -> ``(1, 2, 4)``; duplicates dropped, order kept; each must be >= 1."""
    parts: list[Any] = value.replace(",", " ").split() if isinstance(value, str) else list(value)
    sizes: list[int] = []
    for part in parts:
        try:
            size = int(part)
        except (TypeError, ValueError):
            raise ConfigurationError(f"Batch size {part!r} is not an integer (e.g. --batch-sizes 1,2,4).") from None
        if size < 1:
            raise ConfigurationError(f"Batch sizes must be integers >= 1, got {part!r}.")
        if size not in sizes:
            sizes.append(size)
    if not sizes:
        raise ConfigurationError("At least one batch size is needed (e.g. --batch-sizes 1,2,4).")
    return tuple(sizes)


def parse_rank_factors(value: str | Sequence[float]) -> tuple[float, ...]:
    """``"0.9,0.7,0.5"`` -> ``(0.9, 0.7, 0.5)``; each factor must lie in (0, 1]; duplicates dropped."""
    parts: list[Any] = value.replace(",", " ").split() if isinstance(value, str) else list(value)
    factors: list[float] = []
    for part in parts:
        try:
            factor = float(part)
        except (TypeError, ValueError):
            raise ConfigurationError(
                f"Rank factor {part!r} is not a number (e.g. --sweep-rank-factor 0.9,0.7,0.5)."
            ) from None
        if not (math.isfinite(factor) and 0 < factor <= 1):
            raise ConfigurationError(f"Rank factors must lie in (0, 1], got {part}.")
        if factor not in factors:
            factors.append(factor)
    if not factors:
        raise ConfigurationError("At least one rank factor is needed (e.g. --sweep-rank-factor 0.9,0.7,0.5).")
    return tuple(factors)


def _check_counts(warmup: int, repeats: int) -> None:
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ConfigurationError(f"--warmup must be an integer >= 0, got {warmup!r}.")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ConfigurationError(f"--repeats must be an integer >= 1, got {repeats!r}.")


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # pragma: no cover - not available on this platform
        return None


def environment() -> dict[str, Any]:
    """What the numbers depend on: CPU, threads, library versions, GPUs, and the load right now."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    from tucker_export.engines.runners import physical_cores

    versions: dict[str, str | None] = {}
    for package in ("tucker-export", "torch", "onnxruntime", "onnxruntime-gpu", "tensorrt", "openvino", "nncf",
                    "nnunetv2", "numpy"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    from tucker_export.engines.cpu_keys import detect_cpu

    cpu = detect_cpu()  # one read of /proc/cpuinfo: model name and the ISA features the CPU engines key on
    gpus = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            gpus.append({"index": index, "name": props.name, "memory_bytes": int(props.total_memory),
                         "compute_capability": [props.major, props.minor]})
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
        "loadavg_1min": _loadavg(),
        "versions": versions,
        "cuda_devices": gpus,
    }


def _busy_cpu_seconds() -> float | None:
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


class MachineWatch:
    """How busy the machine was with *other* work while a benchmark ran.

    The load average at the end counts the benchmark's own threads (a 2-thread benchmark on 2 cores
    ends near 2), so it cannot tell a quiet run from a loaded one. The CPU time the machine spent
    minus the benchmark's own (this process and its children) can: that is what others used.
    """

    def __init__(self) -> None:
        self.load_start = _loadavg()
        self.busy_start = _busy_cpu_seconds()
        self.own_start = _own_cpu_seconds()
        self.wall_start = time.perf_counter()

    def verdict(self) -> dict[str, Any]:
        wall = time.perf_counter() - self.wall_start
        busy_end = _busy_cpu_seconds()
        others = None
        if self.busy_start is not None and busy_end is not None:
            others = max(0.0, (busy_end - self.busy_start) - (_own_cpu_seconds() - self.own_start))
        return quiet_verdict(self.load_start, _loadavg(), others_cpu_s=others, wall_s=wall)


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


# ---- latency ------------------------------------------------------------------------------------


@dataclass
class LatencyStats:
    """Timing of one network call at one batch size (seconds); ``per_patch_*`` divide by the batch."""

    batch_size: int
    warmup: int
    repeats: int
    median_s: float
    mean_s: float
    min_s: float
    max_s: float
    p10_s: float
    p90_s: float
    iqr_s: float
    std_s: float
    per_patch_median_s: float
    patches_per_s: float
    samples_s: list[float] = field(default_factory=list)

    @classmethod
    def from_samples(cls, samples: Sequence[float], *, batch_size: int, warmup: int) -> LatencyStats:
        times = np.asarray(samples, dtype=np.float64)
        median = float(np.median(times))
        p10, p25, p75, p90 = (float(v) for v in np.percentile(times, [10, 25, 75, 90]))
        return cls(
            batch_size=batch_size, warmup=warmup, repeats=len(times), median_s=median, mean_s=float(times.mean()),
            min_s=float(times.min()), max_s=float(times.max()), p10_s=p10, p90_s=p90, iqr_s=p75 - p25,
            std_s=float(times.std(ddof=1)) if len(times) > 1 else 0.0,
            per_patch_median_s=median / batch_size,
            patches_per_s=batch_size / median if median > 0 else math.inf,
            samples_s=[float(t) for t in times],
        )

    def to_dict(self) -> dict[str, Any]:
        return _json_safe(asdict(self))


class _Timed:
    """One thing to time: how to call it, what input it takes, and how to wait for it to finish."""

    def __init__(self, target: Any, device: str | torch.device | None = None) -> None:
        import torch

        from tucker_export.engines.runners import Runner

        if isinstance(target, Runner) or hasattr(target, "infer"):
            self.call: Callable[[Any], Any] = target.infer
            device = getattr(target, "device", device)
        elif callable(target):
            self.call = target
        else:
            raise ConfigurationError(
                f"latency() needs a runner (with .infer) or a callable, got {type(target).__name__}."
            )
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        # On a GPU the engines are fed CUDA tensors (as the predictor does); on the CPU numpy arrays,
        # which every runner takes without a copy.
        self.cuda = self.device.type == "cuda"

    def prepare(self, x: np.ndarray) -> Any:
        if not self.cuda:
            return x
        import torch

        return torch.from_numpy(x).to(self.device)

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)

    def time_call(self, x: Any) -> float:
        self.sync()
        start = time.perf_counter()
        out = self.call(x)
        self.sync()
        elapsed = time.perf_counter() - start
        del out
        return elapsed


def _seeded_batch(batch: int, input_shape: Sequence[int], seed: int) -> np.ndarray:
    from tucker_export.exporter.onnx_export import seeded_input

    channels, *patch = (int(s) for s in input_shape)
    return seeded_input(batch, channels, patch, seed)


def _check_input_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) < 2 or any(s < 1 for s in shape):
        raise ConfigurationError(
            f"The input shape must be (channels, *patch) with positive sizes, got {tuple(input_shape)}."
        )
    return shape


def interleaved_latency(
    targets: Mapping[str, Any],
    input_shape: Sequence[int],
    *,
    batch_sizes: Sequence[int] = (1,),
    warmup: int = 2,
    repeats: int = 10,
    seed: int = DEFAULT_SEED,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> dict[str, dict[int, LatencyStats]]:
    """``latency`` for several targets at once, timed round-robin so load drift hits all of them alike.

    Each round times every target once, the order rotating by one per round (no target is always
    first after the others). Returns ``{name: {batch_size: LatencyStats}}``.
    """
    from tqdm.auto import tqdm

    _check_counts(warmup, repeats)
    shape = _check_input_shape(input_shape)
    sizes = parse_batch_sizes(batch_sizes)
    timed = {name: _Timed(target, device) for name, target in targets.items()}
    names = list(timed)
    results: dict[str, dict[int, LatencyStats]] = {name: {} for name in names}
    total = len(sizes) * (warmup + repeats) * len(names)
    with tqdm(total=total, desc="latency", unit="call", disable=not progress, leave=False) as bar:
        for batch in sizes:
            host = _seeded_batch(batch, shape, seed)
            inputs = {name: t.prepare(host) for name, t in timed.items()}
            for name in names:
                for _ in range(warmup):
                    timed[name].time_call(inputs[name])
                    bar.update()
            samples: dict[str, list[float]] = {name: [] for name in names}
            for round_index in range(repeats):
                shift = round_index % len(names)
                for name in names[shift:] + names[:shift]:
                    samples[name].append(timed[name].time_call(inputs[name]))
                    bar.update()
            for name in names:
                results[name][batch] = LatencyStats.from_samples(samples[name], batch_size=batch, warmup=warmup)
            del inputs
    return results


def latency(
    runner_or_callable: Any,
    input_shape: Sequence[int],
    *,
    batch_sizes: Sequence[int] = (1, 2, 4),
    warmup: int = 2,
    repeats: int = 10,
    seed: int = DEFAULT_SEED,
    device: str | torch.device | None = None,
) -> dict[int, LatencyStats]:
    """Model-only latency of an open runner (or any ``callable(batch) -> logits``) per batch size.

    ``input_shape`` is one sample, ``(channels, *patch)``; each batch is ``(B, *input_shape)`` of
    seeded standard-normal values. A runner is fed what it is fed in inference: a numpy array on
    the CPU, a CUDA tensor on a CUDA device (``device`` says which for a plain callable). Each
    batch size gets ``warmup`` untimed calls, then ``repeats`` timed ones.
    """
    stats = interleaved_latency(
        {"target": runner_or_callable}, input_shape, batch_sizes=batch_sizes, warmup=warmup, repeats=repeats,
        seed=seed, device=device,
    )
    return stats["target"]


# ---- memory -------------------------------------------------------------------------------------


def _status_kib(field_name: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field_name}:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(match.group(1)) if match else None


def current_rss_bytes() -> int | None:
    kib = _status_kib("VmRSS")
    return kib * 1024 if kib is not None else None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    return True


def peak_rss_bytes() -> int:
    """The peak RSS since the last reset (VmHWM), else the process-lifetime ``ru_maxrss``."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(maxrss if sys.platform == "darwin" else maxrss * 1024)  # bytes on macOS, KiB on Linux


def _release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS, so the RSS before a measurement is honest."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    """Peak host RSS (and GPU memory on CUDA) over a ``with`` block; ``result`` is filled on exit.

    Call ``sample_gpu()`` while the engine is open to record how much device memory it holds.
    """

    def __init__(self, device: str | torch.device = "cpu") -> None:
        import torch

        self.device = torch.device(device)
        self.result: dict[str, Any] = {}
        self._gpu_free_before: int | None = None
        self._gpu_min_free: int | None = None

    def __enter__(self) -> PeakMemory:
        _release_freed_memory()
        self._rss_before = current_rss_bytes()
        self._reset = reset_peak_rss()
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._gpu_allocated_before = torch.cuda.memory_allocated(self.device)
            self._gpu_free_before = torch.cuda.mem_get_info(self.device)[0]
            self._gpu_min_free = self._gpu_free_before
        return self

    def sample_gpu(self) -> None:
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)
            free = torch.cuda.mem_get_info(self.device)[0]
            self._gpu_min_free = min(self._gpu_min_free or free, free)

    def __exit__(self, *exc_info: object) -> None:
        peak = peak_rss_bytes()
        self.result = {
            "peak_rss_bytes": peak,
            "rss_before_bytes": self._rss_before,
            "peak_rss_increase_bytes": peak - self._rss_before if self._rss_before is not None else None,
            "rss_scope": (
                "this measurement (kernel peak-RSS mark reset before it)" if self._reset
                else "process lifetime (ru_maxrss; the peak may come from an earlier step)"
            ),
        }
        if self.device.type == "cuda":
            import torch

            self.sample_gpu()
            self.result.update(
                peak_gpu_torch_allocated_bytes=int(torch.cuda.max_memory_allocated(self.device)),
                gpu_torch_allocated_before_bytes=int(self._gpu_allocated_before),
                gpu_device_used_increase_bytes=int((self._gpu_free_before or 0) - (self._gpu_min_free or 0)),
                gpu_scope="torch allocator peak; device memory drop sampled while the engine was open "
                          "(ONNX Runtime and TensorRT allocate outside torch)",
            )


# ---- one bundle ---------------------------------------------------------------------------------


@dataclass
class FoldLatency:
    """Latency and memory of one fold's engine; ``same_structure`` lists the folds it stands for."""

    fold: str
    same_structure: list[str]
    latency: list[LatencyStats]
    memory: dict[str, Any]
    loadavg_1min: dict[str, float | None]

    def to_dict(self) -> dict[str, Any]:
        return {
            "fold": self.fold,
            "same_structure": self.same_structure,
            "latency": [s.to_dict() for s in self.latency],
            "memory": _json_safe(self.memory),
            "loadavg_1min": self.loadavg_1min,
        }


@dataclass
class EndToEnd:
    """``run_inference`` on real cases: seconds per case split into preprocess / network / export."""

    settings: dict[str, Any]
    cases: list[dict[str, Any]]
    summary: dict[str, Any]
    memory: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return _json_safe(asdict(self))


@dataclass
class BackendBench:
    """One backend and precision: measured, or skipped with the reason."""

    backend: str
    precision: str
    status: str  # "measured" or "skipped"
    reason: str
    runtime: str | None = None
    folds: list[FoldLatency] = field(default_factory=list)
    end_to_end: EndToEnd | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "precision": self.precision,
            "status": self.status,
            "reason": self.reason,
            "runtime": self.runtime,
            "folds": [f.to_dict() for f in self.folds],
            "end_to_end": self.end_to_end.to_dict() if self.end_to_end else None,
        }


@dataclass
class BenchReport:
    bundle: str
    created: str
    settings: dict[str, Any]
    environment: dict[str, Any]
    model: dict[str, Any]
    compute: dict[str, dict[str, Any]]
    sizes: dict[str, Any]
    results: list[BackendBench]

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "tucker-export bench",
            "bundle": self.bundle,
            "created": self.created,
            "settings": _json_safe(self.settings),
            "environment": _json_safe(self.environment),
            "model": _json_safe(self.model),
            "compute": _json_safe(self.compute),
            "sizes": _json_safe(self.sizes),
            "results": [r.to_dict() for r in self.results],
        }

    def write_json(self, path: str | Path) -> Path:
        write_json_atomic(path, self.to_dict())
        return Path(path)


_COMPUTE_KEYS = ("input_shape", "layers", "factorized", "params_before", "params_after", "params_ratio",
                 "conv_params_before", "conv_params_after", "macs_before", "macs_after", "macs_ratio",
                 "max_relative_error")


def compute_figures(manifest: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per fold: parameters and MACs before/after and their ratios, from the manifest totals.

    MACs are those of one network call at batch 1 and the configuration's patch size (see
    ``tucker_export.exporter.counting``); ``macs_speedup_bound`` = before / after is what a runtime
    that turned every saved MAC into time would gain.
    """
    figures: dict[str, dict[str, Any]] = {}
    for fold, entry in manifest.get("folds", {}).items():
        totals = entry.get("totals", {})
        figures[fold] = {key: totals[key] for key in _COMPUTE_KEYS if key in totals}
        if totals.get("macs_after"):
            figures[fold]["macs_speedup_bound"] = totals["macs_before"] / totals["macs_after"]
    return figures


def _file_size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def artifact_sizes(bundle: Bundle) -> dict[str, Any]:
    """Bytes of every weights, ONNX and engine file the manifest names (``None`` where the file is missing)."""
    manifest = bundle.manifest
    weights = {fold: _file_size(bundle.artifact_path(entry["weights"]["file"]))
               for fold, entry in manifest.get("folds", {}).items()}
    onnx = {
        key: {"file": entry["file"], "fold": str(entry.get("fold")), "precision": entry.get("precision"),
              "bytes": _file_size(bundle.artifact_path(entry["file"]))}
        for key, entry in manifest.get("onnx", {}).items()
    }
    engines = {
        key: {"file": entry["file"], "fold": str(entry.get("fold")), "precision": entry.get("precision"),
              "gpu": entry.get("gpu", {}).get("kind"), "bytes": _file_size(bundle.artifact_path(entry["file"]))}
        for key, entry in manifest.get("engines", {}).items()
    }
    return {"weights": weights, "onnx": onnx, "engines": engines}


def _structure_signature(entry: Mapping[str, Any]) -> tuple[Any, ...]:
    """Two folds with the same factorized layers and ranks cost the same to run."""
    return tuple((layer["name"], tuple(layer["ranks"]) if layer.get("ranks") else None) for layer in entry["layers"])


def latency_folds(bundle: Bundle, folds: Sequence[Fold]) -> dict[Fold, list[Fold]]:
    """One representative fold per distinct network structure, with the folds it stands for.

    Folds decomposed with the same ranks (always so for relative and fixed policies) have the same
    architecture and so the same latency; timing each of them would only cost time.
    """
    groups: dict[tuple[Any, ...], list[Fold]] = {}
    for fold in folds:
        groups.setdefault(_structure_signature(bundle.fold_entry(fold)), []).append(fold)
    return {members[0]: members for members in groups.values()}


def _bench_precisions(precisions: Sequence[str]) -> tuple[str, ...]:
    """fp32, fp16 (ONNX Runtime, TensorRT, PyTorch on CUDA), bf16, int8 (OpenVINO); order kept, duplicates dropped."""
    allowed = ("fp32", "fp16", "bf16", "int8")
    chosen: list[str] = []
    for value in precisions:
        for part in str(value).replace(",", " ").split():
            name = part.strip().lower()
            if name not in allowed:
                raise ConfigurationError(f"Precision {part!r} is not one of {', '.join(allowed)}.")
            if name not in chosen:
                chosen.append(name)
    if not chosen:
        raise ConfigurationError("At least one precision is needed (fp32, fp16, bf16 or int8).")
    return tuple(chosen)


def _skip_reason(backend: str, precision: str, device: torch.device) -> str | None:
    """Why a backend/precision pair is not measured, for cases the runner would silently change."""
    from tucker_export.engines.selection import check_backend_precision

    try:
        check_backend_precision(backend, precision)
    except ConfigurationError as error:
        return str(error)
    if backend == "torch" and precision == "fp16" and device.type != "cuda":
        # TorchRunner quietly runs fp32 here (nnU-Net autocasts on CUDA only); timing it as fp16 would mislead.
        return "PyTorch fp16 is autocast on CUDA only; on the CPU it would run fp32 (measured as torch fp32)"
    return None


def _runtime_description(runner: Any) -> str:
    providers = getattr(runner, "providers_used", None)
    base = runner.describe() if hasattr(runner, "describe") else type(runner).__name__
    return f"{base} [{', '.join(providers)}]" if providers else base


def _end_to_end_summary(cases: list[dict[str, Any]]) -> dict[str, Any]:
    done = [c for c in cases if c["status"] == "done"]
    summary: dict[str, Any] = {"cases": len(cases), "done": len(done), "failed": len(cases) - len(done)}
    for key in ("check_s", "preprocess_s", "network_s", "export_s", "total_s"):
        values = [c[key] for c in done if c.get(key) is not None]
        summary[f"{key[:-2]}_sum_s"] = float(sum(values)) if values else None
        summary[f"{key[:-2]}_mean_s"] = float(np.mean(values)) if values else None
        summary[f"{key[:-2]}_median_s"] = float(np.median(values)) if values else None
    return summary


def end_to_end(
    input_dir: str | Path,
    *,
    bundle_path: str | Path,
    backend: str,
    precision: str,
    folds: Sequence[Fold] | None,
    device: str,
    use_mirroring: bool,
    step_size: float,
    batch_size: int,
    output_dir: str | Path | None = None,
) -> tuple[EndToEnd, Any]:
    """``run_inference`` on ``input_dir`` with per-case timings; outputs go to ``output_dir`` or a temporary folder.

    Returns the ``EndToEnd`` figures and the ``InferenceReport``.
    """
    from tucker_export.inference import run_inference

    with contextlib.ExitStack() as stack:
        if output_dir is None:
            output_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="tucker-export-bench-"))
        with PeakMemory(device) as probe:
            report = run_inference(
                input_dir, output_dir, bundle_path=bundle_path, backend=backend, precision=precision,
                folds=list(folds) if folds else None, step_size=step_size, use_mirroring=use_mirroring,
                batch_size=batch_size, device=device, overwrite=True, progress=False,
            )
    cases = []
    for result in report.results:
        seconds = result.seconds
        cases.append({
            "case": result.name, "status": result.status, "error": result.error,
            "check_s": seconds.get("check"), "preprocess_s": seconds.get("preprocess"), "network_s": seconds.get("network"),
            "export_s": seconds.get("export"),
            "total_s": sum(seconds.values()) if seconds else None,
        })
    settings = {"input": str(input_dir), "backend": report.backend, "backend_reason": report.backend_reason,
                "precision": precision, "folds": [str(f) for f in report.folds], "mirroring": use_mirroring,
                "step_size": step_size, "batch_size": batch_size, "device": str(device)}
    return EndToEnd(settings, cases, _end_to_end_summary(cases), probe.result), report


def bench_bundle(
    bundle_path: str | Path,
    *,
    backends: Sequence[str] = ("torch", "ort"),
    precisions: Sequence[str] = ("fp32",),
    batch_sizes: Sequence[int] = (1, 2, 4),
    warmup: int = 2,
    repeats: int = 10,
    input_dir: str | Path | None = None,
    folds: Sequence[Fold] | None = None,
    device: str = "cpu",
    use_mirroring: bool = True,
    step_size: float = 0.5,
    e2e_batch_size: int = 1,
    seed: int = DEFAULT_SEED,
    progress: bool = False,
) -> BenchReport:
    """Benchmark a bundle for every backend and precision asked for; see the module docstring.

    Latency is measured on one fold per distinct network structure (``latency_folds``); with
    ``input_dir`` every measured backend also segments those cases (``folds`` ensembled, TTA per
    ``use_mirroring``) and reports seconds per case. A backend that cannot run here is recorded as
    ``"skipped"`` with the reason; a backend named twice is measured once.
    """
    from tqdm.auto import tqdm

    from tucker_export.bundle import Bundle, utc_now
    from tucker_export.engines.selection import normalize_backend, select_backend
    from tucker_export.inference import parse_device

    _check_counts(warmup, repeats)
    sizes_to_time = parse_batch_sizes(batch_sizes)
    chosen_backends: list[str] = []
    for name in backends:
        backend = normalize_backend(name)
        if backend == "auto":
            raise ConfigurationError("bench measures named backends; choose from torch, ort, openvino, trt (not auto).")
        if backend not in chosen_backends:
            chosen_backends.append(backend)
    if not chosen_backends:
        raise ConfigurationError("At least one backend is needed (torch, ort, openvino or trt).")
    chosen_precisions = _bench_precisions(precisions)
    torch_device = parse_device(device)
    if input_dir is not None and not Path(input_dir).exists():
        raise InputImageError(f"Input {input_dir} does not exist.")
    bundle = Bundle.load(bundle_path)
    selected = bundle.resolve_folds(list(folds) if folds else None)
    representatives = latency_folds(bundle, selected)
    input_shape = (bundle.num_input_channels, *bundle.patch_size)

    results: list[BackendBench] = []
    pairs = [(b, p) for b in chosen_backends for p in chosen_precisions]
    for backend, precision in tqdm(pairs, desc="bench", unit="backend", disable=not progress):
        skip = _skip_reason(backend, precision, torch_device)
        if skip is None:
            try:
                factory, reason = select_backend(backend, bundle, precision, torch_device, selected,
                                                 tile_source=input_dir)
            except TuckerExportError as error:
                skip = str(error)
        if skip is not None:
            logger.info("Skipping %s %s: %s", backend, precision, skip)
            results.append(BackendBench(backend, precision, "skipped", skip))
            continue
        entry = BackendBench(backend, precision, "measured", reason)
        for fold, members in representatives.items():
            load_before = _loadavg()
            with PeakMemory(torch_device) as probe:
                with factory(fold) as runner:
                    entry.runtime = _runtime_description(runner)
                    stats = latency(runner, input_shape, batch_sizes=sizes_to_time, warmup=warmup,
                                    repeats=repeats, seed=seed)
                    probe.sample_gpu()
            entry.folds.append(FoldLatency(
                fold=str(fold), same_structure=[str(m) for m in members], latency=list(stats.values()),
                memory=probe.result, loadavg_1min={"before": load_before, "after": _loadavg()},
            ))
            logger.info(
                "%s %s fold %s: %s", backend, precision, fold,
                ", ".join(f"batch {b} {1e3 * s.median_s:.1f} ms" for b, s in stats.items()),
            )
        if input_dir is not None:
            entry.end_to_end, _ = end_to_end(
                input_dir, bundle_path=bundle.path, backend=backend, precision=precision, folds=selected,
                device=device, use_mirroring=use_mirroring, step_size=step_size, batch_size=e2e_batch_size,
            )
        results.append(entry)

    return BenchReport(
        bundle=str(bundle.path.resolve()),
        created=utc_now(),
        settings={
            "backends": chosen_backends, "precisions": list(chosen_precisions), "batch_sizes": list(sizes_to_time),
            "warmup": warmup, "repeats": repeats, "seed": seed, "device": str(torch_device),
            "folds": [str(f) for f in selected], "input_shape": list(input_shape),
            "input": str(input_dir) if input_dir is not None else None,
            "end_to_end": {"mirroring": use_mirroring, "step_size": step_size, "batch_size": e2e_batch_size}
            if input_dir is not None else None,
        },
        environment=environment(),
        model={
            "patch_size": list(bundle.patch_size),
            "num_input_channels": bundle.num_input_channels,
            "num_segmentation_heads": bundle.num_segmentation_heads,
            "label_names": bundle.manifest["model"].get("label_names"),
            "rank_policy": bundle.manifest.get("rank_policy"),
            "source": bundle.manifest.get("source", {}).get("model_dir"),
        },
        compute=compute_figures(bundle.manifest),
        sizes=artifact_sizes(bundle),
        results=results,
    )


# ---- text tables --------------------------------------------------------------------------------


def _mb(value: int | None) -> str:
    return f"{value / 2**20:.1f}" if value is not None else "-"


def _human(value: float | None) -> str:
    if value is None:
        return "-"
    for threshold, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= threshold:
            return f"{value / threshold:.2f}{suffix}"
    return f"{value:.0f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        cells = [str(c).ljust(w) if a == "l" else str(c).rjust(w) for c, w, a in zip(row, widths, align)]
        return "  ".join(cells).rstrip()

    return [line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)]


def format_bench_report(report: BenchReport | Mapping[str, Any]) -> str:
    """The tables the CLI prints: compute and sizes, latency per backend and batch, end-to-end per case."""
    data = report.to_dict() if isinstance(report, BenchReport) else report
    lines = [f"bundle {data['bundle']}"]
    policy = data["model"].get("rank_policy") or {}
    env = data["environment"]
    lines.append(
        f"rank policy {policy.get('mode')}"
        + (f" (factor {policy.get('factor')})" if policy.get("mode") == "relative" else "")
        + f"; patch {'x'.join(map(str, data['model']['patch_size']))}; device {data['settings']['device']}; "
        f"{env.get('usable_cpus')} CPU(s), torch threads {env.get('torch_threads')}, load {env.get('loadavg_1min')}"
    )
    lines.append("")
    rows = []
    for fold, c in data["compute"].items():
        rows.append([fold, _human(c.get("params_before")), _human(c.get("params_after")), f"{c.get('params_ratio', 1):.3f}",
                     _human(c.get("macs_before")), _human(c.get("macs_after")), f"{c.get('macs_ratio', 1):.3f}",
                     _mb(data["sizes"]["weights"].get(fold))])
    lines.extend(_table(["fold", "params", "-> after", "ratio", "MACs", "-> after", "ratio", "weights MB"], rows, "lrrrrrrr"))
    files = [(k, v) for section in ("onnx", "engines") for k, v in data["sizes"][section].items()]
    if files:
        lines.append("files: " + ", ".join(f"{v['file']} {_mb(v['bytes'])} MB" for _, v in files))
    lines.append("")

    rows = []
    skipped = []
    for result in data["results"]:
        if result["status"] != "measured":
            skipped.append(f"skipped {result['backend']} {result['precision']}: {result['reason']}")
            continue
        for fold in result["folds"]:
            memory = fold["memory"]
            gpu = memory.get("peak_gpu_torch_allocated_bytes")
            # a fold timed for others with the same ranks says so: "0 (=0,1)"
            shared = fold["same_structure"]
            fold_text = fold["fold"] + (f" (={','.join(shared)})" if len(shared) > 1 else "")
            for s in fold["latency"]:
                rows.append([
                    result["backend"], result["precision"], fold_text, str(s["batch_size"]),
                    f"{1e3 * s['median_s']:.1f}", f"{1e3 * s['per_patch_median_s']:.1f}",
                    f"{1e3 * s['p10_s']:.1f}-{1e3 * s['p90_s']:.1f}", f"{1e3 * s['min_s']:.1f}-{1e3 * s['max_s']:.1f}",
                    f"{s['patches_per_s']:.2f}", _mb(memory.get("peak_rss_bytes")),
                    _mb(memory.get("peak_rss_increase_bytes")), _mb(gpu) if gpu is not None else "-",
                ])
    if rows:
        lines.append(f"model-only latency, median of {data['settings']['repeats']} after {data['settings']['warmup']} "
                     f"warm-up call(s) (ms):")
        lines.extend(_table(["backend", "prec.", "fold", "batch", "median", "/patch", "p10-p90", "min-max",
                             "patch/s", "peak RSS MB", "+RSS MB", "GPU MB"], rows, "llllrrrrrrrr"))
    lines.extend(skipped)

    e2e_rows = []
    for result in data["results"]:
        e2e = result.get("end_to_end")
        if not e2e:
            continue
        s = e2e["summary"]

        def fmt(value: float | None) -> str:
            return f"{value:.2f}" if value is not None else "-"

        e2e_rows.append([result["backend"], result["precision"], f"{s['done']}/{s['cases']}",
                         fmt(s["preprocess_mean_s"]), fmt(s["network_mean_s"]), fmt(s["export_mean_s"]),
                         fmt(s["total_mean_s"]), _mb(e2e["memory"].get("peak_rss_bytes"))])
    if e2e_rows:
        settings = data["settings"]["end_to_end"]
        lines.append("")
        lines.append(f"end to end per case, mean seconds (TTA {'on' if settings['mirroring'] else 'off'}, "
                     f"step {settings['step_size']}, batch {settings['batch_size']}, folds {', '.join(data['settings']['folds'])}):")
        lines.extend(_table(["backend", "prec.", "cases", "preprocess", "network", "export", "total", "peak RSS MB"],
                            e2e_rows, "lllrrrrr"))
    return "\n".join(lines)


# ---- rank-factor sweep ----------------------------------------------------------------------------


@dataclass
class SweepRow:
    """One point of the trade-off: the original (``rank_factor`` None) or one rank factor."""

    label: str
    rank_factor: float | None
    rank_policy: dict[str, Any]
    compute: dict[str, Any]
    onnx_bytes: int | None
    weights_bytes: int | None
    latency: list[LatencyStats]
    speedup: dict[str, float | None]
    end_to_end: dict[str, Any]
    dice_vs_original: dict[str, float | None]
    nsd_vs_original: dict[str, float | None]
    dice_vs_truth: dict[str, float | None] | None
    per_case: dict[str, dict[str, Any]]

    @property
    def mean_dice_vs_original(self) -> float | None:
        values = [v for v in self.dice_vs_original.values() if v is not None]
        return float(np.mean(values)) if values else None

    @property
    def mean_dice_vs_truth(self) -> float | None:
        values = [v for v in (self.dice_vs_truth or {}).values() if v is not None]
        return float(np.mean(values)) if values else None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["latency"] = [s.to_dict() for s in self.latency]
        data["mean_dice_vs_original"] = self.mean_dice_vs_original
        data["mean_dice_vs_truth"] = self.mean_dice_vs_truth
        return _json_safe(data)


@dataclass
class SweepReport:
    model_dir: str
    created: str
    settings: dict[str, Any]
    environment: dict[str, Any]
    structures: list[str]
    cases: list[str]
    rows: list[SweepRow]

    @property
    def baseline(self) -> SweepRow:
        return self.rows[0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "tucker-export rank-factor sweep",
            "model_dir": self.model_dir,
            "created": self.created,
            "settings": _json_safe(self.settings),
            "environment": _json_safe(self.environment),
            "structures": self.structures,
            "cases": self.cases,
            "definitions": {
                "speedup": "original model-only median latency / this row's, same backend, precision and batch size",
                "macs_ratio": "MACs of one network call after / before decomposition (manifest totals)",
                "dice_vs_original": "per structure, mean over cases of the Dice between this row's segmentation and "
                                    "the original model's (same backend path); cases where neither has the "
                                    "structure are left out",
                "dice_vs_truth": "the same against the ground-truth labels",
            },
            "rows": [row.to_dict() for row in self.rows],
        }


def _read_label_map(path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path))
    # metrics take the spacing in array axis order; SimpleITK's GetSpacing is x, y, z
    return sitk.GetArrayFromImage(image), tuple(reversed(image.GetSpacing()))


def _compare(
    prediction: np.ndarray, reference: np.ndarray, spacing: Sequence[float], labels: Sequence[int],
    names: Mapping[int, str], nsd_tolerance_mm: float,
) -> dict[str, dict[str, Any]]:
    from tucker_export.validation.metrics import compute_class_metrics

    metrics = compute_class_metrics(prediction, reference, list(labels), spacing, nsd_tolerance_mm=nsd_tolerance_mm)
    return {names[label]: {"dice": m.dice, "nsd": m.nsd, "status": m.status} for label, m in metrics.items()}


def _mean_over_cases(per_case: Mapping[str, Mapping[str, Any]], key: str, metric: str,
                     structures: Sequence[str]) -> dict[str, float | None]:
    means: dict[str, float | None] = {}
    for name in structures:
        values = [case[key][name][metric] for case in per_case.values()
                  if key in case and case[key][name]["status"] != "absent"]
        means[name] = float(np.mean(values)) if values else None
    return means


def _slug(factor: float | None) -> str:
    return BASELINE_LABEL if factor is None else f"rank-{factor:g}"


def sweep_rank_factors(
    model_dir: str | Path,
    factors: Sequence[float] = SWEEP_FACTORS,
    *,
    work_dir: str | Path,
    images_dir: str | Path,
    labels_dir: str | Path | None = None,
    backend: str = "ort",
    precision: str = "fp32",
    folds: Sequence[Fold] | None = None,
    use_mirroring: bool = False,
    step_size: float = 0.5,
    inference_batch_size: int = 1,
    case_repeats: int = 1,
    device: str = "cpu",
    batch_sizes: Sequence[int] = (1,),
    warmup: int = 2,
    repeats: int = 10,
    interleave: bool = True,
    round_to: int = 8,
    nsd_tolerance_mm: float = 2.0,
    seed: int = DEFAULT_SEED,
    json_path: str | Path | None = None,
    plot_path: str | Path | None = None,
    title: str | None = None,
    progress: bool = True,
    trust_checkpoint: bool = False,
) -> SweepReport:
    """The compression / speed / accuracy trade-off of ``model_dir`` over rank ``factors``.

    For the original (a rank-mode ``none`` bundle) and each factor (relative policy, ranks rounded
    up to ``round_to``): decompose into ``work_dir/bundles``, export ONNX (``ort``, ``trt``) and
    build engines (``trt``), time the network (first fold, ``batch_sizes``; rows interleaved unless
    ``interleave=False``), segment ``images_dir`` into ``work_dir/segmentations`` through the same
    backend (case by case, every row per case in rotating order), and compare per structure with the original's segmentations (and ``labels_dir``'s
    ``<case>.nii.gz`` when given). ``case_repeats`` > 1 segments every case that many times per row
    and keeps the median seconds of each stage (end-to-end times on a loaded machine vary by tens of
    percent from run to run). TTA is off by default (``use_mirroring``): it multiplies every
    row's inference time by up to 8 in 3D and changes no row more than another.

    Writes ``json_path`` and ``plot_path`` (PNG) when given. Raises before any work when an option
    cannot be honoured (unknown backend, missing folder, TensorRT without a GPU).
    """
    from tqdm.auto import tqdm

    from tucker_export.bundle import Bundle, utc_now
    from tucker_export.engines.selection import normalize_backend, select_backend
    from tucker_export.exporter.decompose import decompose_model
    from tucker_export.exporter.onnx_export import export_bundle, normalize_precisions
    from tucker_export.exporter.ranks import RankPolicy
    from tucker_export.inference import parse_device
    from tucker_export.nnunet.cases import discover_cases
    from tucker_export.nnunet.loading import available_folds, parse_fold

    # ---- check everything before the first long step
    chosen_factors = parse_rank_factors(factors)
    _check_counts(warmup, repeats)
    if isinstance(case_repeats, bool) or not isinstance(case_repeats, int) or case_repeats < 1:
        raise ConfigurationError(f"--case-repeats must be an integer >= 1, got {case_repeats!r}.")
    sizes_to_time = parse_batch_sizes(batch_sizes)
    backend = normalize_backend(backend)
    if backend == "auto":
        raise ConfigurationError("A sweep compares one named backend; choose torch, ort or trt (not auto).")
    chosen_precisions = normalize_precisions(precision)
    if len(chosen_precisions) != 1:
        raise ConfigurationError(f"A sweep runs one precision, got {', '.join(chosen_precisions)}.")
    precision = chosen_precisions[0]
    if backend == "torch" and precision == "fp16" and not device.startswith("cuda"):
        raise ConfigurationError("PyTorch fp16 is autocast on CUDA only; sweep torch at fp32 on the CPU, or use ort fp16.")
    torch_device = parse_device(device)
    if backend == "trt":
        from tucker_export.engines.build import require_tensorrt_and_cuda

        require_tensorrt_and_cuda()
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelFolderError(f"Model folder {model_dir} does not exist.")
    model_folds = available_folds(model_dir)
    selected = tuple(parse_fold(f) for f in folds) if folds else model_folds
    missing = [f for f in selected if f not in model_folds]
    if missing or not selected:
        raise ConfigurationError(
            f"Model {model_dir} has no checkpoint for fold(s) {', '.join(map(str, missing)) or '(none)'} "
            f"(folds found: {', '.join(map(str, model_folds)) or 'none'})."
        )
    images_dir = Path(images_dir)
    if not images_dir.exists():
        raise InputImageError(f"Input {images_dir} does not exist.")
    labels_dir = Path(labels_dir) if labels_dir is not None else None
    if labels_dir is not None and not labels_dir.is_dir():
        raise InputImageError(f"Labels folder {labels_dir} does not exist.")
    work_dir = Path(work_dir)

    plan: list[float | None] = [None, *chosen_factors]
    bundles: dict[float | None, Bundle] = {}
    label_of = {f: BASELINE_LABEL if f is None else f"{f:g}" for f in plan}

    # ---- 1. bundles (and exports / engines) for every row; the original's first, so that the
    # model description (from its checkpoint) checks the images before the long steps.
    bar = tqdm(plan, desc="sweep: decompose+export", unit="row", disable=not progress)
    for factor in bar:
        bar.set_postfix_str(label_of[factor])
        policy = RankPolicy(mode="none") if factor is None else RankPolicy(mode="relative", factor=factor, round_to=round_to)
        target = work_dir / "bundles" / _slug(factor)
        bundle = decompose_model(model_dir, target, folds=list(selected), policy=policy, overwrite=True,
                                 progress=False, trust_checkpoint=trust_checkpoint)
        if factor is None:
            spec = bundle.spec
            file_ending = spec.dataset_json["file_ending"]
            found = discover_cases(images_dir, num_channels=spec.num_input_channels, file_ending=file_ending)
            cases = [c.name for c in found]
        if backend in ("ort", "trt"):
            export_bundle(bundle, precisions=(precision,), folds=list(selected), progress=False)
        if backend == "trt":
            from tucker_export.engines.build import build_engines

            build_engines(bundle, precisions=(precision,), folds=list(selected), progress=False)
        bundles[factor] = Bundle.load(target)
    foreground = [label for label in sorted(spec.label_names) if label != 0]
    names = {label: str(spec.label_names[label]) for label in foreground}
    structures = [names[label] for label in foreground]

    # ---- 2. model-only latency, first fold (every relative-policy fold has the same structure)
    latency_fold = selected[0]
    input_shape = (spec.num_input_channels, *spec.patch_size)
    timings: dict[str, dict[int, LatencyStats]] = {}
    groups = [plan] if interleave else [[f] for f in plan]
    logger.info("Timing %d network(s) %s (%s, %s, %s).", len(plan), "interleaved" if interleave else "one by one",
                backend, precision, torch_device)
    for group in tqdm(groups, desc="sweep: latency", unit="group", disable=not progress or interleave):
        with contextlib.ExitStack() as stack:
            runners = {}
            for factor in group:
                factory, _ = select_backend(backend, bundles[factor], precision, torch_device, [latency_fold])
                runners[label_of[factor]] = stack.enter_context(factory(latency_fold))
            timings.update(interleaved_latency(
                runners, input_shape, batch_sizes=sizes_to_time, warmup=warmup, repeats=repeats, seed=seed,
                progress=progress and interleave,
            ))

    # ---- 3. segment the images with every row, case by case with the rows in rotating order (as for
    # the latency: load drift on a shared machine must not favour the rows that happen to run late);
    # one untimed case first, so one-time costs (imports, first allocations) land on no row.
    seg_dirs = {label_of[f]: work_dir / "segmentations" / _slug(f) for f in plan}
    row_cases: dict[str, list[dict[str, Any]]] = {label_of[f]: [] for f in plan}
    row_memory: dict[str, dict[str, Any]] = {}
    row_backend: dict[str, tuple[str, str]] = {}

    def segment(case_source: Path, factor: float | None, output_dir: Path) -> EndToEnd:
        figures, report = end_to_end(
            case_source, bundle_path=bundles[factor].path, backend=backend, precision=precision, folds=selected,
            device=device, use_mirroring=use_mirroring, step_size=step_size, batch_size=inference_batch_size,
            output_dir=output_dir,
        )
        if report.failed:
            first = report.failed[0]
            raise InputImageError(f"Case {first.name} failed in the sweep's {label_of[factor]} run ({first.error}).")
        return figures

    def source(case: Any) -> Path:
        return case.dicom_dir if case.dicom_dir is not None else case.files[0]

    with tempfile.TemporaryDirectory(prefix="tucker-export-warmup-") as scratch:
        segment(source(found[0]), None, Path(scratch))
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {label_of[f]: {c.name: [] for c in found} for f in plan}
    bar = tqdm(total=case_repeats * len(found), desc="sweep: segment", unit="case", disable=not progress)
    for repeat in range(case_repeats):
        for index, case in enumerate(found):
            shift = (repeat * len(found) + index) % len(plan)
            for factor in plan[shift:] + plan[:shift]:
                label = label_of[factor]
                bar.set_postfix_str(f"{case.name} {label}")
                figures = segment(source(case), factor, seg_dirs[label])
                runs[label][case.name].extend(figures.cases)
                row_backend[label] = (figures.settings["backend"], figures.settings["backend_reason"])
                previous = row_memory.get(label, {}).get("peak_rss_bytes") or 0
                if (figures.memory.get("peak_rss_bytes") or 0) >= previous:
                    row_memory[label] = figures.memory  # the largest peak over this row's runs
            bar.update()
    bar.close()
    for label, per_case in runs.items():
        for name, entries in per_case.items():
            # the median of each stage over the repeats; the segmentation itself is the same every time
            row_cases[label].append({
                "case": name, "status": "done", "error": None, "runs": len(entries),
                **{key: float(np.median([e[key] for e in entries]))
                   for key in ("preprocess_s", "network_s", "export_s", "total_s")},
            })
    e2e: dict[str, EndToEnd] = {}
    for factor in plan:
        label = label_of[factor]
        settings = {"input": str(images_dir), "backend": row_backend[label][0],
                    "backend_reason": row_backend[label][1], "precision": precision,
                    "folds": [str(f) for f in selected], "mirroring": use_mirroring, "step_size": step_size,
                    "batch_size": inference_batch_size, "device": str(device), "case_repeats": case_repeats,
                    "order": "cases interleaved across rows; per case the median over case_repeats runs"}
        e2e[label] = EndToEnd(settings, row_cases[label], _end_to_end_summary(row_cases[label]), row_memory[label])

    # ---- 4. compare per structure and assemble the rows
    references = {case: _read_label_map(seg_dirs[BASELINE_LABEL] / f"{case}{file_ending}") for case in cases}
    truths: dict[str, tuple[np.ndarray, tuple[float, ...]]] = {}
    if labels_dir is not None:
        for case in cases:
            path = labels_dir / f"{case}{file_ending}"
            if path.is_file():
                truths[case] = _read_label_map(path)
            else:
                logger.warning("No label file %s; case %s has no Dice against the truth.", path, case)

    baseline_stats = timings[BASELINE_LABEL]
    baseline_network = e2e[BASELINE_LABEL].summary.get("network_sum_s")
    baseline_total = e2e[BASELINE_LABEL].summary.get("total_sum_s")
    rows: list[SweepRow] = []
    for factor in plan:
        label = label_of[factor]
        bundle = bundles[factor]
        per_case: dict[str, dict[str, Any]] = {}
        for case in cases:
            prediction, spacing = _read_label_map(seg_dirs[label] / f"{case}{file_ending}")
            reference, _ = references[case]
            entry = {"vs_original": _compare(prediction, reference, spacing, foreground, names, nsd_tolerance_mm)}
            if case in truths:
                entry["vs_truth"] = _compare(prediction, truths[case][0], spacing, foreground, names, nsd_tolerance_mm)
            per_case[case] = entry
        stats = timings[label]
        speedup: dict[str, float | None] = {
            f"batch_{b}": baseline_stats[b].median_s / s.median_s if s.median_s > 0 else None for b, s in stats.items()
        }
        network = e2e[label].summary.get("network_sum_s")
        total = e2e[label].summary.get("total_sum_s")
        speedup["end_to_end_network"] = baseline_network / network if baseline_network and network else None
        speedup["end_to_end_total"] = baseline_total / total if baseline_total and total else None
        compute = compute_figures(bundle.manifest)[str(latency_fold)]
        # The original's "before" counts are the reference of every row's ratio (they are equal by construction).
        speedup["macs_bound"] = compute.get("macs_speedup_bound")
        onnx_entry = bundle.manifest.get("onnx", {}).get(f"fold_{latency_fold}.{precision}")
        rows.append(SweepRow(
            label=label, rank_factor=factor, rank_policy=bundle.manifest.get("rank_policy", {}), compute=compute,
            onnx_bytes=_file_size(bundle.artifact_path(onnx_entry["file"])) if onnx_entry else None,
            weights_bytes=_file_size(bundle.weights_path(latency_fold)),
            latency=list(stats.values()), speedup=speedup,
            end_to_end=e2e[label].to_dict(),
            dice_vs_original=_mean_over_cases(per_case, "vs_original", "dice", structures),
            nsd_vs_original=_mean_over_cases(per_case, "vs_original", "nsd", structures),
            dice_vs_truth=_mean_over_cases(per_case, "vs_truth", "dice", structures) if truths else None,
            per_case=per_case,
        ))

    report = SweepReport(
        model_dir=str(model_dir.resolve()),
        created=utc_now(),
        settings={
            "factors": list(chosen_factors), "rank_mode": "relative", "round_to": round_to,
            "backend": backend, "precision": precision, "device": str(torch_device),
            "folds": [str(f) for f in selected], "latency_fold": str(latency_fold),
            "latency_batch_sizes": list(sizes_to_time), "warmup": warmup, "repeats": repeats, "seed": seed,
            "interleaved": interleave, "input_shape": list(input_shape),
            "images": str(images_dir), "labels": str(labels_dir) if labels_dir else None,
            "mirroring": use_mirroring, "tta": "on" if use_mirroring else "off",
            "step_size": step_size, "inference_batch_size": inference_batch_size, "case_repeats": case_repeats,
            "nsd_tolerance_mm": nsd_tolerance_mm, "title": title,
        },
        environment=environment(),
        structures=structures,
        cases=cases,
        rows=rows,
    )
    if json_path is not None:
        write_json_atomic(json_path, report.to_dict())
    if plot_path is not None:
        plot_sweep(report, plot_path, title=title)
    return report


def format_sweep_table(report: SweepReport | Mapping[str, Any]) -> str:
    """Trade-off table (one row per factor) and the per-structure Dice vs the original."""
    data = report.to_dict() if isinstance(report, SweepReport) else report
    settings = data["settings"]
    batch = settings["latency_batch_sizes"][0]
    has_truth = any(r.get("dice_vs_truth") for r in data["rows"])

    def fmt(value: float | None, digits: int = 3) -> str:
        return f"{value:.{digits}f}" if value is not None else "-"

    lines = [
        f"rank-factor sweep of {data['model_dir']}",
        f"{settings['backend']} {settings['precision']} on {settings['device']}; TTA {settings['tta']}; "
        f"{len(data['cases'])} case(s); folds {', '.join(settings['folds'])}; latency: fold {settings['latency_fold']}, "
        f"median of {settings['repeats']}{' (rows interleaved)' if settings['interleaved'] else ''}",
        "",
    ]
    header = ["factor", "params", "MACs", "MACs bound", f"ms (b{batch})", "p10-p90", "speed-up", "e2e net",
              "Dice vs orig", "min struct"] + (["Dice vs GT"] if has_truth else [])
    rows = []
    for row in data["rows"]:
        stats = row["latency"][0]
        dice = [v for v in row["dice_vs_original"].values() if v is not None]
        cells = [
            row["label"], fmt(row["compute"].get("params_ratio")), fmt(row["compute"].get("macs_ratio")),
            fmt(row["speedup"].get("macs_bound"), 2) + "x", f"{1e3 * stats['median_s']:.1f}",
            f"{1e3 * stats['p10_s']:.0f}-{1e3 * stats['p90_s']:.0f}",
            fmt(row["speedup"].get(f"batch_{batch}"), 2) + "x", fmt(row["speedup"].get("end_to_end_network"), 2) + "x",
            fmt(row["mean_dice_vs_original"], 4), fmt(min(dice) if dice else None, 4),
        ]
        if has_truth:
            cells.append(fmt(row["mean_dice_vs_truth"], 4))
        rows.append(cells)
    lines.extend(_table(header, rows, "l" + "r" * (len(header) - 1)))
    lines.append("")
    lines.append("Dice vs the original, per structure (mean over cases):")
    structures = data["structures"]
    rows = [[row["label"], *(fmt(row["dice_vs_original"].get(s), 4) for s in structures)] for row in data["rows"]]
    lines.extend(_table(["factor", *structures], rows, "l" + "r" * len(structures)))
    if any(v is None for row in data["rows"] for v in row["dice_vs_original"].values()):
        lines.append("- : the structure is in neither segmentation of any case")
    return "\n".join(lines)


def plot_sweep(report: SweepReport | Mapping[str, Any], path: str | Path, *, title: str | None = None,
               dpi: int = 110) -> Path:
    """PNG of the trade-off: Dice vs the original per structure (and their mean) against the speed-up
    (left) and against the fraction of MACs kept (right), each point labelled with its rank factor.

    Drawn on a standalone Agg figure, so matplotlib's global backend and style stay untouched.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    data = report.to_dict() if isinstance(report, SweepReport) else report
    settings = data["settings"]
    batch = settings["latency_batch_sizes"][0]
    rows = data["rows"]
    labels = [r["label"] for r in rows]
    speedups = [r["speedup"].get(f"batch_{batch}") or math.nan for r in rows]
    macs = [r["compute"].get("macs_ratio") or math.nan for r in rows]
    structures = data["structures"]

    def series(name: str | None) -> list[float]:
        if name is None:
            return [r["mean_dice_vs_original"] if r["mean_dice_vs_original"] is not None else math.nan for r in rows]
        return [r["dice_vs_original"].get(name) if r["dice_vs_original"].get(name) is not None else math.nan
                for r in rows]

    figure = Figure(figsize=(12, 5), dpi=dpi, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 2, sharey=True)
    panels = ((axes[0], speedups, f"speed-up of one network call (batch {batch}, original latency / Tucker latency)"),
              (axes[1], macs, "MACs kept (Tucker / original)"))
    colors = [f"C{i % 10}" for i in range(len(structures))]
    for ax, xs, xlabel in panels:
        # The mean goes underneath (grey, wide) so that a structure lying on it stays visible.
        mean = series(None)
        ax.plot(xs, mean, marker="s", ms=7, lw=4, color="0.25", alpha=0.45, zorder=2, label="mean of structures")
        for name, color in zip(structures, colors):
            values = series(name)
            no_data = not any(math.isfinite(v) for v in values)
            ax.plot(xs, values, marker="o", ms=4, lw=1.3, color=color, zorder=3,
                    label=f"{name} (absent in every case)" if no_data else name)
        ax.plot(xs[:1], mean[:1], marker="*", ms=14, color="black", ls="none", zorder=4, label="original model")
        # rank-factor labels alternate above and below the mean so neighbouring points stay legible
        for index, (x, y, text) in enumerate(zip(xs, mean, labels)):
            if index == 0 or not (math.isfinite(x) and math.isfinite(y)):
                continue
            offset = (5, 7) if index % 2 else (5, -13)
            ax.annotate(text, (x, y), textcoords="offset points", xytext=offset, fontsize=8, zorder=5)
        ax.axhline(1.0, color="grey", lw=0.8, ls=":")
        ax.set_xlabel(xlabel)
        ax.grid(True, alpha=0.3)
    axes[1].invert_xaxis()  # more compression to the right in both panels
    axes[0].axvline(1.0, color="grey", lw=0.8, ls=":")
    axes[0].set_ylabel("Dice vs original model (mean over cases)")
    axes[1].legend(loc="lower left", fontsize=8, framealpha=0.9)
    model_name = Path(data["model_dir"]).name
    figure.suptitle(
        title or (
            f"Tucker rank-factor sweep, {model_name}\n{settings['backend']} {settings['precision']} on "
            f"{settings['device']}, TTA {settings['tta']}, {len(data['cases'])} case(s), "
            f"folds {', '.join(settings['folds'])}; point labels = rank factor"
        ),
        fontsize=10,
    )
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=dpi)
    return path


def write_sweep_outputs(report: SweepReport, out_dir: str | Path, name: str = "sweep",
                        *, title: str | None = None) -> tuple[Path, Path]:
    """``out_dir/<name>.json`` and ``out_dir/<name>.png``, each written atomically."""
    out_dir = Path(out_dir)
    json_path, png_path = out_dir / f"{name}.json", out_dir / f"{name}.png"
    write_json_atomic(json_path, report.to_dict())
    plot_sweep(report, png_path, title=title)
    return json_path, png_path


@contextlib.contextmanager
def work_folder(work_dir: str | Path | None) -> Iterator[Path]:
    """``work_dir`` (kept) or a temporary folder removed afterwards."""
    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
        yield Path(work_dir)
        return
    with tempfile.TemporaryDirectory(prefix="tucker-export-sweep-") as tmp:
        yield Path(tmp)
