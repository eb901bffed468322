"""An nnU-Net predictor whose network is any engine: PyTorch, ONNX Runtime or TensorRT.

It is a subclass of nnU-Net's own ``nnUNetPredictor``, so preprocessing, the Gaussian-weighted
sliding window, mirroring over the model's allowed axes, fold ensembling, resampling back and
export are nnU-Net's code, unchanged. Two seams are used:

- ``network`` / ``list_of_parameters``: nnU-Net calls ``network.load_state_dict(params)`` once per
  fold and then ``network(x)``. ``FoldSwitch`` stands in for the network: its "state dict" names a
  fold and selects that fold's engine, so any callable per fold plugs in (as MONAI's
  ``sliding_window_inference`` takes any callable).
- the sliding-window loop (``_internal_predict_sliding_window_return_logits``) is overridden only to
  run several tiles and mirror variants per engine call (``batch_size``). Every tile is predicted
  (a short last batch is run as is, never dropped), and the accumulation is nnU-Net's.

This module is the only place that reaches nnU-Net's private methods (``_internal_*``, listed in
``PRIVATE_SEAMS`` and checked by a test against the installed nnU-Net), which is why
``nnunetv2`` is bounded above in pyproject.toml: a new minor release is admitted once that test
passes against it.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.inference.sliding_window_prediction import compute_gaussian
from tqdm import tqdm

from tucker_export.errors import ConfigurationError
from tucker_export.nnunet.loading import Fold, ModelSpec

logger = logging.getLogger(__name__)

# (B, C, *patch) float32 -> (B, K, *patch) logits; the same device as the input.
FoldModel = Callable[[torch.Tensor], torch.Tensor]

_FOLD_KEY = "__tucker_export_fold__"

# nnUNetPredictor's private methods this module overrides or calls, with the parameters relied on.
PRIVATE_SEAMS: dict[str, tuple[str, ...]] = {
    "_internal_maybe_mirror_and_predict": ("x",),
    "_internal_predict_sliding_window_return_logits": ("data", "slicers", "do_on_device"),
    "_internal_get_sliding_window_slicers": ("image_size",),
}


class FoldSwitch(torch.nn.Module):
    """Sits where nnU-Net expects the network; ``load_state_dict`` picks which fold's engine runs."""

    def __init__(self, fold_models: dict[Fold, FoldModel]) -> None:
        super().__init__()
        self.fold_models = dict(fold_models)
        self.active: Fold = next(iter(self.fold_models))

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True, assign: bool = False):  # type: ignore[override]
        self.active = state_dict[_FOLD_KEY]
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fold_models[self.active](x)


