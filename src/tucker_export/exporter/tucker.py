"""Tucker-2 factorization of convolutions: one heavy conv becomes 1x1 -> k x k x k core -> 1x1.

For a convolution kernel ``W`` with modes (out, in, *kernel), Tucker-2 keeps the spatial modes and
factorizes the two channel modes (Kim et al. 2016, used for nnU-Net by tucker-cnn, Weber et al.):

    W[o, i, k] ~= sum_{a, b} U_out[o, b] * G[b, a, k] * U_in[i, a]

which runs as three convolutions: ``first`` (1x1, in -> r_in, weight ``U_in^T``), ``core`` (the
original kernel, stride, padding, dilation; r_in -> r_out, weight ``G``) and ``last`` (1x1,
r_out -> out, weight ``U_out``, plus the original bias). Pointwise channel mixing commutes with
any spatial linear operation (zero/reflect padding, strides, dilation, transposed scatter), so
the chain equals the original convolution exactly at full rank.

Transposed convolutions (nnU-Net's decoder upsampling) keep their weights as (in, out, *kernel);
we factorize the same (out, in, *kernel) view. The transposed operation must stay in the core,
with the original stride, kernel and output padding; the two 1x1s are plain convolutions: the
first runs at the low input resolution and the last at the upsampled output resolution.

The factors are computed by truncated HOSVD (Tucker's SVD initialisation): ``U_out`` and ``U_in``
are the leading left singular vectors of the mode-0 and mode-1 unfoldings and ``G`` is ``W``
projected onto them. This is exactly what ``tensorly.decomposition.partial_tucker(..., init='svd',
n_iter_max=0)`` computes (the tests check it), but we take the singular vectors from ``eigh`` of
the small Gram matrices with torch: tensorly's SVD of the (out x in*k^3) unfolding took 0.3-0.5 s
per 320x320x3x3x3 kernel on 2 CPU cores, eigh of the 320x320 Gram matrix takes 0.03 s, which keeps
a TotalSegmentator-size network well under ten seconds. The Gram product runs in the weights' own
precision (float32: half the time of float64) and the eigendecomposition in float64, so factors are
orthonormal to machine precision and full rank is exact; only singular values below ~3e-4 of the
largest (energy below 1e-7) are imprecise, which no rank policy can tell apart anyway.

Optional HOOI iterations (``hooi_iterations > 0``) then run tensorly's own ``partial_tucker``
started from our HOSVD factors, with tensorly's PyTorch backend set only inside a
``tensorly.backend_context`` (restored on exit; no global configuration of ours).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from tucker_export.errors import BundleError

logger = logging.getLogger(__name__)

SUPPORTED_OPS: tuple[type[_ConvNd], ...] = (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_PLAIN_CONV = {2: nn.Conv2d, 3: nn.Conv3d}


def is_transposed(conv: nn.Module) -> bool:
    return isinstance(conv, _ConvTransposeNd)


def unsupported_reason(conv: nn.Module) -> str | None:
    """Why ``conv`` cannot be Tucker-2 factorized, or None when it can."""
    if not isinstance(conv, SUPPORTED_OPS):
        return f"{type(conv).__name__} is not supported (only Conv2d/3d and ConvTranspose2d/3d)"
    if conv.groups != 1:
        return f"groups={conv.groups} (grouped convolutions are left as they are)"
    return None


class TuckerConv(nn.Sequential):
    """A Tucker-2 factorized convolution: ``first`` (1x1) -> ``core`` -> ``last`` (1x1, with the bias).

    It is a plain ``nn.Sequential`` of three standard convolutions, so it exports to ONNX and
    TensorRT as three Conv/ConvTranspose nodes. ``ranks`` is ``(out_rank, in_rank)``, the order
    used in the bundle manifest.
    """

    def __init__(self, conv: _ConvNd, out_rank: int, in_rank: int) -> None:
        reason = unsupported_reason(conv)
        if reason is not None:
            raise ValueError(f"cannot factorize {type(conv).__name__}: {reason}")
        out_channels, in_channels = conv.out_channels, conv.in_channels
        if not (1 <= out_rank <= out_channels and 1 <= in_rank <= in_channels):
            raise ValueError(
                f"ranks (out {out_rank}, in {in_rank}) must lie in [1, channels] = [1, {out_channels}], [1, {in_channels}]"
            )
        dim = len(conv.kernel_size)
        plain = _PLAIN_CONV[dim]
        factory = {"device": conv.weight.device, "dtype": conv.weight.dtype}
        first = plain(in_channels, in_rank, 1, bias=False, **factory)
        if is_transposed(conv):
            core: _ConvNd = type(conv)(
                in_rank, out_rank, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                output_padding=conv.output_padding, dilation=conv.dilation, bias=False,
                padding_mode=conv.padding_mode, **factory,
            )
        else:
            core = type(conv)(
                in_rank, out_rank, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                dilation=conv.dilation, bias=False, padding_mode=conv.padding_mode, **factory,
            )
        last = plain(out_rank, out_channels, 1, bias=conv.bias is not None, **factory)
        super().__init__(OrderedDict(first=first, core=core, last=last))
        self.source_op = type(conv).__name__
        self.ranks = (int(out_rank), int(in_rank))

    def extra_repr(self) -> str:
        return f"source_op={self.source_op}, ranks(out, in)={self.ranks}"


@dataclass
class ModeSpectra:
    """Eigen-decompositions of the two channel-mode Gram matrices of a kernel (float64, descending).

    ``singular_values_*`` are the singular values of the mode unfoldings; ``basis_*`` their left
    singular vectors as columns. Computed once per layer and shared by the rank policies and the
    factorization.
    """

    singular_values_out: torch.Tensor
    singular_values_in: torch.Tensor
    basis_out: torch.Tensor
    basis_in: torch.Tensor
    unfolding_shapes: tuple[tuple[int, int], tuple[int, int]]  # (rows, cols) of mode-0 and mode-1

    @property
    def squared_norm(self) -> float:
        return float((self.singular_values_out**2).sum())


def canonical_kernel(conv: _ConvNd) -> torch.Tensor:
    """The kernel as (out, in, *kernel), whatever the op's own weight layout."""
    weight = conv.weight.detach()
    return weight.transpose(0, 1) if is_transposed(conv) else weight


