"""Fold the linear Tucker pieces around nnU-Net's decoder concatenations into fewer, smaller convolutions.

In nnU-Net's decoder every stage computes ``conv(concat(transpconv(x), skip))``. After Tucker
decomposition this is, with nothing non-linear in between::

    transpconv.first (1x1) -> transpconv.core (ConvTranspose) -> transpconv.last (1x1 + bias)
        -> Concat(., skip) -> conv.first (1x1, no bias) -> conv.core (3x3x3) -> ...

``conv.first`` applied to a concatenation is the sum of its column blocks applied to each part, and
a 1x1 convolution after a (transposed) convolution folds into that convolution's weights. So the
chain becomes::

    transpconv.first -> ConvTranspose' (core with last and conv.first's block folded in, + bias)
                                                                     \\
    skip -> Conv (conv.first's skip block, 1x1) ---------------------- Add -> conv.core -> ...

which drops the Concat copy and the full-resolution ``transpconv.last`` and narrows
``conv.first``. The cross-InstanceNorm pairs (one chain's ``last`` and the next chain's
``first``) cannot fold: InstanceNormalization and LeakyReLU sit between them.

The rewrite is exact in real arithmetic; in fp32 it changes summation order only (checked by the
exporter's parity run like every other graph). It applies only where the pattern is unambiguous:
every intermediate result has a single consumer, all weights are initializers, the 1x1
convolutions have unit stride, no padding, no dilation and one group.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import onnx

logger = logging.getLogger(__name__)


def _attributes(node: onnx.NodeProto) -> dict[str, object]:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _is_pointwise_conv(node: onnx.NodeProto, initializers: dict[str, np.ndarray]) -> bool:
    if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in initializers:
        return False
    if len(node.input) > 2 and node.input[2] and node.input[2] not in initializers:
        return False
    attrs = _attributes(node)
    weight = initializers[node.input[1]]
    return (
        all(k == 1 for k in weight.shape[2:])
        and int(attrs.get("group", 1)) == 1
        and all(s == 1 for s in attrs.get("strides", [1]))
        and all(p == 0 for p in attrs.get("pads", [0]))
        and all(d == 1 for d in attrs.get("dilations", [1]))
        and attrs.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET")
    )


def _bias(node: onnx.NodeProto, initializers: dict[str, np.ndarray], channels: int) -> np.ndarray:
    if len(node.input) > 2 and node.input[2]:
        return initializers[node.input[2]].astype(np.float64)
    return np.zeros(channels, dtype=np.float64)


@dataclass
class _GraphIndex:
    """What the rewrite looks up about the graph as it was before any change."""

    initializers: dict[str, np.ndarray]
    producers: dict[str, onnx.NodeProto]
    consumers: dict[str, list[onnx.NodeProto]]
    graph_outputs: set[str]
    channels: dict[str, int]

    def only_consumer(self, name: str, node: onnx.NodeProto) -> bool:
        return name not in self.graph_outputs and [c.name for c in self.consumers.get(name, [])] == [node.name]


@dataclass
class _Rewrite:
    """The changes collected over all Concats; applied to the graph only once every Concat was looked at."""

    removed: set[str] = field(default_factory=set)
    replacements: dict[str, list[onnx.NodeProto]] = field(default_factory=dict)  # replaced node's name -> new nodes
    new_initializers: list[onnx.TensorProto] = field(default_factory=list)


def fuse_concat_pointwise(model: onnx.ModelProto) -> int:
    """Apply the rewrite described in the module docstring in place; returns how many Concats were folded."""
    import onnx

    graph = model.graph
    if any(init.data_type == onnx.TensorProto.FLOAT16 for init in graph.initializer):
        return 0  # fp32 graphs only: the fp16 conversion runs after this rewrite
    if any(not node.name for node in graph.node):
        return 0  # nodes are tracked by name below; the TorchScript exporter names every node
    index = _index_graph(model)
    rewrite = _Rewrite()
    fused = 0
    for concat in graph.node:
        target = _fusion_target(concat, index)
        if target is None:
            continue
        _fuse_concat(concat, target, index, rewrite)
        fused += 1

    if not fused:
        return 0
    _apply_rewrite(graph, rewrite)
    logger.debug("Folded %d decoder concatenation(s) into their neighbouring 1x1 convolutions.", fused)
    return fused


def _index_graph(model: onnx.ModelProto) -> _GraphIndex:
    from onnx import numpy_helper

    graph = model.graph
    initializers = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {v.name for v in graph.output}
    return _GraphIndex(initializers, producers, consumers, graph_outputs, _channel_counts(model))


def _fusion_target(concat: onnx.NodeProto, index: _GraphIndex) -> onnx.NodeProto | None:
    """The 1x1 convolution that alone reads ``concat``'s channel concatenation, where the rewrite applies."""
    if concat.op_type != "Concat" or int(_attributes(concat).get("axis", 0)) != 1:
        return None
    users = index.consumers.get(concat.output[0], [])
    if len(users) != 1 or not _is_pointwise_conv(users[0], index.initializers) or concat.output[0] in index.graph_outputs:
        return None
    if any(name not in index.channels for name in concat.input):
        return None
    return users[0]


