"""ONNX export of bundle networks, checked against PyTorch before anything is recorded.

One file per fold and precision, ``BUNDLE/onnx/fold_<f>.<precision>.onnx``:

- input ``input`` of shape ``(batch, C, *patch)``, float32, with a symbolic batch axis and static
  patch dims (nnU-Net always predicts whole patches; static dims let TensorRT and ONNX Runtime
  pick their kernels once); output ``logits`` of shape ``(batch, K, *patch)``, float32;
- eval mode, deep supervision off (one output), constants folded; in decomposed networks the
  Tucker 1x1 convolutions around each decoder concatenation are folded together
  (``onnx_fusion``: about 5% less time per patch in ONNX Runtime at 64^3);
- ``onnx.checker`` full check and strict shape inference pass, and the declared input/output
  shapes are checked against the bundle's model description;
- ``fp16``: see ``tucker_export.exporter.fp16`` (fp16 convolutions, fp32 InstanceNormalization,
  fp32 graph inputs/outputs; the graph is verified node by node);
- every file is run in ONNX Runtime (CPU) on a seeded input and compared with the PyTorch fp32
  network; the figures go into ``bundle.json`` under ``onnx``.

Exporter: ``torch.onnx.export(..., dynamo=False)``, the TorchScript exporter. torch 2.9+ defaults
to the dynamo exporter, which needs ``onnxscript`` (not a dependency of this project, and absent
from its environment); the TorchScript exporter emits one ``InstanceNormalization`` node per
nnU-Net norm layer (what TensorRT's parser maps to its normalization layer and what the fp16 pass
keeps in fp32) and takes ``dynamic_axes`` for the batch axis. It is deprecated upstream: when a
torch release drops it, ``export`` fails with a one-sentence ExportError saying so.

Validation follows optimum's pattern: every fold and precision is exported and measured, every
out-of-tolerance figure is collected, and one ExportError lists them all at the end (the files
and their figures stay in the bundle, marked ``"passed": false``, so they can be inspected).
"""

from __future__ import annotations

import io
import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tucker_export._io import sha256_file, write_bytes_atomic
from tucker_export.bundle import ONNX_SECTION, onnx_key
from tucker_export.errors import ConfigurationError, ExportError
from tucker_export.exporter.rebuild import build_network

if TYPE_CHECKING:
    import onnx
    import torch

    from tucker_export.bundle import Bundle
    from tucker_export.nnunet.loading import Fold

logger = logging.getLogger(__name__)

PRECISIONS: tuple[str, ...] = ("fp32", "fp16")
DEFAULT_OPSET = 17
MIN_OPSET = 13  # InstanceNormalization and Conv are stable from here; older opsets are not tested
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
BATCH_AXIS = "batch"
EXPORTER = "torch.onnx TorchScript exporter (dynamo=False)"


@dataclass(frozen=True)
class ParityTolerance:
    """Limits an exported file must meet against PyTorch fp32 (``None`` disables a limit)."""

    max_abs_diff: float | None
    min_argmax_agreement: float | None


# fp32: ONNX Runtime vs PyTorch differ by summation order only. fp16: logits move by ~1e-2, so
# the check is on the segmentation (argmax), which is what the user gets.
DEFAULT_TOLERANCES: dict[str, ParityTolerance] = {
    "fp32": ParityTolerance(max_abs_diff=1e-3, min_argmax_agreement=0.999),
    "fp16": ParityTolerance(max_abs_diff=None, min_argmax_agreement=0.999),
}


