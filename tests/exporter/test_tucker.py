"""Tucker-2 factorization: exact at full rank, the right chain for every conv kind, aliases kept."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from tucker_export.exporter.decompose import SkipRules, decompose_network
from tucker_export.exporter.ranks import RankPolicy
from tucker_export.exporter.tucker import (
    TuckerConv,
    apply_factorized_structure,
    canonical_kernel,
    deduplicated_state_dict,
    factorized_conv,
    find_convs,
    restore_aliased_keys,
    tucker2,
)
from tucker_export.nnunet.loading import load_state_dict_checked

from ._nets import (
    ARCHITECTURES,
    FULL_RANK,
    NO_SKIPS,
    load_network,
    model_folder,
    random_input,
    relative_error,
)

CONVS = {
    "conv3d-aniso-stride-bias": lambda: nn.Conv3d(6, 10, (3, 3, 1), stride=(1, 2, 2), padding=(1, 1, 0)),
    "conv3d-dilated-nobias": lambda: nn.Conv3d(6, 10, 3, padding=2, dilation=2, bias=False),
    "conv3d-reflect": lambda: nn.Conv3d(6, 10, (1, 3, 3), stride=(2, 1, 1), padding=(0, 1, 1), padding_mode="reflect"),
    "convT3d-aniso-bias": lambda: nn.ConvTranspose3d(10, 6, (1, 2, 2), stride=(1, 2, 2)),
    "convT3d-outpad-nobias": lambda: nn.ConvTranspose3d(10, 6, 3, stride=2, padding=1, output_padding=1, bias=False),
    "conv2d-aniso-bias": lambda: nn.Conv2d(6, 10, (3, 5), stride=(2, 1), padding=(1, 2)),
    "conv2d-dilated-nobias": lambda: nn.Conv2d(6, 10, 3, padding=2, dilation=2, bias=False),
    "convT2d-nobias": lambda: nn.ConvTranspose2d(10, 6, 2, stride=2, bias=False),
    "convT2d-dilated-bias": lambda: nn.ConvTranspose2d(10, 6, 3, stride=2, padding=1, dilation=2, output_padding=1),
}


def _input_for(conv: nn.Module) -> torch.Tensor:
    torch.manual_seed(1)
    spatial = (5, 8, 7) if isinstance(conv, (nn.Conv3d, nn.ConvTranspose3d)) else (9, 8)
    return torch.randn(2, conv.in_channels, *spatial)


@pytest.mark.parametrize("kind", CONVS)
def test_full_rank_chain_reproduces_the_conv(kind):
    torch.manual_seed(0)
    conv = CONVS[kind]()
    x = _input_for(conv)
    factors = tucker2(canonical_kernel(conv), (conv.out_channels, conv.in_channels))
    module = factorized_conv(conv, factors)
    assert factors.relative_error < 1e-7
    assert isinstance(module.core, type(conv)) and type(module.first) is type(module.last)
    assert module.last.bias is not None if conv.bias is not None else module.last.bias is None
    with torch.no_grad():
        assert relative_error(module(x), conv(x)) < 1e-5


@pytest.mark.parametrize("kind", CONVS)
def test_low_rank_chain_equals_the_conv_with_the_reconstructed_kernel(kind):
    """The 1x1 -> core -> 1x1 arrangement (also for transposed convs) computes W_hat exactly."""
    torch.manual_seed(0)
    conv = CONVS[kind]().double()
    x = _input_for(conv).double()
    factors = tucker2(canonical_kernel(conv), (3, 4))
    module = factorized_conv(conv, factors)
    reference = nn.Module()
    w_hat = factors.reconstruct()
    if isinstance(conv, (nn.ConvTranspose2d, nn.ConvTranspose3d)):
        w_hat = w_hat.transpose(0, 1)
        fn = F.conv_transpose3d if conv.weight.dim() == 5 else F.conv_transpose2d
        expected = fn(x, w_hat, conv.bias, conv.stride, conv.padding, conv.output_padding, 1, conv.dilation)
    else:
        reference = type(conv)(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                               conv.dilation, bias=conv.bias is not None, padding_mode=conv.padding_mode).double()
        with torch.no_grad():
            reference.weight.copy_(w_hat)
            if conv.bias is not None:
                reference.bias.copy_(conv.bias)
        expected = reference(x)
    with torch.no_grad():
        assert relative_error(module(x), expected) < 1e-10
    # and the reported error is the kernel's relative Frobenius error
    w = canonical_kernel(conv)
    assert factors.relative_error == pytest.approx(float((w - factors.reconstruct()).norm() / w.norm()), rel=1e-6)


def test_hosvd_is_tensorlys_partial_tucker_svd_init():
    import tensorly as tl
    from tensorly.decomposition import partial_tucker
    from tensorly.tenalg import multi_mode_dot

    torch.manual_seed(0)
    w = torch.randn(12, 9, 3, 3, 3, dtype=torch.float64)
    ours = tucker2(w, (5, 4))
    with tl.backend_context("numpy"):
        (core, factors), _ = partial_tucker(w.numpy(), rank=[5, 4], modes=[0, 1], n_iter_max=0, init="svd")
        theirs = multi_mode_dot(core, factors, modes=[0, 1])
    np.testing.assert_allclose(ours.reconstruct().numpy(), theirs, atol=1e-10)
    assert tl.get_backend() == "numpy"  # no global backend change leaks out


def test_hooi_iterations_do_not_increase_the_error():
    import tensorly as tl

    backend = tl.get_backend()
    torch.manual_seed(0)
    w = torch.randn(16, 12, 3, 3, 3)
    hosvd = tucker2(w, (6, 5))
    hooi = tucker2(w, (6, 5), hooi_iterations=5)
    assert hooi.relative_error <= hosvd.relative_error + 1e-12
    assert tl.get_backend() == backend


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_full_rank_network_reproduces_logits(tmp_path, name):
    network, input_shape = load_network(model_folder(tmp_path, name))
    x = random_input(input_shape)
    with torch.no_grad():
        expected = network(x)
    result = decompose_network(network, input_shape, FULL_RANK, skip=NO_SKIPS)
    kinds = {entry["op"] for entry in result.layers if entry["action"] == "factorized"}
    # every executed conv, the transposed ones and the segmentation head included
    assert {e["name"] for e in result.layers if e["action"] == "kept"} <= {
        e["name"] for e in result.layers if e["macs_before"] == 0
    }
    assert any(k.startswith("ConvTranspose") for k in kinds)
    with torch.no_grad():
        assert relative_error(network(x), expected) < 1e-5


def test_full_rank_network_without_conv_bias():
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    torch.manual_seed(0)
    network = PlainConvUNet(
        1, 3, (8, 16, 32), nn.Conv3d, 3, (1, 2, 2), 2, 3, 2, conv_bias=False,
        norm_op=nn.InstanceNorm3d, norm_op_kwargs={"affine": True}, nonlin=nn.LeakyReLU,
    ).eval()
    x = random_input((1, 16, 16, 16))
    has_bias = {name: conv.bias is not None for name, conv in find_convs(network)}
    assert not all(has_bias.values())
    with torch.no_grad():
        expected = network(x)
    result = decompose_network(network, (1, 16, 16, 16), FULL_RANK, skip=NO_SKIPS)
    assert result.totals["factorized"] > 0
    for entry in result.layers:
        if entry["action"] == "factorized":
            assert (network.get_submodule(entry["name"]).last.bias is not None) == has_bias[entry["name"]]
    with torch.no_grad():
        assert relative_error(network(x), expected) < 1e-5


@pytest.mark.parametrize("name", ["plain-3d", "resenc-3d"])
def test_each_conv_is_replaced_once_and_aliases_share_the_new_module(tmp_path, name):
    network, input_shape = load_network(model_folder(tmp_path, name))
    n_convs = len(find_convs(network))
    result = decompose_network(network, input_shape, RankPolicy(factor=0.5, round_to=1))
    factorized = [e for e in result.layers if e["action"] == "factorized"]
    assert len(result.layers) == n_convs
    assert len({id(m) for m in network.modules() if isinstance(m, TuckerConv)}) == len(factorized)
    assert network.encoder is network.decoder.encoder
    for module in network.modules():
        if hasattr(module, "all_modules") and hasattr(module, "conv"):
            assert module.conv is module.all_modules[0]
    aliased = [e for e in factorized if e["aliases"]]
    assert aliased, "nnU-Net convs are reachable under several names"
    for entry in aliased:
        new = network.get_submodule(entry["name"])
        assert isinstance(new, TuckerConv)
        for alias in entry["aliases"]:
            assert network.get_submodule(alias) is new
    keys = network.state_dict().keys()
    assert any(k.startswith("decoder.encoder.") and k.endswith(".first.weight") for k in keys)
    assert any(".all_modules.0.core.weight" in k for k in keys)


def test_deduplicated_state_dict_loads_strictly_into_the_rebuilt_structure(tmp_path):
    from safetensors.torch import load_file, save_file

    model_dir = model_folder(tmp_path, "plain-3d")
    network, input_shape = load_network(model_dir)
    result = decompose_network(network, input_shape, RankPolicy(factor=0.5, round_to=1))
    stored = deduplicated_state_dict(network)
    assert len(stored) < len(network.state_dict())
    save_file(stored, str(tmp_path / "w.safetensors"))  # refuses shared tensors: dedup is required
    fresh, _ = load_network(model_dir)
    apply_factorized_structure(fresh, result.layers)
    assert fresh.encoder is fresh.decoder.encoder
    state = restore_aliased_keys(fresh, load_file(tmp_path / "w.safetensors"))
    load_state_dict_checked(fresh, state, "w.safetensors")
    x = random_input(input_shape)
    with torch.no_grad():
        assert torch.equal(fresh(x), network(x))


def test_grouped_convs_are_left_as_they_are_and_logged(caplog):
    network = nn.Sequential(
        nn.Conv3d(4, 16, 3, padding=1), nn.Conv3d(16, 16, 3, padding=1, groups=2), nn.Conv3d(16, 16, 3, padding=1)
    ).eval()
    with caplog.at_level(logging.INFO, logger="tucker_export"):
        result = decompose_network(network, (4, 6, 6, 6), RankPolicy(factor=0.25, round_to=1),
                                   skip=SkipRules(segmentation_heads=False))
    by_name = {e["name"]: e for e in result.layers}
    assert by_name["1"]["action"] == "kept" and by_name["1"]["reason"].startswith("groups=2")
    assert isinstance(network[1], nn.Conv3d)
    assert by_name["0"]["action"] == by_name["2"]["action"] == "factorized"
    assert any("groups=2" in record.getMessage() for record in caplog.records)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_factorization_on_cuda_matches_the_cpu():
    torch.manual_seed(0)
    conv = nn.Conv3d(32, 48, 3, padding=1)
    cpu = tucker2(canonical_kernel(conv), (16, 8))
    gpu = tucker2(canonical_kernel(conv), (16, 8), device="cuda", hooi_iterations=2)
    assert gpu.core.device.type == "cuda"
    assert gpu.relative_error <= cpu.relative_error + 1e-9
    module = factorized_conv(conv, gpu)
    assert module.core.weight.device.type == "cpu"
