"""Rebuild a bundle's factorized network from its manifest and weights (no decomposition runs)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tucker_export.bundle import Bundle
from tucker_export.errors import BundleError
from tucker_export.exporter.tucker import apply_factorized_structure, restore_aliased_keys

if TYPE_CHECKING:
    import torch

    from tucker_export.nnunet.loading import Fold


def build_network(bundle: Bundle, fold: Fold) -> torch.nn.Module:
    """The (factorized) network of ``fold`` in eval mode, with its verified weights loaded.

    The layer list says which convolutions are factorized with which ranks, and the safetensors
    file holds the factors.
    """
    from safetensors.torch import load_file

    from tucker_export.nnunet.loading import load_state_dict_checked

    weights = bundle.verify_weights(fold)
    network = bundle.spec.build_network()
    apply_factorized_structure(network, bundle.fold_layers(fold))
    try:
        state_dict = load_file(weights)
    except Exception as error:  # safetensors raises its own SafetensorError
        raise BundleError(f"Weights file {weights} cannot be read ({error}); re-run `tucker-export decompose`.") from None
    # safetensors stores each tensor once; nnU-Net's aliased names (conv/all_modules.0,
    # encoder/decoder.encoder) are put back from the module structure before strict loading.
    state_dict = restore_aliased_keys(network, state_dict)
    load_state_dict_checked(network, state_dict, weights)
    return network.eval()
