"""Parameters and multiply-accumulates (MACs) of every convolution, counted by running the network.

Counts come from forward hooks on every convolution during one forward pass at the given input
shape, never from the plans: whatever the network really executes is what is counted (a
deep-supervision head that nnU-Net does not run at inference counts 0 MACs, a module called twice
counts twice).

By default the pass runs on PyTorch's ``meta`` device: shapes propagate exactly as on a real
device, but no arithmetic runs and no memory is allocated, so counting a TotalSegmentator-size
network at 128^3 takes milliseconds instead of a minute and 20 GB. The network is copied onto
``meta`` with a deepcopy whose memo maps each parameter and buffer to an empty meta tensor, so
the copy keeps the aliasing of the original (nnU-Net modules hold the same conv under two names)
and allocates nothing. ``device="cpu"`` (or ``"cuda"``) runs the real network instead; the tests
check that both agree.

MACs of one call, batch size 1 (bias additions are not counted):

- ``ConvNd``: ``out_voxels * out_channels * (in_channels / groups) * prod(kernel)``
- ``ConvTransposeNd``: ``in_voxels * in_channels * (out_channels / groups) * prod(kernel)``
  (every input voxel scatters one kernel; with nnU-Net's kernel == stride this equals
  ``out_voxels * in_channels * out_channels``)
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd


@dataclass
class ConvCount:
    """What one convolution module did during the counted forward pass (summed over calls)."""

    name: str
    op: str
    params: int
    macs: int = 0
    calls: int = 0
    input_voxels: int = 0
    output_voxels: int = 0
    order: int = -1  # position of its first call in the forward pass; -1 when never called


@dataclass
class NetworkCount:
    """Per-convolution counts plus network totals (parameters of every module, MACs of convolutions)."""

    input_shape: tuple[int, ...]
    convs: dict[str, ConvCount] = field(default_factory=dict)
    params: int = 0

    @property
    def macs(self) -> int:
        return sum(count.macs for count in self.convs.values())

    @property
    def conv_params(self) -> int:
        return sum(count.params for count in self.convs.values())

    def executed_in_order(self) -> list[ConvCount]:
        return sorted((c for c in self.convs.values() if c.calls), key=lambda c: c.order)

    def under(self, prefix: str) -> list[ConvCount]:
        """Counts of ``prefix`` itself or of the convolutions inside it (e.g. a factorized layer's three convs)."""
        return [c for name, c in self.convs.items() if name == prefix or name.startswith(prefix + ".")]


def conv_macs(module: _ConvNd, input_voxels: int, output_voxels: int) -> int:
    """MACs of one batch-1 call of ``module`` (see the module docstring for the formulas)."""
    kernel = math.prod(module.kernel_size)
    if isinstance(module, _ConvTransposeNd):
        return input_voxels * module.in_channels * (module.out_channels // module.groups) * kernel
    return output_voxels * module.out_channels * (module.in_channels // module.groups) * kernel


def module_params(module: nn.Module) -> int:
    """Parameters of ``module``, each tensor once even when reachable under two names."""
    return sum(p.numel() for p in module.parameters())


def _meta_copy(network: nn.Module) -> nn.Module:
    memo: dict[int, object] = {}
    for tensor in [*network.parameters(), *network.buffers()]:
        empty = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = nn.Parameter(empty, requires_grad=tensor.requires_grad) if isinstance(
            tensor, nn.Parameter
        ) else empty
    return copy.deepcopy(network, memo)


def count_network(
    network: nn.Module,
    input_shape: Sequence[int],
    *,
    device: str | torch.device = "meta",
) -> NetworkCount:
    """Run ``network`` once on a zero input of ``input_shape`` (channels, *spatial; batch 1) and count.

    Returns counts keyed by each convolution's canonical name (its first name in
    ``named_modules()``). The network itself is left unchanged (the meta pass runs on a copy, a
    real pass in ``no_grad`` with the network in whatever mode it is in).
    """
    device = torch.device(device)
    runner = _meta_copy(network) if device.type == "meta" else network
    result = NetworkCount(input_shape=tuple(int(s) for s in input_shape), params=module_params(network))
    handles = []
    calls = 0

    def make_hook(count: ConvCount):
        def hook(module: _ConvNd, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            nonlocal calls
            x = inputs[0]
            batch = x.shape[0]
            in_voxels = math.prod(x.shape[2:])
            out_voxels = math.prod(output.shape[2:])
            count.macs += batch * conv_macs(module, in_voxels, out_voxels)
            if count.calls == 0:
                count.order = calls
            count.calls += 1
            count.input_voxels += batch * in_voxels
            count.output_voxels += batch * out_voxels
            calls += 1

        return hook

    original = dict(network.named_modules())
    for name, module in runner.named_modules():
        if isinstance(module, _ConvNd):
            count = ConvCount(name=name, op=type(module).__name__, params=module_params(original[name]))
            result.convs[name] = count
            handles.append(module.register_forward_hook(make_hook(count)))
    try:
        reference = next(iter(network.parameters()), None)
        dtype = reference.dtype if reference is not None else torch.float32
        x = torch.zeros((1, *result.input_shape), dtype=dtype, device=device)
        with torch.no_grad():
            runner(x)
    finally:
        for handle in handles:
            handle.remove()
    return result
