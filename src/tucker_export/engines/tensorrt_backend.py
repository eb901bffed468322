"""The one module that imports ``tensorrt``: build, serialize, deserialize and execute engines.

Everything here is a thin call into TensorRT's documented Python API; the decisions (engine keys,
batch profiles, which engine fits, what to record) live in ``keys`` and ``build`` as plain code.

TensorRT 10.x and 11.x are told apart by what the installed module offers, not by guessing from
the version string:

- 11.x removed ``BuilderFlag.FP16`` (weak typing): every network is strongly typed and the
  precision is the ONNX graph's, which is why ``export --precision fp16`` writes an fp16 graph.
  ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` is required for that on 10.x and accepted
  (ignored) on 11.x, so it is set whenever the member exists; the FP16 builder flag is never set.
- ``NetworkDefinitionCreationFlag.EXPLICIT_BATCH`` is deprecated and ignored since 10.0 (and gone
  in 11.x): never set.
- ``BuilderFlag.TF32`` is cleared when it exists, so fp32 engines compute in true fp32 (the
  numbers ``validate`` compares against PyTorch's fp32).
- Engines run through the name-based tensor API of 10.x/11.x: ``set_input_shape``,
  ``set_tensor_address``, ``execute_async_v3`` on torch's current CUDA stream, with torch tensors
  as device buffers (no pycuda / cuda-python dependency).

None of this has run here: this project's CI machines have no GPU and TensorRT cannot be
installed on them. The tests that exercise it are marked ``tensorrt`` and skip without it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tucker_export.engines.keys import BatchProfile
from tucker_export.errors import BackendUnavailableError, EngineError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

MIN_MAJOR = 10


def import_tensorrt() -> Any:
    """``import tensorrt``, or one sentence saying why it cannot be used."""
    try:
        import tensorrt as trt
    except ImportError:
        raise BackendUnavailableError(
            "TensorRT is not installed; install the tensorrt Python package (10.x or 11.x) on a machine with "
            "an NVIDIA GPU."
        ) from None
    except OSError as error:  # the wheel is there but its CUDA libraries are not loadable
        raise BackendUnavailableError(f"TensorRT is installed but its libraries cannot be loaded ({error}).") from None
    return trt


# ---- API detection ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrtApi:
    """Which members the installed TensorRT module has; decides how a network is built."""

    version: str
    major: int
    strongly_typed_flag: bool
    explicit_batch_flag: bool
    fp16_builder_flag: bool
    tf32_flag: bool
    memory_pool_limit: bool
    v3_execution: bool
    parser_node_names: bool

    @property
    def family(self) -> str:
        return f"{self.major}.x"

    def to_dict(self) -> dict[str, Any]:
        return {"api": self.family, "strongly_typed_flag": self.strongly_typed_flag, "fp16_builder_flag": self.fp16_builder_flag}


def detect_api(trt: Any) -> TrtApi:
    """Inspect the module for the members that differ between TensorRT 10.x and 11.x."""
    version = str(getattr(trt, "__version__", "0"))
    try:
        major = int(version.split(".")[0])
    except ValueError:
        major = 0
    creation = getattr(trt, "NetworkDefinitionCreationFlag", None)
    builder_flag = getattr(trt, "BuilderFlag", None)
    context = getattr(trt, "IExecutionContext", None)
    config = getattr(trt, "IBuilderConfig", None)
    parser_error = getattr(trt, "ParserError", None)
    return TrtApi(
        version=version,
        major=major,
        strongly_typed_flag=hasattr(creation, "STRONGLY_TYPED"),
        explicit_batch_flag=hasattr(creation, "EXPLICIT_BATCH"),
        fp16_builder_flag=hasattr(builder_flag, "FP16"),
        tf32_flag=hasattr(builder_flag, "TF32"),
        memory_pool_limit=hasattr(config, "set_memory_pool_limit"),
        v3_execution=hasattr(context, "execute_async_v3") and hasattr(context, "set_tensor_address"),
        parser_node_names=hasattr(parser_error, "node_name"),
    )


@dataclass(frozen=True)
class BuildSettings:
    """Network creation flags and builder flags (by member name) for one precision."""

    network_flags: tuple[str, ...]
    set_flags: tuple[str, ...]
    clear_flags: tuple[str, ...]
    tf32: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_build_settings(api: TrtApi, precision: str) -> BuildSettings:
    """The flags for ``precision`` on this TensorRT; plain logic over ``TrtApi``, tested without TensorRT."""
    if api.major < MIN_MAJOR:
        raise BackendUnavailableError(
            f"TensorRT {api.version} is too old; tucker-export builds engines with TensorRT 10.x or 11.x."
        )
    missing = [name for name, ok in (("set_memory_pool_limit", api.memory_pool_limit),
                                     ("execute_async_v3/set_tensor_address", api.v3_execution)) if not ok]
    if missing:
        raise BackendUnavailableError(
            f"TensorRT {api.version} lacks {', '.join(missing)}, which tucker-export needs; install TensorRT 10.x or 11.x."
        )
    if precision not in ("fp32", "fp16"):
        raise EngineError(f"Precision {precision!r} cannot be built; choose fp32 or fp16.")
    # Strong typing makes the engine compute in the ONNX graph's types on both 10.x and 11.x.
    network_flags = ("STRONGLY_TYPED",) if api.strongly_typed_flag else ()
    if not network_flags and api.major < 11:
        raise BackendUnavailableError(
            f"TensorRT {api.version} has no strongly typed networks; install TensorRT 10.x or 11.x."
        )
    clear_flags = ("TF32",) if api.tf32_flag else ()
    return BuildSettings(network_flags=network_flags, set_flags=(), clear_flags=clear_flags, tf32=False)


# ---- error reporting ----------------------------------------------------------------------------


def onnx_node_table(onnx_path: str | Path) -> list[tuple[str, str]]:
    """(name, op_type) per ONNX node in graph order, to name the node a parser error points at."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return [(node.name or (node.output[0] if node.output else f"#{i}"), node.op_type) for i, node in enumerate(model.graph.node)]