def _fuse_concat(concat: onnx.NodeProto, target: onnx.NodeProto, index: _GraphIndex, rewrite: _Rewrite) -> None:
    """Record the replacement of ``concat`` and ``target`` by one term per concatenated part, summed."""
    target_weight = index.initializers[target.input[1]]
    weight = target_weight.astype(np.float64).reshape(target_weight.shape[0], target_weight.shape[1])
    out_channels = weight.shape[0]
    bias = _bias(target, index.initializers, out_channels)
    terms: list[onnx.NodeProto] = []
    offset = 0
    prefix = target.name or target.output[0]
    for part_index, part in enumerate(concat.input):
        block = weight[:, offset : offset + index.channels[part]]
        offset += index.channels[part]
        node, bias = _fold_part(
            part, block, bias, concat, f"{prefix}/fused_{part_index}", target_weight.ndim, index, rewrite
        )
        terms.append(node)
    new_nodes = _sum_terms(terms, bias, prefix, target.output[0], rewrite)
    rewrite.removed.update({concat.name, target.name})
    rewrite.replacements[target.name] = new_nodes


def _fold_part(
    part: str, block: np.ndarray, bias: np.ndarray, concat: onnx.NodeProto, node_name: str, ndim: int,
    index: _GraphIndex, rewrite: _Rewrite,
) -> tuple[onnx.NodeProto, np.ndarray]:
    """The term for one concatenated part, with its producer's 1x1 (and that one's ConvTranspose) folded in.

    Returns the new node and the bias with what the folded layers contribute added.
    """
    producer = index.producers.get(part)
    if producer is not None and index.only_consumer(part, concat) and _is_pointwise_conv(producer, index.initializers):
        inner = index.initializers[producer.input[1]].astype(np.float64)
        inner = inner.reshape(inner.shape[0], inner.shape[1])
        bias = bias + block @ _bias(producer, index.initializers, inner.shape[0])
        block = block @ inner  # (out, producer_in)
        source = producer.input[0]
        rewrite.removed.add(producer.name)
        transposed = index.producers.get(source)
        if transposed is not None and _is_foldable_transpose(transposed, source, producer, index):
            return _fold_into_transpose(transposed, block, bias, node_name, index, rewrite)
    else:
        source = part
    return _pointwise_term(source, block, node_name, ndim, rewrite), bias


def _is_foldable_transpose(
    transposed: onnx.NodeProto, source: str, producer: onnx.NodeProto, index: _GraphIndex
) -> bool:
    return (
        transposed.op_type == "ConvTranspose"
        and index.only_consumer(source, producer)
        and transposed.input[1] in index.initializers
        and int(_attributes(transposed).get("group", 1)) == 1
        and (len(transposed.input) < 3 or not transposed.input[2] or transposed.input[2] in index.initializers)
    )


def _fold_into_transpose(
    transposed: onnx.NodeProto, block: np.ndarray, bias: np.ndarray, node_name: str, index: _GraphIndex,
    rewrite: _Rewrite,
) -> tuple[onnx.NodeProto, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    t_weight = index.initializers[transposed.input[1]].astype(np.float64)  # (in, mid, *k)
    bias = bias + block @ _bias(transposed, index.initializers, t_weight.shape[1])
    folded = np.einsum("om,im...->io...", block, t_weight).astype(np.float32)
    rewrite.removed.add(transposed.name)
    w_name = f"{node_name}.weight"
    rewrite.new_initializers.append(numpy_helper.from_array(folded, w_name))
    attrs = _attributes(transposed)
    node = onnx.helper.make_node(
        "ConvTranspose", [transposed.input[0], w_name], [f"{node_name}_output"], name=node_name, **attrs
    )
    return node, bias


def _pointwise_term(source: str, block: np.ndarray, node_name: str, ndim: int, rewrite: _Rewrite) -> onnx.NodeProto:
    import onnx
    from onnx import numpy_helper

    w_name = f"{node_name}.weight"
    kernel = block.reshape(*block.shape, *([1] * (ndim - 2))).astype(np.float32)
    rewrite.new_initializers.append(numpy_helper.from_array(kernel, w_name))
    return onnx.helper.make_node("Conv", [source, w_name], [f"{node_name}_output"], name=node_name, kernel_shape=list(kernel.shape[2:]))


def _sum_terms(
    terms: list[onnx.NodeProto], bias: np.ndarray, prefix: str, output: str, rewrite: _Rewrite
) -> list[onnx.NodeProto]:
    """The terms and the Adds that sum them into ``output`` (the replaced convolution's output name)."""
    import onnx
    from onnx import numpy_helper

    # the bias rides on the first term; the sum of the terms replaces the target's output
    b_name = f"{prefix}/fused.bias"
    rewrite.new_initializers.append(numpy_helper.from_array(bias.astype(np.float32), b_name))
    terms[0].input.append(b_name)
    outputs = [node.output[0] for node in terms]
    new_nodes = list(terms)
    running = outputs[0]
    for term_index, term_output in enumerate(outputs[1:], start=1):
        is_last = term_index == len(terms) - 1
        add = onnx.helper.make_node(
            "Add", [running, term_output], [output if is_last else f"{prefix}/fused_sum_{term_index}"],
            name=f"{prefix}/fused_add_{term_index}",
        )
        new_nodes.append(add)
        running = add.output[0]
    if len(terms) == 1:
        new_nodes[0].output[0] = output
    return new_nodes


def _apply_rewrite(graph: onnx.GraphProto, rewrite: _Rewrite) -> None:
    """Swap in the new nodes and initializers, drop initializers nothing reads, and stale shape annotations."""
    rebuilt: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.name in rewrite.replacements:
            rebuilt.extend(rewrite.replacements[node.name])
        elif node.name not in rewrite.removed:
            rebuilt.append(node)
    del graph.node[:]
    graph.node.extend(rebuilt)
    graph.initializer.extend(rewrite.new_initializers)
    used = {name for node in graph.node for name in node.input}
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    del graph.value_info[:]


def _channel_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Static channel count (dim 1) of every tensor shape inference can name."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    counts: dict[str, int] = {}
    for value in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if len(dims) > 1 and dims[1].HasField("dim_value"):
            counts[value.name] = int(dims[1].dim_value)
    return counts