def _leading_eigvecs(unfolding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # The Gram product is the expensive part; it runs in the weights' own precision (float32 for
    # trained networks: half the time of float64, entries accurate to ~1e-7 relative), the small
    # eigendecomposition in float64 so the factors are orthonormal to machine precision.
    gram = (unfolding @ unfolding.T).to(torch.float64)
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)  # ascending
    eigenvalues = eigenvalues.flip(0).clamp_min(0)
    return eigenvalues.sqrt(), eigenvectors.flip(1)


def mode_spectra(kernel: torch.Tensor, *, device: str | torch.device = "cpu") -> ModeSpectra:
    """Singular values and vectors of the mode-0 and mode-1 unfoldings of an (out, in, *k) kernel (float64)."""
    w = kernel.detach().to(device=device)
    w = w if w.dtype == torch.float64 else w.to(torch.float32)
    out_channels, in_channels = w.shape[:2]
    unfold_out = w.reshape(out_channels, -1)
    unfold_in = w.transpose(0, 1).reshape(in_channels, -1)
    sv_out, basis_out = _leading_eigvecs(unfold_out)
    sv_in, basis_in = _leading_eigvecs(unfold_in)
    return ModeSpectra(
        singular_values_out=sv_out,
        singular_values_in=sv_in,
        basis_out=basis_out,
        basis_in=basis_in,
        unfolding_shapes=(tuple(unfold_out.shape), tuple(unfold_in.shape)),
    )