def describe_parser_error(
    *, index: int, node_name: str | None, operator: str | None, desc: str, nodes: list[tuple[str, str]]
) -> str:
    """``ONNX node '/x/conv/Conv' (Conv): <TensorRT's description>``; the node from the parser or by index."""
    if not node_name and 0 <= index < len(nodes):
        node_name, operator = nodes[index][0], operator or nodes[index][1]
    if node_name:
        return f"ONNX node {node_name!r} ({operator or 'unknown op'}): {desc.strip()}"
    return f"the ONNX graph: {desc.strip()}"


def nodes_named_in(messages: list[str], node_names: list[str]) -> list[str]:
    """ONNX node names that appear in TensorRT log messages (its layer names are the ONNX node names).

    Longer names first, so '/a/conv/Conv_1' wins over '/a/conv/Conv'; each name once, in message order.
    """
    found: list[str] = []
    candidates = sorted({n for n in node_names if n}, key=len, reverse=True)
    for message in messages:
        taken = message
        for name in candidates:
            if name in taken:
                if name not in found:
                    found.append(name)
                taken = taken.replace(name, "")
    return found


def _make_logger(trt: Any) -> Any:
    """A TensorRT ILogger that keeps errors and warnings and forwards them to Python logging."""

    class _Collecting(trt.ILogger):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.errors.append(msg)
                logger.debug("TensorRT error: %s", msg)
            elif severity == trt.ILogger.Severity.WARNING:
                logger.debug("TensorRT warning: %s", msg)

    return _Collecting()


# ---- build --------------------------------------------------------------------------------------


@dataclass
class BuiltEngine:
    engine: bytes
    timing_cache: bytes
    api: TrtApi
    settings: BuildSettings
    seconds: float
    warnings: list[str] = field(default_factory=list)


