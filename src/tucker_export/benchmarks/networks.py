"""The TotalSegmentator-size network both engine and decomposition benchmarks measure.

PlainConvUNet, 6 stages, features 32-64-128-256-320-320, kernel 3, 2 convs per stage in encoder
and decoder, 118 outputs, built by nnU-Net's own get_network_from_plans with its He init.
"""

from __future__ import annotations

import torch

NUM_CLASSES = 118

ARCH_KWARGS = {
    "n_stages": 6,
    "features_per_stage": [32, 64, 128, 256, 320, 320],
    "conv_op": "torch.nn.modules.conv.Conv3d",
    "kernel_sizes": [[3, 3, 3]] * 6,
    "strides": [[1, 1, 1]] + [[2, 2, 2]] * 5,
    "n_conv_per_stage": [2] * 6,
    "n_conv_per_stage_decoder": [2] * 5,
    "conv_bias": True,
    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
    "norm_op_kwargs": {"eps": 1e-05, "affine": True},
    "dropout_op": None,
    "dropout_op_kwargs": None,
    "nonlin": "torch.nn.LeakyReLU",
    "nonlin_kwargs": {"inplace": True},
}


def build_totalsegmentator_network(seed: int = 0) -> torch.nn.Module:
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    torch.manual_seed(seed)
    network = get_network_from_plans(
        "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        ARCH_KWARGS,
        ["conv_op", "norm_op", "dropout_op", "nonlin"],
        1,
        NUM_CLASSES,
        allow_init=True,
        deep_supervision=False,
    )
    return network.eval()
