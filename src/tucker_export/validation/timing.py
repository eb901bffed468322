"""Model-only latency of one network call, and peak host / GPU memory over a block.

- ``latency(runner_or_callable, input_shape, ...)``: model-only latency of one network call per
  batch size, after warm-up calls, as the median of N timed calls with its spread (min, max,
  p10/p90, IQR); per-patch latency is the call time divided by the batch.
  ``interleaved_latency`` times several targets round-robin.
- ``PeakMemory``: peak RSS (and GPU memory on CUDA) over a ``with`` block.

Measurement choices (why the numbers mean what they say):

- Timing is ``time.perf_counter`` around the call; on CUDA the device is synchronised before and
  after, so asynchronous launches are not mistaken for finished work.
- Every input is seeded standard-normal data, like nnU-Net's z-scored CT intensities; the same
  seed gives every backend and every sweep row the same input.
- Peak RSS: the kernel's high-water mark (VmHWM) is reset before each measurement by writing 5 to
  ``/proc/self/clear_refs`` (Linux >= 4.0), so ``peak_rss_bytes`` is the peak *during* that
  measurement. Where the reset is not possible it is ``ru_maxrss``, the process-lifetime peak, and
  ``rss_scope`` says so. Memory freed by an earlier backend may be reused by a later one, so
  ``peak_rss_increase_bytes`` (peak minus RSS before) is a lower bound of what the engine needs.
- GPU memory: ``torch.cuda.max_memory_allocated`` covers PyTorch's allocator only (the torch
  backend and the buffers tucker-export passes to engines); ONNX Runtime and TensorRT allocate
  outside it, so the drop of free device memory (``torch.cuda.mem_get_info``) while the engine is
  open is recorded too.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import math
import re
import resource
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tucker_export.errors import ConfigurationError
from tucker_export.validation.bench_common import DEFAULT_SEED, _check_counts, _json_safe, parse_batch_sizes

if TYPE_CHECKING:
    import torch


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
