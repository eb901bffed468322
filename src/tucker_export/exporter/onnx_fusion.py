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


def fuse_concat_pointwise(model: onnx.ModelProto) -> int:
    """Apply the rewrite described in the module docstring in place; returns how many Concats were folded."""
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    if any(init.data_type == onnx.TensorProto.FLOAT16 for init in graph.initializer):
        return 0  # fp32 graphs only: the fp16 conversion runs after this rewrite
    if any(not node.name for node in graph.node):
        return 0  # nodes are tracked by name below; the TorchScript exporter names every node
    initializers = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {v.name for v in graph.output}

    def only_consumer(name: str, node: onnx.NodeProto) -> bool:
        return name not in graph_outputs and [c.name for c in consumers.get(name, [])] == [node.name]

    channels = _channel_counts(model)
    removed: set[str] = set()
    replacements: dict[str, list[onnx.NodeProto]] = {}  # name of the node they replace -> new nodes
    new_initializers: list[onnx.TensorProto] = []
    fused = 0
    for concat in graph.node:
        if concat.op_type != "Concat" or int(_attributes(concat).get("axis", 0)) != 1:
            continue
        users = consumers.get(concat.output[0], [])
        if len(users) != 1 or not _is_pointwise_conv(users[0], initializers) or concat.output[0] in graph_outputs:
            continue
        target = users[0]
        if any(name not in channels for name in concat.input):
            continue
        target_weight = initializers[target.input[1]]
        weight = target_weight.astype(np.float64).reshape(target_weight.shape[0], target_weight.shape[1])
        out_channels = weight.shape[0]
        bias = _bias(target, initializers, out_channels)
        terms: list[tuple[onnx.NodeProto, str]] = []  # (new node, its output)
        offset = 0
        prefix = target.name or target.output[0]
        for index, part in enumerate(concat.input):
            block = weight[:, offset : offset + channels[part]]
            offset += channels[part]
            producer = producers.get(part)
            node_name = f"{prefix}/fused_{index}"
            if producer is not None and only_consumer(part, concat) and _is_pointwise_conv(producer, initializers):
                inner = initializers[producer.input[1]].astype(np.float64)
                inner = inner.reshape(inner.shape[0], inner.shape[1])
                bias = bias + block @ _bias(producer, initializers, inner.shape[0])
                block = block @ inner  # (out, producer_in)
                source = producer.input[0]
                removed.add(producer.name)
                transposed = producers.get(source)
                if (
                    transposed is not None
                    and transposed.op_type == "ConvTranspose"
                    and only_consumer(source, producer)
                    and transposed.input[1] in initializers
                    and int(_attributes(transposed).get("group", 1)) == 1
                    and (len(transposed.input) < 3 or not transposed.input[2] or transposed.input[2] in initializers)
                ):
                    t_weight = initializers[transposed.input[1]].astype(np.float64)  # (in, mid, *k)
                    bias = bias + block @ _bias(transposed, initializers, t_weight.shape[1])
                    folded = np.einsum("om,im...->io...", block, t_weight).astype(np.float32)
                    removed.add(transposed.name)
                    w_name = f"{node_name}.weight"
                    new_initializers.append(numpy_helper.from_array(folded, w_name))
                    attrs = _attributes(transposed)
                    node = onnx.helper.make_node(
                        "ConvTranspose", [transposed.input[0], w_name], [f"{node_name}_output"], name=node_name, **attrs
                    )
                    terms.append((node, node.output[0]))
                    continue
            else:
                source = part
            w_name = f"{node_name}.weight"
            kernel = block.reshape(*block.shape, *([1] * (target_weight.ndim - 2))).astype(np.float32)
            new_initializers.append(numpy_helper.from_array(kernel, w_name))
            node = onnx.helper.make_node("Conv", [source, w_name], [f"{node_name}_output"], name=node_name, kernel_shape=list(kernel.shape[2:]))
            terms.append((node, node.output[0]))
        # the bias rides on the first term; the sum of the terms replaces the target's output
        b_name = f"{prefix}/fused.bias"
        new_initializers.append(numpy_helper.from_array(bias.astype(np.float32), b_name))
        first, _ = terms[0]
        first.input.append(b_name)
        new_nodes = [node for node, _ in terms]
        running = terms[0][1]
        for index, (_, output) in enumerate(terms[1:], start=1):
            is_last = index == len(terms) - 1
            add = onnx.helper.make_node(
                "Add", [running, output], [target.output[0] if is_last else f"{prefix}/fused_sum_{index}"],
                name=f"{prefix}/fused_add_{index}",
            )
            new_nodes.append(add)
            running = add.output[0]
        if len(terms) == 1:
            new_nodes[0].output[0] = target.output[0]
        removed.update({concat.name, target.name})
        replacements[target.name] = new_nodes
        fused += 1

    if not fused:
        return 0
    rebuilt: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.name in replacements:
            rebuilt.extend(replacements[node.name])
        elif node.name not in removed:
            rebuilt.append(node)
    del graph.node[:]
    graph.node.extend(rebuilt)
    graph.initializer.extend(new_initializers)
    used = {name for node in graph.node for name in node.input}
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    del graph.value_info[:]
    logger.debug("Folded %d decoder concatenation(s) into their neighbouring 1x1 convolutions.", fused)
    return fused


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