@dataclass
class Parity:
    max_abs_diff: float
    mean_abs_diff: float
    argmax_agreement: float
    batch: int
    seed: int
    reference: str = "PyTorch fp32, CPU"
    runtime: str = "ONNX Runtime, CPUExecutionProvider"
    tolerance: dict[str, float | None] = field(default_factory=dict)
    passed: bool = True
    failures: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ExportRecord:
    """One exported file: what ``bundle.json`` records under ``onnx[key]``."""

    key: str
    fold: Fold
    precision: str
    file: str
    sha256: str
    opset: int
    input_name: str
    input_shape: list[int | str]
    output_name: str
    output_shape: list[int | str]
    max_batch: int
    parity: Parity
    graph: dict[str, Any]
    seconds: float
    size_bytes: int = 0
    weights_sha256: str | None = None

    def to_manifest(self) -> dict[str, Any]:
        from tucker_export.bundle import utc_now

        return {
            "file": self.file,
            "sha256": self.sha256,
            "fold": self.fold,
            "precision": self.precision,
            "opset": self.opset,
            "exporter": EXPORTER,
            "versions": _versions(),
            "input": {"name": self.input_name, "shape": self.input_shape, "dtype": "float32"},
            "output": {"name": self.output_name, "shape": self.output_shape, "dtype": "float32"},
            "max_batch": self.max_batch,
            "size_bytes": self.size_bytes,
            "weights_sha256": self.weights_sha256,
            "graph": self.graph,
            "parity": self.parity.to_dict(),
            "seconds": round(self.seconds, 2),
            "exported": utc_now(),
        }


def onnx_relpath(fold: Fold, precision: str) -> str:
    return f"onnx/fold_{fold}.{precision}.onnx"


def _versions() -> dict[str, str]:
    from tucker_export._env import package_versions

    return package_versions(("torch", "onnx", "onnxruntime", "onnxconverter-common"))


# ---- option checks ------------------------------------------------------------------------------


def normalize_precisions(precisions: Sequence[str] | str) -> tuple[str, ...]:
    """``"fp32,fp16"``, ``["fp16", "fp32"]`` -> ``("fp32", "fp16")``; unknown names are refused."""
    if isinstance(precisions, str):
        precisions = [precisions]
    parts = [p.strip().lower() for value in precisions for p in value.replace(",", " ").split()]
    unknown = [p for p in parts if p not in PRECISIONS]
    if unknown or not parts:
        raise ConfigurationError(
            f"Precision {', '.join(unknown) or '(none)'} is not supported; choose from {', '.join(PRECISIONS)}."
        )
    return tuple(p for p in PRECISIONS if p in parts)


def check_export_options(opset: int, max_batch: int, parity_batch: int) -> None:
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise ConfigurationError(f"Opset {opset} is outside the supported range {MIN_OPSET}..{newest}.", option="opset",
                                 use="17")
    if max_batch < 1:
        raise ConfigurationError(f"The largest exported batch must be at least 1, got {max_batch}.", option="max_batch")
    if parity_batch < 1:
        raise ConfigurationError(f"The parity batch must be at least 1, got {parity_batch}.")


# ---- export of one network ----------------------------------------------------------------------


def _disable_deep_supervision(network: torch.nn.Module) -> None:
    decoder = getattr(network, "decoder", None)
    if decoder is not None and getattr(decoder, "deep_supervision", False):
        # nnU-Net networks return a list of outputs with deep supervision; export needs one.
        logger.debug("Turning deep supervision off for export.")
        decoder.deep_supervision = False


def export_torch_to_onnx(
    network: torch.nn.Module,
    *,
    num_input_channels: int,
    patch_size: Sequence[int],
    opset: int = DEFAULT_OPSET,
    trace_batch: int = 2,
    fuse: bool = True,
) -> onnx.ModelProto:
    """Trace ``network`` (eval mode, CPU, deep supervision off) into an fp32 ONNX model in memory.

    ``trace_batch`` is 2 so that nothing batch-1-specific can be baked into the trace; the batch
    axis is symbolic in the result either way. ``fuse`` folds the Tucker 1x1 convolutions around
    the decoder's concatenations (``onnx_fusion``; a no-op on undecomposed networks).
    """
    import onnx
    import torch

    from tucker_export.exporter.fp16 import unshare_initializers

    network = network.eval().cpu()
    _disable_deep_supervision(network)
    example = torch.zeros((trace_batch, num_input_channels, *patch_size), dtype=torch.float32)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # Expected and harmless here: the legacy-exporter deprecation notice, and the tracer's
        # note on InstanceNorm's channel-count check (channels are static in nnU-Net networks).
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        # InstanceNorm without running stats always normalises with the input's statistics, which
        # the exporter calls "train=True"; that is exactly eval-mode behaviour for nnU-Net.
        warnings.filterwarnings("ignore", message=".*operator 'instance_norm' is set to train=True.*")
        try:
            torch.onnx.export(
                network,
                (example,),
                buffer,
                dynamo=False,
                export_params=True,
                opset_version=opset,
                do_constant_folding=True,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: BATCH_AXIS}, OUTPUT_NAME: {0: BATCH_AXIS}},
            )
        except TypeError as error:
            if "dynamo" in str(error):
                raise ExportError(
                    f"This torch ({torch.__version__}) has no TorchScript ONNX exporter (dynamo=False); "
                    f"install torch < 2.16 or report it so the dynamo exporter can be enabled."
                ) from error
            raise ExportError(f"torch.onnx.export failed ({error}).") from error
        except Exception as error:  # torch raises many types (OnnxExporterError, RuntimeError, ...)
            raise ExportError(f"torch.onnx.export failed ({type(error).__name__}: {error}).") from error
    model = onnx.load_from_string(buffer.getvalue())
    # The exporter de-duplicates equal parameters into Identity nodes; undo that so every layer
    # owns its weights (required for the fp16 pass and clearer in TensorRT's layer names).
    unshare_initializers(model)
    if fuse:
        from tucker_export.exporter.onnx_fusion import fuse_concat_pointwise

        fuse_concat_pointwise(model)
    model.graph.name = "nnunet"
    return model