def build_serialized_engine(
    onnx_path: str | Path,
    *,
    precision: str,
    input_name: str,
    sample_shape: tuple[int, ...],
    profile: BatchProfile,
    workspace_gib: float,
    timing_cache: bytes | None,
    device_index: int,
) -> BuiltEngine:
    """Parse ``onnx_path`` and build a serialized engine for one batch profile on CUDA device ``device_index``.

    ``timing_cache`` is the previous cache of this GPU kind (or None); the updated cache comes
    back in ``BuiltEngine.timing_cache`` for the caller to save.
    """
    import torch

    trt = import_tensorrt()
    api = detect_api(trt)
    settings = plan_build_settings(api, precision)
    trt_logger = _make_logger(trt)
    nodes = onnx_node_table(onnx_path)
    started = time.perf_counter()
    with torch.cuda.device(device_index):
        builder = trt.Builder(trt_logger)
        flags = 0
        for name in settings.network_flags:
            flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, name))
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, trt_logger)
        if not parser.parse_from_file(str(onnx_path)):
            problems = []
            for i in range(parser.num_errors):
                error = parser.get_error(i)
                problems.append(
                    describe_parser_error(
                        index=int(error.node()),
                        node_name=error.node_name() if api.parser_node_names else None,
                        operator=error.node_operator() if hasattr(error, "node_operator") else None,
                        desc=str(error.desc()),
                        nodes=nodes,
                    )
                )
            raise EngineError(
                f"TensorRT {api.version} cannot parse {onnx_path}: {'; '.join(problems) or 'no detail given'}."
            )

        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
        for name in settings.set_flags:
            config.set_flag(getattr(trt.BuilderFlag, name))
        for name in settings.clear_flags:
            config.clear_flag(getattr(trt.BuilderFlag, name))
        optimization_profile = builder.create_optimization_profile()
        optimization_profile.set_shape(input_name, *profile.shapes(sample_shape))
        config.add_optimization_profile(optimization_profile)
        cache = config.create_timing_cache(timing_cache or b"")
        if not config.set_timing_cache(cache, ignore_mismatch=False):
            logger.warning("The saved timing cache does not fit this GPU or TensorRT; starting a new one.")
            config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)

        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            named = nodes_named_in(trt_logger.errors, [n for n, _ in nodes])
            where = f" at ONNX node {named[0]!r}" if named else ""
            detail = trt_logger.errors[-1].strip() if trt_logger.errors else "no detail given"
            raise EngineError(f"TensorRT {api.version} could not build an engine from {onnx_path}{where}: {detail}.")
        engine_bytes = bytes(serialized)
        cache_bytes = bytes(config.get_timing_cache().serialize())
    return BuiltEngine(engine_bytes, cache_bytes, api, settings, time.perf_counter() - started)


# ---- execution ----------------------------------------------------------------------------------


class TrtEngineSession:
    """A deserialized engine and one execution context on one CUDA device; torch tensors in and out."""

    def __init__(self, engine_bytes: bytes, *, device_index: int) -> None:
        import torch

        trt = import_tensorrt()
        self._trt = trt
        self.device = torch.device("cuda", device_index)
        self._logger = _make_logger(trt)
        with torch.cuda.device(device_index):
            self._runtime = trt.Runtime(self._logger)
            self._engine = self._runtime.deserialize_cuda_engine(engine_bytes)
            if self._engine is None:
                detail = self._logger.errors[-1] if self._logger.errors else "no detail given"
                raise EngineError(f"TensorRT cannot load the engine ({detail}); rebuild it with `tucker-export build`.")
            self._context = self._engine.create_execution_context()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        inputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if len(inputs) != 1 or len(outputs) != 1:
            raise EngineError(f"The engine has inputs {inputs} and outputs {outputs}; expected one of each.")
        self.input_name, self.output_name = inputs[0], outputs[0]
        for name in (self.input_name, self.output_name):
            if self._engine.get_tensor_dtype(name) != trt.DataType.FLOAT:
                raise EngineError(f"Engine tensor {name!r} is {self._engine.get_tensor_dtype(name)}, expected float32.")
        low, opt, high = self._engine.get_tensor_profile_shape(self.input_name, 0)
        self.profile = BatchProfile(int(low[0]), int(opt[0]), int(high[0]))

    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        """Logits of a float32 CUDA batch (its size within the profile), enqueued on torch's current stream."""
        import torch

        self.profile.check_batch(int(batch.shape[0]))
        batch = batch.to(self.device, torch.float32).contiguous()
        if not self._context.set_input_shape(self.input_name, tuple(batch.shape)):
            raise EngineError(f"The engine refuses input shape {tuple(batch.shape)}.")
        out_shape = tuple(self._context.get_tensor_shape(self.output_name))
        output = torch.empty(out_shape, dtype=torch.float32, device=self.device)
        self._context.set_tensor_address(self.input_name, batch.data_ptr())
        self._context.set_tensor_address(self.output_name, output.data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not self._context.execute_async_v3(stream.cuda_stream):
            detail = self._logger.errors[-1] if self._logger.errors else "no detail given"
            raise EngineError(f"TensorRT execution failed ({detail}).")
        return output

    def close(self) -> None:
        # Release in dependency order: context, engine, runtime.
        for name in ("_context", "_engine", "_runtime"):
            if hasattr(self, name):
                delattr(self, name)
