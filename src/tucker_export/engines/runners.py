"""Runners: PyTorch, ONNX Runtime and TensorRT behind one interface.

A runner is a context manager that owns its session (network, InferenceSession, TensorRT engine
and context): ``__enter__`` opens it, ``__exit__`` releases it. ``infer(batch)`` maps a
``(B, C, *patch)`` float batch to ``(B, K, *patch)`` float32 logits and returns the same kind it
was given: a numpy array for a numpy array, a torch tensor (on the input's device) for a tensor.

    with OnnxRuntimeRunner("bundle/onnx/fold_0.fp32.onnx") as runner:
        logits = runner.infer(batch)

The TensorRT runner imports TensorRT only when it is opened, so this module imports without it.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tucker_export.errors import BackendUnavailableError, EngineError
from tucker_export.runtimes import ort_session, ort_session_options, physical_cores, torch_callable

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

ArrayLike = Any  # np.ndarray | torch.Tensor; kept loose so torch stays a lazy import here


def _is_numpy(batch: ArrayLike) -> bool:
    return isinstance(batch, np.ndarray)


class Runner(abc.ABC):
    """One fold's network behind ``infer``; use it as a context manager."""

    name: str = "runner"

    def __init__(self, *, precision: str, device: str | torch.device) -> None:
        import torch

        self.precision = precision
        self.device = torch.device(device)
        self._open = False

    # ---- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> Runner:
        self.open()
        self._open = True
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._open = False
        self.close()

    @abc.abstractmethod
    def open(self) -> None:
        """Create the session (load weights, build the ORT session, deserialize the engine)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the session and its device memory."""

    # ---- inference -------------------------------------------------------------------------
    def infer(self, batch: ArrayLike) -> ArrayLike:
        """Logits for ``batch`` (B, C, *patch); numpy in -> numpy out, torch in -> torch out (input's device)."""
        if not self._open:
            raise EngineError(f"{self.describe()} is not open; use it as `with runner: runner.infer(batch)`.")
        if batch.ndim < 3:
            raise EngineError(f"{self.describe()} needs a (batch, channels, *patch) input, got shape {tuple(batch.shape)}.")
        if _is_numpy(batch):
            return self._infer_numpy(np.ascontiguousarray(batch, dtype=np.float32))
        return self._infer_torch(batch)

    @abc.abstractmethod
    def _infer_numpy(self, batch: np.ndarray) -> np.ndarray: ...

    @abc.abstractmethod
    def _infer_torch(self, batch: torch.Tensor) -> torch.Tensor: ...

    def describe(self) -> str:
        return f"{self.name} ({self.precision}, {self.device})"

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"


# ---- PyTorch ------------------------------------------------------------------------------------