@dataclass
class TuckerFactors:
    """``kernel ~= core x_0 out_factor x_1 in_factor`` with orthonormal factor columns (float64)."""

    core: torch.Tensor  # (out_rank, in_rank, *kernel)
    out_factor: torch.Tensor  # (out, out_rank)
    in_factor: torch.Tensor  # (in, in_rank)
    relative_error: float  # ||W - W_hat||_F / ||W||_F

    @property
    def ranks(self) -> tuple[int, int]:
        return int(self.out_factor.shape[1]), int(self.in_factor.shape[1])

    def reconstruct(self) -> torch.Tensor:
        return torch.einsum("ob,bak,ia->oik", self.out_factor, self.core.flatten(2), self.in_factor).reshape(
            self.out_factor.shape[0], self.in_factor.shape[0], *self.core.shape[2:]
        )


def _project(w: torch.Tensor, out_factor: torch.Tensor, in_factor: torch.Tensor) -> torch.Tensor:
    core = torch.einsum("ob,oik,ia->bak", out_factor, w.flatten(2), in_factor)
    return core.reshape(out_factor.shape[1], in_factor.shape[1], *w.shape[2:])


def tucker2(
    kernel: torch.Tensor,
    ranks: tuple[int, int],
    *,
    spectra: ModeSpectra | None = None,
    hooi_iterations: int = 0,
    device: str | torch.device = "cpu",
) -> TuckerFactors:
    """Tucker-2 factorization of an (out, in, *k) kernel with ``ranks = (out_rank, in_rank)``.

    Truncated HOSVD, then up to ``hooi_iterations`` HOOI sweeps with tensorly (stopping early when
    tensorly's own tolerance says it converged). ``spectra`` can be passed when already computed.
    """
    out_rank, in_rank = ranks
    w = kernel.detach().to(device=device, dtype=torch.float64)
    if spectra is None:
        spectra = mode_spectra(w, device=device)
    out_factor = spectra.basis_out[:, :out_rank].to(w.device)  # float64
    in_factor = spectra.basis_in[:, :in_rank].to(w.device)
    if hooi_iterations > 0:
        import tensorly as tl
        from tensorly.decomposition import partial_tucker

        with tl.backend_context("pytorch"):
            (_, (out_factor, in_factor)), _ = partial_tucker(
                w, rank=[out_rank, in_rank], modes=[0, 1], n_iter_max=hooi_iterations,
                init=(_project(w, out_factor, in_factor), [out_factor, in_factor]),
            )
    core = _project(w, out_factor, in_factor)
    # With orthonormal factors ||W - W_hat||^2 = ||W||^2 - ||G||^2 (Pythagoras), no reconstruction needed.
    norm2 = float((w**2).sum())
    residual2 = max(norm2 - float((core**2).sum()), 0.0)
    relative_error = (residual2 / norm2) ** 0.5 if norm2 > 0 else 0.0
    return TuckerFactors(core=core, out_factor=out_factor, in_factor=in_factor, relative_error=relative_error)


def factorized_conv(conv: _ConvNd, factors: TuckerFactors) -> TuckerConv:
    """A ``TuckerConv`` carrying ``factors``, in ``conv``'s dtype and device, bias copied."""
    out_rank, in_rank = factors.ranks
    module = TuckerConv(conv, out_rank, in_rank)
    dtype, device = conv.weight.dtype, conv.weight.device
    spatial_ones = (1,) * (conv.weight.dim() - 2)
    with torch.no_grad():
        module.first.weight.copy_(factors.in_factor.T.reshape(in_rank, -1, *spatial_ones).to(device, dtype))
        core = factors.core.to(device, dtype)
        module.core.weight.copy_(core.transpose(0, 1) if is_transposed(conv) else core)
        module.last.weight.copy_(factors.out_factor.reshape(-1, out_rank, *spatial_ones).to(device, dtype))
        if conv.bias is not None:
            module.last.bias.copy_(conv.bias.detach())
    return module.train(conv.training)


# ---- finding and replacing convolutions in a network ------------------------------------------