def check_onnx_model(
    model: onnx.ModelProto,
    *,
    num_input_channels: int,
    num_classes: int,
    patch_size: Sequence[int],
) -> onnx.ModelProto:
    """Full checker, strict shape inference, and the declared input/output signature; returns the inferred model.

    Every mismatch is collected before one ExportError is raised.
    """
    import onnx

    try:
        onnx.checker.check_model(model, full_check=True)
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ExportError(f"The exported ONNX graph fails onnx.checker ({first}).") from error

    failures: list[str] = []
    expected = {
        INPUT_NAME: [BATCH_AXIS, num_input_channels, *patch_size],
        OUTPUT_NAME: [BATCH_AXIS, num_classes, *patch_size],
    }
    for kind, values in (("input", inferred.graph.input), ("output", inferred.graph.output)):
        if len(values) != 1:
            failures.append(f"{len(values)} graph {kind}s instead of 1 ({', '.join(v.name for v in values)})")
            continue
        value = values[0]
        shape = value_shape(value)
        want = expected.get(value.name)
        if want is None:
            failures.append(f"graph {kind} is named {value.name!r}")
        elif shape != want:
            failures.append(f"graph {kind} {value.name!r} has shape {shape}, expected {want}")
        if value.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
            failures.append(f"graph {kind} {value.name!r} is not float32")
    if failures:
        raise ExportError(f"The exported ONNX graph has the wrong signature: {'; '.join(failures)}.")
    return inferred


def value_shape(value: onnx.ValueInfoProto) -> list[int | str]:
    """A graph value's shape as ints and symbolic names ('?' for an unnamed dynamic dim)."""
    dims: list[int | str] = []
    for dim in value.type.tensor_type.shape.dim:
        if dim.HasField("dim_value"):
            dims.append(int(dim.dim_value))
        else:
            dims.append(dim.dim_param or "?")
    return dims


def graph_summary(model: onnx.ModelProto) -> dict[str, Any]:
    from collections import Counter

    ops = Counter(node.op_type for node in model.graph.node)
    return {"nodes": len(model.graph.node), "op_types": dict(sorted(ops.items()))}


def seeded_input(batch: int, num_input_channels: int, patch_size: Sequence[int], seed: int) -> np.ndarray:
    """Standard-normal input, like nnU-Net's z-scored CT intensities; the same seed gives the same array."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, num_input_channels, *patch_size), dtype=np.float32)


def torch_reference(network: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    import torch

    from tucker_export.runtimes import torch_callable

    network = network.eval().cpu()
    _disable_deep_supervision(network)
    return torch_callable(network, "cpu")(torch.from_numpy(x)).float().numpy()


def run_onnxruntime_cpu(model: str | Path | bytes, x: np.ndarray) -> np.ndarray:
    """One CPU ONNX Runtime session with the runner's defaults, so parity is checked on the shipped path."""
    from tucker_export.runtimes import ort_session

    return ort_session(model).run([OUTPUT_NAME], {INPUT_NAME: x})[0]