def mirror_axis_combinations(allowed_axes: Sequence[int] | None, spatial_dims: int) -> list[tuple[int, ...]]:
    """The flips nnU-Net averages over, as tensor dims of a (B, C, *spatial) batch; () is the original."""
    if not allowed_axes:
        return [()]
    if max(allowed_axes) > spatial_dims - 1:
        raise ConfigurationError(
            f"Mirroring axes {tuple(allowed_axes)} do not fit a {spatial_dims}D patch; check the checkpoint's "
            f"inference_allowed_mirroring_axes."
        )
    dims = [axis + 2 for axis in allowed_axes]
    combos = [c for i in range(len(dims)) for c in itertools.combinations(dims, i + 1)]
    return [(), *combos]


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class EnginePredictor(nnUNetPredictor):
    """``nnUNetPredictor`` with one engine callable per fold and tile batching.

    Use it like nnU-Net's predictor (``predict_from_files``, ``predict_single_npy_array``,
    ``predict_logits_from_preprocessed_data``) after ``initialize(spec, fold_models)``.
    """

    def __init__(
        self,
        *,
        tile_step_size: float = 0.5,
        use_mirroring: bool = True,
        batch_size: int = 1,
        device: torch.device | str = "cpu",
        use_gaussian: bool = True,
        verbose: bool = False,
        allow_tqdm: bool = True,
    ) -> None:
        if not 0 < tile_step_size <= 1:
            raise ConfigurationError(f"Step size must be in (0, 1], got {tile_step_size}.")
        if batch_size < 1:
            raise ConfigurationError(f"Batch size must be at least 1, got {batch_size}.")
        device = torch.device(device)
        with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net prints a note for CPU devices
            super().__init__(
                tile_step_size=tile_step_size,
                use_gaussian=use_gaussian,
                use_mirroring=use_mirroring,
                perform_everything_on_device=device.type == "cuda",
                device=device,
                verbose=verbose,
                verbose_preprocessing=False,
                allow_tqdm=allow_tqdm,
            )
        self.batch_size = batch_size

    def initialize(self, spec: ModelSpec, fold_models: dict[Fold, FoldModel]) -> None:
        """Use nnU-Net's ``manual_initialization`` with a ``FoldSwitch`` over the given engines."""
        if not fold_models:
            raise ConfigurationError("At least one fold is needed for prediction.")
        self.manual_initialization(
            FoldSwitch(fold_models),
            spec.plans_manager,
            spec.configuration_manager,
            [{_FOLD_KEY: fold} for fold in fold_models],
            spec.dataset_json,
            spec.trainer_name,
            spec.allowed_mirroring_axes,
        )

    # ---- the network call (nnU-Net's single call site) -----------------------------------------
    @torch.inference_mode()
    def _internal_maybe_mirror_and_predict(self, x: torch.Tensor) -> torch.Tensor:
        """Mirror-averaged logits of a batch of tiles, with at most ``batch_size`` items per engine call.

        The sum runs in nnU-Net's order (original, then each flip combination) so that batch size 1
        gives nnU-Net's numbers.
        """
        flips = mirror_axis_combinations(
            self.allowed_mirroring_axes if self.use_mirroring else None, x.ndim - 2
        )
        work = [(flip, tile) for flip in flips for tile in range(x.shape[0])]
        outputs: dict[tuple[tuple[int, ...], int], torch.Tensor] = {}
        for chunk in _chunks(work, self.batch_size):
            batch = torch.stack([torch.flip(x[tile], [d - 1 for d in flip]) if flip else x[tile] for flip, tile in chunk])
            logits = self.network(batch)
            for (flip, tile), item in zip(chunk, logits, strict=True):
                outputs[(flip, tile)] = torch.flip(item, [d - 1 for d in flip]) if flip else item
        prediction = torch.stack([outputs[((), tile)] for tile in range(x.shape[0])])
        for flip in flips[1:]:
            prediction += torch.stack([outputs[(flip, tile)] for tile in range(x.shape[0])])
        if len(flips) > 1:
            prediction /= len(flips)
        return prediction

    # ---- the sliding window, with tiles batched ------------------------------------------------
    @torch.inference_mode()
    def _internal_predict_sliding_window_return_logits(
        self, data: torch.Tensor, slicers: list, do_on_device: bool = True
    ) -> torch.Tensor:
        results_device = self.device if do_on_device else torch.device("cpu")
        data = data.to(results_device)
        # half-precision accumulators, exactly as nnU-Net keeps them
        predicted_logits = torch.zeros(
            (self.label_manager.num_segmentation_heads, *data.shape[1:]), dtype=torch.half, device=results_device
        )
        n_predictions = torch.zeros(data.shape[1:], dtype=torch.half, device=results_device)
        gaussian: torch.Tensor | float = (
            compute_gaussian(
                tuple(self.configuration_manager.patch_size), sigma_scale=1.0 / 8, value_scaling_factor=10,
                device=results_device,
            )
            if self.use_gaussian
            else 1
        )
        tiles_per_call = max(1, self.batch_size // len(
            mirror_axis_combinations(self.allowed_mirroring_axes if self.use_mirroring else None, data.ndim - 1)
        ))
        with tqdm(total=len(slicers), desc="tiles", unit="tile", leave=False, disable=not self.allow_tqdm) as bar:
            for group in _chunks(slicers, tiles_per_call):
                tiles = torch.stack([data[s] for s in group]).to(self.device)
                predictions = self._internal_maybe_mirror_and_predict(tiles).to(results_device)
                for s, prediction in zip(group, predictions, strict=True):
                    if self.use_gaussian:
                        prediction *= gaussian
                    predicted_logits[s] += prediction
                    n_predictions[s[1:]] += gaussian
                bar.update(len(group))
        torch.div(predicted_logits, n_predictions, out=predicted_logits)
        if torch.any(torch.isinf(predicted_logits)):
            raise RuntimeError("Encountered inf in the accumulated logits; the engine's outputs are out of fp16 range.")
        return predicted_logits


def sliding_window_tiles(predictor: nnUNetPredictor, data: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` sliding-window tiles spread evenly over a preprocessed case (nnU-Net's own tiling)."""
    import numpy as np
    from acvl_utils.cropping_and_padding.padding import pad_nd_image

    padded, _ = pad_nd_image(data, predictor.configuration_manager.patch_size, "constant", {"value": 0}, True, None)
    slicers = predictor._internal_get_sliding_window_slicers(padded.shape[1:])
    chosen = np.unique(np.linspace(0, len(slicers) - 1, num=min(count, len(slicers))).round().astype(int))
    return torch.stack([padded[slicers[i]] for i in chosen])
