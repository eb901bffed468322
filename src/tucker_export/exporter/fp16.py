"""fp16 ONNX graphs that TensorRT 11 (strongly typed) and ONNX Runtime both run as written.

TensorRT 11 removed the FP16 builder flag: a network is strongly typed and every tensor's type
comes from the ONNX graph. So "fp16" here is a property of the ONNX file, not of the builder:

- convolutions (and transposed convolutions, activations, concatenations) compute in fp16 with
  fp16 weights;
- InstanceNormalization stays in fp32 (its mean/variance over a whole 3D volume loses too much in
  fp16, and nnU-Net's own autocast keeps normalisation in fp32 as well), with its scale and bias
  kept as fp32 initializers, and a Cast on each side;
- the graph input and output stay fp32, so callers feed and read the same arrays as for the fp32
  file.

The conversion itself is onnxconverter-common's maintained ``convert_float_to_float16`` with
``keep_io_types`` and InstanceNormalization in the op block list. Two things are done around it:
initializers shared through ``Identity`` nodes (the TorchScript exporter de-duplicates equal
tensors, e.g. the all-zero biases of a freshly initialised network) are un-shared first, because a
tensor shared by an fp16 Conv and an fp32 InstanceNormalization cannot have one type; and the
result is verified node by node (``verify_fp16_graph``) rather than trusted.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tucker_export.errors import ExportError

if TYPE_CHECKING:
    import onnx

logger = logging.getLogger(__name__)

# Ops computed in fp32 inside the fp16 graph (onnxconverter-common's default block list, ops without
# fp16 kernels, is added to these; none of them occurs in nnU-Net networks).
FP32_OPS: tuple[str, ...] = ("InstanceNormalization",)
FP16_COMPUTE_OPS: tuple[str, ...] = ("Conv", "ConvTranspose")

FLOAT = 1  # onnx.TensorProto.FLOAT
FLOAT16 = 10  # onnx.TensorProto.FLOAT16
_TYPE_NAMES = {FLOAT: "fp32", FLOAT16: "fp16", 11: "fp64", 16: "bf16", 7: "int64", 6: "int32"}


def type_name(elem_type: int | None) -> str:
    if elem_type is None:
        return "unknown"
    return _TYPE_NAMES.get(elem_type, f"type {elem_type}")


def unshare_initializers(model: onnx.ModelProto) -> int:
    """Replace every ``Identity(initializer)`` node by a copy of the initializer under its output name.

    Returns how many nodes were removed. The model is changed in place.
    """
    import onnx

    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    graph_outputs = {out.name for out in graph.output}
    kept: list[onnx.NodeProto] = []
    removed = 0
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in initializers and node.output[0] not in graph_outputs:
            copy = onnx.TensorProto()
            copy.CopyFrom(initializers[node.input[0]])
            copy.name = node.output[0]
            graph.initializer.append(copy)
            removed += 1
        else:
            kept.append(node)
    if removed:
        del graph.node[:]
        graph.node.extend(kept)
        # value_info entries of the removed Identity outputs now describe initializers; drop them
        # so shape inference re-derives every type from scratch.
        del graph.value_info[:]
    return removed


def convert_to_fp16(model: onnx.ModelProto, *, fp32_ops: tuple[str, ...] = FP32_OPS) -> onnx.ModelProto:
    """The fp16 graph of an fp32 model: fp16 compute, ``fp32_ops`` in fp32, fp32 graph inputs/outputs."""
    import onnx
    from onnxconverter_common import float16

    work = onnx.ModelProto()
    work.CopyFrom(model)
    unshare_initializers(work)
    block_list = sorted(set(float16.DEFAULT_OP_BLOCK_LIST) | set(fp32_ops))
    try:
        with warnings.catch_warnings(record=True) as caught:
            # The converter warns once per weight below fp16's range (it stores them as +-1e-7);
            # trained kernels have a few such near-zero values, which is harmless: count, not spam.
            warnings.simplefilter("always")
            converted = float16.convert_float_to_float16(work, keep_io_types=True, op_block_list=block_list)
    except Exception as error:  # the library raises plain Exceptions/ValueErrors with its own wording
        raise ExportError(f"fp16 conversion of the ONNX graph failed in onnxconverter-common ({error}).") from error
    truncated = sum("truncated" in str(w.message) for w in caught)
    if truncated:
        logger.debug("fp16 conversion: %d weight value(s) outside fp16's range were clamped.", truncated)
    for other in (w for w in caught if "truncated" not in str(w.message)):
        warnings.warn_explicit(other.message, other.category, other.filename, other.lineno)
    # The converter leaves stale value_info types behind on some graphs; re-infer from scratch.
    del converted.graph.value_info[:]
    return onnx.shape_inference.infer_shapes(converted, strict_mode=True)


@dataclass
class PrecisionReport:
    """What computes in which type: the evidence that an fp16 graph is the one TensorRT 11 needs."""

    op_types: dict[str, dict[str, int]] = field(default_factory=dict)  # op -> {compute type: count}
    casts: int = 0
    inputs: dict[str, str] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "op_types": self.op_types,
            "casts": self.casts,
            "inputs": self.inputs,
            "outputs": self.outputs,
        }


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    graph = model.graph
    types: dict[str, int] = {}
    for value in [*graph.input, *graph.output, *graph.value_info]:
        if value.type.HasField("tensor_type"):
            types[value.name] = value.type.tensor_type.elem_type
    for init in graph.initializer:
        types[init.name] = init.data_type
    return types


def inspect_precision(model: onnx.ModelProto) -> PrecisionReport:
    """Per op type, how many nodes compute in which type (the type of their first input)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    types = _elem_types(inferred)
    report = PrecisionReport()
    counts: dict[str, Counter[str]] = {}
    for node in inferred.graph.node:
        if node.op_type == "Cast":
            report.casts += 1
            continue
        compute = type_name(types.get(node.input[0])) if node.input else "none"
        counts.setdefault(node.op_type, Counter())[compute] += 1
    report.op_types = {op: dict(sorted(c.items())) for op, c in sorted(counts.items())}
    report.inputs = {v.name: type_name(v.type.tensor_type.elem_type) for v in inferred.graph.input}
    report.outputs = {v.name: type_name(v.type.tensor_type.elem_type) for v in inferred.graph.output}
    return report


