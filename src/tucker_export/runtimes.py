"""The one way each in-process runtime is opened: ONNX Runtime sessions and PyTorch callables.

The runner behind ``infer``, the export parity check and the benchmarks all open their sessions
here, so the defaults the runner ships ("fastest measured": all graph optimisations, sequential
execution, physical cores) are the ones the benchmarks measured. OpenVINO and TensorRT have their
own one-module adapters (``engines.openvino_backend``, ``engines.tensorrt_backend``).

onnxruntime and torch are imported lazily, so importing this module costs nothing.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tucker_export.errors import EngineError

if TYPE_CHECKING:
    import torch

GRAPH_OPTIMIZATIONS = ("none", "basic", "extended", "all")
CPU_PROVIDERS: tuple[str, ...] = ("CPUExecutionProvider",)


def physical_cores() -> int:
    """Physical cores where they can be told (Linux sysfs), else the logical CPU count.

    Convolution kernels gain nothing from hyper-threads; ONNX Runtime's own default is the
    physical core count too. Respects the process's CPU affinity.
    """
    try:
        available = os.sched_getaffinity(0)
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1
    cores: set[tuple[str, str]] = set()
    for cpu in available:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text().strip(), (topology / "core_id").read_text().strip()))
        except OSError:
            return len(available)
    return max(1, len(cores))


def ort_session_options(
    *,
    graph_optimization: str = "all",
    threads: int | None = None,
    sequential: bool = True,
    inter_op_threads: int | None = None,
    optimized_model_path: str | Path | None = None,
) -> Any:
    """ONNX Runtime session options; ``threads=None`` means the physical cores."""
    import onnxruntime as ort

    levels = {
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    if graph_optimization not in levels:
        raise EngineError(
            f"Graph optimisation level {graph_optimization!r} is not one of {', '.join(GRAPH_OPTIMIZATIONS)}.",
            option="graph_optimization",
        )
    options = ort.SessionOptions()
    options.graph_optimization_level = levels[graph_optimization]
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL if sequential else ort.ExecutionMode.ORT_PARALLEL
    options.intra_op_num_threads = threads or physical_cores()
    if inter_op_threads is not None:
        options.inter_op_num_threads = inter_op_threads
    options.log_severity_level = 3  # ORT warns about fp16 nodes it runs through casts on CPU
    if optimized_model_path is not None:
        options.optimized_model_filepath = str(optimized_model_path)
    return options


def ort_session(
    model: str | Path | bytes,
    *,
    providers: Sequence[str | tuple[str, dict[str, Any]]] = CPU_PROVIDERS,
    options: Any = None,
) -> Any:
    """An ``onnxruntime.InferenceSession`` of a file or serialized model; a load failure is an EngineError."""
    import onnxruntime as ort

    source = str(model) if isinstance(model, Path) else model
    name = source if isinstance(source, str) else "the in-memory ONNX model"
    try:
        return ort.InferenceSession(source, options if options is not None else ort_session_options(),
                                    providers=list(providers))
    except Exception as error:  # ORT raises its own Fail/InvalidGraph/RuntimeException types
        raise EngineError(f"ONNX Runtime cannot load {name} ({error}).") from error


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(threads)``, restoring the previous value after."""
    import torch

    if threads is None or threads == torch.get_num_threads():
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def torch_callable(
    network: torch.nn.Module, device: torch.device | str | None = None, *, autocast: torch.dtype | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``network`` in eval mode as ``batch -> logits`` under ``inference_mode``.

    The batch is moved to ``device`` (default: where the network is). ``autocast`` (e.g.
    ``torch.float16`` on CUDA, ``torch.bfloat16`` on the CPU) runs the network under torch's autocast
    on that device and returns fp32 logits.
    """
    import torch

    network = network.eval() if device is None else network.to(device).eval()
    target = torch.device(device) if device is not None else next(network.parameters()).device

    def run(batch: torch.Tensor) -> torch.Tensor:
        scope = torch.autocast(target.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
        with torch.inference_mode(), scope:
            out = network(batch.to(target))
        return out.float() if autocast is not None else out

    return run
