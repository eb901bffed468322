"""Small networks and helpers shared by the exporter tests."""

from __future__ import annotations

from pathlib import Path

import torch
from factories import PLAIN, RESENC, make_model_folder
from torch import nn

from tucker_export.exporter.decompose import SkipRules
from tucker_export.exporter.ranks import RankPolicy
from tucker_export.nnunet.loading import load_trained_model

# Factorize everything at full rank: the chain must then reproduce every conv exactly.
FULL_RANK = RankPolicy(mode="relative", factor=1.0, round_to=1)
NO_SKIPS = SkipRules(first_conv_max_in_channels=0, segmentation_heads=False, no_gain=False)

ARCHITECTURES = {
    "plain-3d": {"architecture": PLAIN},
    "resenc-3d": {"architecture": RESENC},
    "plain-2d": {"architecture": PLAIN, "dim": 2},
    "resenc-2d": {"architecture": RESENC, "dim": 2, "features": (8, 16, 32, 32)},
    "plain-3d-anisotropic": {
        "architecture": PLAIN,
        "strides": ((1, 1, 1), (1, 2, 2), (2, 2, 2)),
        "kernel_sizes": ((1, 3, 3), (3, 3, 3), (3, 3, 3)),
        "patch_size": (8, 16, 16),
    },
    "resenc-3d-anisotropic": {
        "architecture": RESENC,
        "strides": ((1, 1, 1), (1, 2, 2), (2, 2, 1)),
        "kernel_sizes": ((1, 3, 3), (3, 3, 1), (3, 3, 3)),
        "patch_size": (8, 16, 12),
    },
}


def model_folder(root: Path, name: str, **extra) -> Path:
    return make_model_folder(root, **{**ARCHITECTURES[name], **extra})


def load_network(model_dir: Path, fold: int = 0) -> tuple[nn.Module, tuple[int, ...]]:
    """The fold's network and the (channels, *patch) input shape of its configuration."""
    loaded = load_trained_model(model_dir, [fold])
    spec = loaded.spec
    return loaded.networks[fold], (spec.num_input_channels, *spec.patch_size)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def random_input(input_shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((1, *input_shape), generator=generator)