def verify_fp16_graph(model: onnx.ModelProto, *, fp32_ops: tuple[str, ...] = FP32_OPS) -> PrecisionReport:
    """Check the fp16 graph node by node; every violation is collected, then one ExportError names them all.

    Rules: Conv/ConvTranspose take fp16 data and fp16 weights; each op in ``fp32_ops`` takes and
    returns fp32 (scale and bias included); graph inputs and outputs are fp32; at least one
    convolution exists (a graph without any would mean the conversion silently did nothing).
    """
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    types = _elem_types(inferred)
    report = inspect_precision(model)
    failures = report.failures
    n_conv = 0
    for node in inferred.graph.node:
        label = f"{node.op_type} {node.name or node.output[0]!r}"
        if node.op_type in FP16_COMPUTE_OPS:
            n_conv += 1
            for role, name in zip(("input", "weight", "bias"), node.input):
                if name and types.get(name) != FLOAT16:
                    failures.append(f"{label} has {type_name(types.get(name))} {role}")
        elif node.op_type in fp32_ops:
            for role, name in zip(("input", "scale", "bias"), node.input):
                if name and types.get(name) != FLOAT:
                    failures.append(f"{label} has {type_name(types.get(name))} {role}")
            for name in node.output:
                if types.get(name) != FLOAT:
                    failures.append(f"{label} returns {type_name(types.get(name))}")
    for kind, values in (("input", report.inputs), ("output", report.outputs)):
        for name, elem in values.items():
            if elem != "fp32":
                failures.append(f"graph {kind} {name!r} is {elem}")
    if n_conv == 0:
        failures.append("the graph has no Conv node")
    if failures:
        shown = "; ".join(failures[:5]) + (f"; and {len(failures) - 5} more" if len(failures) > 5 else "")
        raise ExportError(
            f"The fp16 ONNX graph is not the strongly typed graph TensorRT needs ({len(failures)} problem(s): "
            f"{shown}); report this with the model's plans.json."
        )
    return report