def find_convs(network: nn.Module) -> list[tuple[str, _ConvNd]]:
    """Every convolution once, under its canonical (first) name, skipping those inside a ``TuckerConv``.

    ``named_modules()`` de-duplicates by object, so a conv that nnU-Net holds as both ``conv`` and
    ``all_modules.0`` (and under ``encoder.*`` and ``decoder.encoder.*``) appears once.
    """
    found: list[tuple[str, _ConvNd]] = []
    inside: list[str] = []
    for name, module in network.named_modules():
        if isinstance(module, TuckerConv):
            inside.append(name + ".")
            continue
        if isinstance(module, _ConvNd) and not any(name.startswith(prefix) for prefix in inside):
            found.append((name, module))
    return found


def module_aliases(network: nn.Module, target: nn.Module) -> list[str]:
    """Every name under which ``target`` is reachable (``named_modules(remove_duplicate=False)``)."""
    return [name for name, module in network.named_modules(remove_duplicate=False) if module is target]


def replace_module(network: nn.Module, old: nn.Module, new: nn.Module) -> int:
    """Put ``new`` in every parent slot that holds ``old``, so all aliases keep pointing to one module.

    Returns how many slots were replaced (0 means ``old`` is not in ``network``).
    """
    replaced = 0
    for parent in network.modules():  # each parent object once
        for slot, child in list(parent._modules.items()):
            if child is old:
                parent._modules[slot] = new
                replaced += 1
    return replaced


def apply_factorized_structure(network: nn.Module, layers: Iterable[Mapping[str, Any]]) -> nn.Module:
    """Give a freshly built network the factorized structure recorded in a bundle manifest.

    ``layers`` are the manifest's layer entries of one fold; each entry with
    ``action == "factorized"`` names a convolution (canonical name) and its ``ranks``
    (``[out_rank, in_rank]``). Each is replaced, in every parent that references it, by an
    uninitialised ``TuckerConv`` of those ranks, so that the fold's safetensors state dict then
    loads strictly. No decomposition runs. Returns ``network`` (modified in place).
    """
    modules = dict(network.named_modules())
    for entry in layers:
        if entry.get("action") != "factorized":
            continue
        name = entry["name"]
        conv = modules.get(name)
        if conv is None or not isinstance(conv, _ConvNd):
            raise BundleError(
                f"The manifest factorizes layer {name!r}, which is not a convolution of the network built "
                f"from the bundle's plans; the bundle does not match its plans.json (re-run decompose)."
            )
        ranks = entry.get("ranks")
        try:
            out_rank, in_rank = (int(r) for r in ranks)
            module = TuckerConv(conv, out_rank, in_rank)
        except (TypeError, ValueError) as error:
            raise BundleError(f"The manifest's ranks {ranks!r} of layer {name!r} are unusable ({error}).") from None
        replace_module(network, conv, module.train(conv.training))
    return network


# ---- state dicts: safetensors refuses shared tensors -------------------------------------------


def deduplicated_state_dict(network: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each tensor once (under its first name), detached, contiguous, on the CPU.

    nnU-Net's modules expose each conv twice (``conv``/``all_modules.0``, ``encoder.*``/
    ``decoder.encoder.*``); safetensors refuses tensors that share storage, and storing copies
    would triple the file. ``restore_aliased_keys`` puts the other names back when loading.
    """
    seen: set[int] = set()
    result: dict[str, torch.Tensor] = {}
    for key, tensor in network.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        result[key] = tensor.detach().to("cpu").contiguous()
    return result


def alias_groups(network: nn.Module) -> list[list[str]]:
    """State-dict keys grouped by the tensor object they name (groups of one included)."""
    groups: dict[int, list[str]] = {}
    for key, tensor in network.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), []).append(key)
    return list(groups.values())


def restore_aliased_keys(network: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add the alias keys a de-duplicated state dict lacks, taken from the key it has in each group.

    Keys that are missing with no stored alias stay missing, so strict loading still reports them.
    """
    restored = dict(state_dict)
    for group in alias_groups(network):
        present = next((key for key in group if key in restored), None)
        if present is None:
            continue
        for key in group:
            restored.setdefault(key, restored[present])
    return restored