def compare_logits(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """max/mean absolute difference of logits, and the fraction of voxels with the same argmax class."""
    if reference.shape != candidate.shape:
        raise ExportError(f"ONNX output shape {candidate.shape} differs from PyTorch's {reference.shape}.")
    diff = np.abs(reference.astype(np.float32) - candidate.astype(np.float32))
    agreement = float(np.mean(reference.argmax(axis=1) == candidate.argmax(axis=1)))
    return {
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "argmax_agreement": agreement,
    }


def judge_parity(
    figures: dict[str, float], tolerance: ParityTolerance, *, label: str, batch: int, seed: int
) -> Parity:
    failures: list[str] = []
    if tolerance.max_abs_diff is not None and not figures["max_abs_diff"] <= tolerance.max_abs_diff:
        failures.append(
            f"{label}: max abs logit diff {figures['max_abs_diff']:.3g} > {tolerance.max_abs_diff:g}"
        )
    if tolerance.min_argmax_agreement is not None and not figures["argmax_agreement"] >= tolerance.min_argmax_agreement:
        failures.append(
            f"{label}: argmax agreement {100 * figures['argmax_agreement']:.3f}% < "
            f"{100 * tolerance.min_argmax_agreement:.1f}%"
        )
    return Parity(
        max_abs_diff=figures["max_abs_diff"],
        mean_abs_diff=figures["mean_abs_diff"],
        argmax_agreement=figures["argmax_agreement"],
        batch=batch,
        seed=seed,
        tolerance=asdict(tolerance),
        passed=not failures,
        failures=failures,
    )


@dataclass
class NetworkExport:
    """The files of one network, in memory and measured, before they are written anywhere."""

    precision: str
    model_bytes: bytes
    input_shape: list[int | str]
    output_shape: list[int | str]
    parity: Parity
    graph: dict[str, Any]
    seconds: float


def export_network(
    network: torch.nn.Module,
    *,
    num_input_channels: int,
    num_classes: int,
    patch_size: Sequence[int],
    precisions: Sequence[str] = ("fp32",),
    opset: int = DEFAULT_OPSET,
    parity_batch: int = 2,
    seed: int = 0,
    tolerances: dict[str, ParityTolerance] | None = None,
    label: str = "network",
) -> list[NetworkExport]:
    """Export one network at each precision, check each graph, and measure each against PyTorch fp32.

    Nothing is written; ``export_bundle`` writes and records. Out-of-tolerance figures are
    returned in ``parity.failures`` (not raised) so that a caller can collect them across folds.
    """
    from tucker_export.exporter.fp16 import convert_to_fp16, verify_fp16_graph

    precisions = normalize_precisions(precisions)
    tolerances = {**DEFAULT_TOLERANCES, **(tolerances or {})}
    started = time.perf_counter()
    fp32_model = export_torch_to_onnx(network, num_input_channels=num_input_channels, patch_size=patch_size, opset=opset)
    export_seconds = time.perf_counter() - started
    x = seeded_input(parity_batch, num_input_channels, patch_size, seed)
    reference = torch_reference(network, x)

    results: list[NetworkExport] = []
    for precision in precisions:
        started = time.perf_counter()
        if precision == "fp32":
            model = fp32_model
            graph = graph_summary(model)
        else:
            model = convert_to_fp16(fp32_model)
            graph = {**graph_summary(model), "precision": verify_fp16_graph(model).to_dict()}
        inferred = check_onnx_model(model, num_input_channels=num_input_channels, num_classes=num_classes, patch_size=patch_size)
        model_bytes = model.SerializeToString()
        candidate = run_onnxruntime_cpu(model_bytes, x)
        figures = compare_logits(reference, candidate)
        parity = judge_parity(figures, tolerances[precision], label=f"{label} {precision}", batch=parity_batch, seed=seed)
        logger.info(
            "%s %s: max |diff| %.2e, mean |diff| %.2e, argmax agreement %.4f%% (batch %d)%s",
            label, precision, figures["max_abs_diff"], figures["mean_abs_diff"], 100 * figures["argmax_agreement"],
            parity_batch, "" if parity.passed else " - OUT OF TOLERANCE",
        )
        results.append(
            NetworkExport(
                precision=precision,
                model_bytes=model_bytes,
                input_shape=value_shape(inferred.graph.input[0]),
                output_shape=value_shape(inferred.graph.output[0]),
                parity=parity,
                graph=graph,
                seconds=time.perf_counter() - started + (export_seconds if precision == precisions[0] else 0.0),
            )
        )
    return results


# ---- bundles ------------------------------------------------------------------------------------


def export_bundle(
    bundle_or_path: Bundle | str | Path,
    *,
    precisions: Sequence[str] | str = ("fp32",),
    opset: int = DEFAULT_OPSET,
    max_batch: int = 4,
    folds: Sequence[Fold] | None = None,
    progress: bool = True,
    parity_batch: int = 2,
    seed: int = 0,
    tolerances: dict[str, ParityTolerance] | None = None,
) -> list[ExportRecord]:
    """Write ``onnx/fold_<f>.<precision>.onnx`` for each fold and precision and record them in ``bundle.json``.

    ``max_batch`` is recorded with each file as the largest batch it is meant for (``build`` uses
    it as the default top of the TensorRT batch profile); the batch axis itself is dynamic. Parity
    is measured at ``min(parity_batch, max_batch)`` samples, each a different seeded input, so a
    graph that mixed samples across the batch axis would fail.

    Raises ExportError once, after every file is written and recorded, if any figure is out of
    tolerance; the message lists every failure.
    """
    from tqdm.auto import tqdm

    from tucker_export.bundle import Bundle

    bundle = bundle_or_path if isinstance(bundle_or_path, Bundle) else Bundle.load(bundle_or_path)
    precisions = normalize_precisions(precisions)
    check_export_options(opset, max_batch, parity_batch)
    selected = bundle.resolve_folds(list(folds) if folds else None)
    batch = min(parity_batch, max_batch)

    records: list[ExportRecord] = []
    failures: list[str] = []
    for fold in tqdm(selected, desc="export", unit="fold", disable=not progress):
        network = build_network(bundle, fold)
        weights_sha = bundle.fold_entry(fold).get("weights", {}).get("sha256")
        exports = export_network(
            network,
            num_input_channels=bundle.num_input_channels,
            num_classes=bundle.num_segmentation_heads,
            patch_size=bundle.patch_size,
            precisions=precisions,
            opset=opset,
            parity_batch=batch,
            seed=seed,
            tolerances=tolerances,
            label=f"fold {fold}",
        )
        for result in exports:
            relative = onnx_relpath(fold, result.precision)
            target = bundle.artifact_path(relative)
            write_bytes_atomic(target, result.model_bytes)
            record = ExportRecord(
                key=onnx_key(fold, result.precision),
                fold=fold,
                precision=result.precision,
                file=relative,
                sha256=sha256_file(target),
                opset=opset,
                input_name=INPUT_NAME,
                input_shape=result.input_shape,
                output_name=OUTPUT_NAME,
                output_shape=result.output_shape,
                max_batch=max_batch,
                parity=result.parity,
                graph=result.graph,
                seconds=result.seconds,
                size_bytes=len(result.model_bytes),
                weights_sha256=weights_sha,
            )
            bundle.record(ONNX_SECTION, record.key, record.to_manifest())
            records.append(record)
            failures.extend(result.parity.failures)
    if failures:
        raise ExportError(
            f"{len(failures)} exported file(s) are out of tolerance against PyTorch ({'; '.join(failures)}); "
            f"the files are kept and marked \"passed\": false in {bundle.path / 'bundle.json'}."
        )
    return records


def format_export_table(records: Sequence[ExportRecord]) -> str:
    """A short table for the CLI: one row per file."""
    header = f"{'file':<28} {'max|diff|':>10} {'mean|diff|':>11} {'argmax':>9} {'batch':>5} {'MB':>7}  ok"
    lines = [header]
    for record in records:
        p = record.parity
        lines.append(
            f"{record.file:<28} {p.max_abs_diff:>10.2e} {p.mean_abs_diff:>11.2e} {100 * p.argmax_agreement:>8.3f}% "
            f"{p.batch:>5} {record.size_bytes / 1e6:>7.1f}  {'yes' if p.passed else 'NO'}"
        )
    return "\n".join(lines)