class TorchRunner(Runner):
    """Eager PyTorch; fp16 means autocast on CUDA, as nnU-Net's predictor does (fp32 on the CPU)."""

    name = "torch"

    def __init__(
        self,
        network: torch.nn.Module | Callable[[], torch.nn.Module],
        *,
        precision: str = "fp32",
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__(precision=precision, device=device)
        self._network_source = network
        self.network: torch.nn.Module | None = None
        if precision == "fp16" and self.device.type != "cuda":
            # nnU-Net only autocasts on CUDA; on the CPU it runs fp32, and so do we.
            logger.info("PyTorch on %s runs fp32 (autocast to fp16 is CUDA-only, as in nnU-Net).", self.device)
            self.precision = "fp32"

    def open(self) -> None:
        import torch

        source = self._network_source
        network = source if isinstance(source, torch.nn.Module) else source()
        decoder = getattr(network, "decoder", None)
        if decoder is not None and getattr(decoder, "deep_supervision", False):
            decoder.deep_supervision = False
        self.network = network.to(self.device).eval()
        # nnU-Net autocasts fp16 on CUDA only; __init__ already turned fp16 on the CPU into fp32.
        fp16 = self.precision == "fp16" and self.device.type == "cuda"
        self._run = torch_callable(self.network, self.device, autocast=torch.float16 if fp16 else None)

    def close(self) -> None:
        import torch

        self.network = None
        self._run = None  # its closure holds the network too
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        import torch

        assert self.network is not None
        return self._run(batch.to(torch.float32)).float()

    def _infer_numpy(self, batch: np.ndarray) -> np.ndarray:
        import torch

        return self._forward(torch.from_numpy(batch)).cpu().numpy()

    def _infer_torch(self, batch: torch.Tensor) -> torch.Tensor:
        return self._forward(batch).to(batch.device)


# ---- ONNX Runtime -------------------------------------------------------------------------------

ORT_CPU = "CPUExecutionProvider"
ORT_CUDA = "CUDAExecutionProvider"


def ort_providers_for(
    device_type: str,
    available: Sequence[str],
    *,
    device_index: int = 0,
    precision: str = "fp32",
) -> list[str | tuple[str, dict[str, Any]]]:
    """ONNX Runtime providers (with options) for a device, best first, CPU last as the fallback.

    ONNX Runtime's TensorRT provider is not offered: it builds its own engines when a session opens
    (minutes, once per shape), and tucker-export's own TensorRT engines cover that case with checked
    keys. Raises BackendUnavailableError for a CUDA device without the CUDA provider (the CPU-only
    onnxruntime wheel).
    """
    providers: list[str | tuple[str, dict[str, Any]]] = []
    if device_type == "cuda":
        if ORT_CUDA not in available:
            raise BackendUnavailableError(
                "ONNX Runtime here has no CUDAExecutionProvider (the CPU-only onnxruntime wheel); install "
                "onnxruntime-gpu or run on the CPU", option="device", use="cpu",
            )
        providers.append((ORT_CUDA, {"device_id": device_index}))
    elif device_type != "cpu":
        raise BackendUnavailableError(f"ONNX Runtime runs on cpu or cuda devices, not {device_type!r}.")
    providers.append(ORT_CPU)
    return providers


class OnnxRuntimeRunner(Runner):
    """ONNX Runtime on the CPU, or on CUDA (the CUDA provider) with IO binding on CUDA tensors.

    CPU defaults are the fastest measured in ``bench/bench_engines.py``: all graph optimisations,
    sequential execution, intra-op threads = physical cores.
    """

    name = "onnxruntime"

    def __init__(
        self,
        onnx_path: str | Path,
        *,
        precision: str = "fp32",
        device: str | torch.device = "cpu",
        providers: Sequence[str | tuple[str, dict[str, Any]]] | None = None,
        intra_op_threads: int | None = None,
        graph_optimization: str = "all",
        sequential: bool = True,
        optimized_model_path: str | Path | None = None,
    ) -> None:
        super().__init__(precision=precision, device=device)
        self.onnx_path = Path(onnx_path)
        self._providers = list(providers) if providers is not None else None
        self.intra_op_threads = intra_op_threads
        self.graph_optimization = graph_optimization
        self.sequential = sequential
        self.optimized_model_path = optimized_model_path
        self.session: Any = None
        self.providers_used: list[str] = []

    def session_options(self) -> Any:
        return ort_session_options(
            graph_optimization=self.graph_optimization, threads=self.intra_op_threads, sequential=self.sequential,
            optimized_model_path=self.optimized_model_path,
        )

    def open(self) -> None:
        import onnxruntime as ort

        if not self.onnx_path.is_file():
            raise EngineError(f"ONNX file {self.onnx_path} does not exist; run `tucker-export export` first.")
        providers = self._providers or ort_providers_for(
            self.device.type, ort.get_available_providers(), device_index=self.device.index or 0,
            precision=self.precision,
        )
        self.session = ort_session(self.onnx_path, providers=providers, options=self.session_options())
        self.providers_used = list(self.session.get_providers())
        if self.device.type == "cuda" and ORT_CUDA not in self.providers_used:
            raise BackendUnavailableError(
                f"ONNX Runtime fell back to {', '.join(self.providers_used)} for {self.device}; check the CUDA "
                f"libraries onnxruntime-gpu needs (`tucker-export doctor`)."
            )
        self._input_name = self.session.get_inputs()[0].name
        self._output_name = self.session.get_outputs()[0].name
        logger.debug("ONNX Runtime session for %s on %s", self.onnx_path.name, self.providers_used)

    def close(self) -> None:
        self.session = None

    def _infer_numpy(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run([self._output_name], {self._input_name: batch})[0]

    def _infer_torch(self, batch: torch.Tensor) -> torch.Tensor:
        import torch

        if batch.device.type != "cuda" or self.device.type != "cuda":
            out = self._infer_numpy(np.ascontiguousarray(batch.detach().cpu().numpy(), dtype=np.float32))
            return torch.from_numpy(out).to(batch.device)
        # IO binding: ORT reads and writes torch's CUDA memory directly, no host round trip.
        batch = batch.to(self.device, torch.float32).contiguous()
        out_shape = self._output_shape(tuple(batch.shape))
        output = torch.empty(out_shape, dtype=torch.float32, device=self.device)
        binding = self.session.io_binding()
        binding.bind_input(self._input_name, "cuda", self.device.index or 0, np.float32, tuple(batch.shape), batch.data_ptr())
        binding.bind_output(self._output_name, "cuda", self.device.index or 0, np.float32, out_shape, output.data_ptr())
        # ORT runs on its own stream: let torch's pending writes to `batch` finish first.
        torch.cuda.current_stream(self.device).synchronize()
        self.session.run_with_iobinding(binding)
        return output.to(batch.device)

    def _output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        declared = self.session.get_outputs()[0].shape  # ['batch', K, *patch]
        return (input_shape[0], *(int(d) for d in declared[1:]))


# ---- TensorRT -----------------------------------------------------------------------------------


class TensorRTRunner(Runner):
    """A TensorRT engine from a bundle (checked against this GPU, TensorRT and the ONNX file first).

    Batches larger than the engine's profile are split into profile-sized calls.
    """

    name = "tensorrt"

    def __init__(self, engine_path: str | Path, *, precision: str, device: str | torch.device = "cuda:0") -> None:
        super().__init__(precision=precision, device=device)
        if self.device.type != "cuda":
            raise BackendUnavailableError(f"TensorRT runs on CUDA devices only, not {self.device}.")
        self.engine_path = Path(engine_path)
        self.session: Any = None

    def open(self) -> None:
        from tucker_export.engines.tensorrt_backend import TrtEngineSession

        if not self.engine_path.is_file():
            raise EngineError(f"Engine file {self.engine_path} does not exist; run `tucker-export build` first.")
        self.session = TrtEngineSession(self.engine_path.read_bytes(), device_index=self.device.index or 0)

    def close(self) -> None:
        if self.session is not None:
            self.session.close()
        self.session = None

    def _infer_torch(self, batch: torch.Tensor) -> torch.Tensor:
        import torch

        from tucker_export.engines.keys import split_batch

        pieces = [
            self.session.infer(batch[start:stop].to(self.device))
            for start, stop in split_batch(int(batch.shape[0]), self.session.profile)
        ]
        out = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        return out.to(batch.device)

    def _infer_numpy(self, batch: np.ndarray) -> np.ndarray:
        import torch

        return self._infer_torch(torch.from_numpy(batch)).cpu().numpy()


# ---- OpenVINO (CPU) -----------------------------------------------------------------------------


class OpenVinoRunner(Runner):
    """OpenVINO on the CPU: a compiled model from the bundle's cache, or compiled from an ONNX file.

    ``source`` is a ``.blob`` written by ``CompiledModel.export_model`` (the caller has checked its
    key against this CPU and OpenVINO), an ONNX file (compiled when the runner opens; fp32/bf16), or
    an already compiled model. Threads default to the physical cores of the process's CPU affinity.
    """

    name = "openvino"

    def __init__(self, source: str | Path | Any, *, precision: str = "fp32", threads: int | None = None) -> None:
        super().__init__(precision=precision, device="cpu")
        self.source = source
        self.threads = threads or physical_cores()
        self.session: Any = None

    def open(self) -> None:
        from tucker_export.engines import openvino_backend as ovb

        source = self.source
        if isinstance(source, (str, Path)):
            path = Path(source)
            if not path.is_file():
                raise EngineError(f"{path} does not exist; run `tucker-export build --backend openvino` or `export` first.")
            if path.suffix == ".onnx":
                if self.precision == "int8":
                    raise EngineError("int8 needs a calibrated model; build it with `tucker-export build --backend openvino --precision int8`.")
                compiled = ovb.compile_model(str(path), self.precision, self.threads, export=False).compiled
            else:
                compiled = ovb.import_compiled(path.read_bytes(), self.precision, self.threads)
        else:
            compiled = source
        self.session = ovb.OpenVinoSession(compiled)

    def close(self) -> None:
        if self.session is not None:
            self.session.close()
        self.session = None

    def _infer_numpy(self, batch: np.ndarray) -> np.ndarray:
        return self.session.infer(batch)

    def _infer_torch(self, batch: torch.Tensor) -> torch.Tensor:
        import torch

        out = self.session.infer(np.ascontiguousarray(batch.detach().cpu().numpy(), dtype=np.float32))
        return torch.from_numpy(out).to(batch.device)

    def describe(self) -> str:
        return f"{self.name} ({self.precision}, cpu, {self.threads} threads)"
