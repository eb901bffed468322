"""The segmentation export without nnU-Net's per-class scipy resampling of every logit map.

Stock nnU-Net exports a case by resampling all C logit maps to the scan's geometry at once (scipy,
one class and one slice at a time, in float64), then taking the argmax. For a 118-class
TotalSegmentator-size model on a 0.8 mm scan that is tens of GB and minutes (nnU-Net #2540,
#2912). The argmax needs neither all maps at once nor scipy: here the logits are resampled a few
classes at a time with PyTorch (nnU-Net's own ``resample_torch_fornnunet``, multi-threaded), and a
running maximum keeps the best class per voxel, so memory is one chunk of maps plus two volumes.

The interpolation is the one stock uses for probabilities (``order=1`` in-plane and, for
anisotropic scans, nearest along the slice axis: ``order_z=0``), with the same half-voxel
alignment; ties and float rounding can flip a voxel between two classes of equal logit, which is
why the result is compared with stock per class (Dice) rather than bit for bit. Where stock does
something this path does not reproduce (region-based models, another interpolation order, saved
probabilities), ``fast_export_unsupported`` says so and the caller uses stock's export.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

# Bytes of resampling work held at once (each chunk is at least one class): a quarter of what a
# 118-class model needs at once for a 0.8 mm scan, at no measurable cost in speed.
CHUNK_BYTES = 512 << 20


def fast_export_unsupported(spec, *, save_probabilities: bool) -> str | None:
    """Why this model's export must go through stock nnU-Net, or None when the fast path applies."""
    if save_probabilities:
        return "probabilities are saved (they need every class map at the scan's geometry)"
    if spec.label_manager.has_regions:
        return "the model is region-based (sigmoid per region, not an argmax)"
    configuration = spec.configuration_manager.configuration
    name = configuration.get("resampling_fn_probabilities")
    kwargs = configuration.get("resampling_fn_probabilities_kwargs", {})
    if name == "resample_data_or_seg_to_shape":
        if kwargs.get("order", 3) != 1 or kwargs.get("order_z", 0) != 0:
            return (f"its probability resampling is order {kwargs.get('order', 3)}/order_z {kwargs.get('order_z', 0)};"
                    f" the fast path reproduces order 1/order_z 0 only")
        return None
    if name == "resample_torch_fornnunet":
        return None
    return f"its probability resampling function {name!r} is not one the fast path reproduces"


def _torch_resampling_kwargs(configuration: dict) -> dict:
    kwargs = dict(configuration.get("resampling_fn_probabilities_kwargs", {}))
    if configuration.get("resampling_fn_probabilities") == "resample_torch_fornnunet":
        return {k: v for k, v in kwargs.items() if k in
                ("force_separate_z", "separate_z_anisotropy_threshold", "mode", "aniso_axis_mode")}
    return {"force_separate_z": kwargs.get("force_separate_z"), "mode": "linear", "aniso_axis_mode": "nearest-exact"}


def segmentation_from_logits(
    logits: torch.Tensor | np.ndarray,
    properties: dict,
    spec,
    *,
    chunk_bytes: int = CHUNK_BYTES,
) -> np.ndarray:
    """The label map at the scan's geometry (nnU-Net's axis order before transpose, uncropped)."""
    from nnunetv2.preprocessing.resampling.resample_torch import resample_torch_fornnunet

    plans_manager, manager = spec.plans_manager, spec.configuration_manager
    logits = torch.as_tensor(logits)
    target_shape = [int(s) for s in properties["shape_after_cropping_and_before_resampling"]]
    spacing_transposed = [properties["spacing"][i] for i in plans_manager.transpose_forward]
    current_spacing = (manager.spacing if len(manager.spacing) == len(target_shape)
                       else [spacing_transposed[0], *manager.spacing])
    kwargs = _torch_resampling_kwargs(manager.configuration)
    classes = logits.shape[0]
    # Per class: its float32 map at the target shape, plus the in-plane-first intermediate of an
    # anisotropic resampling, which can be larger than either end (bounded by the larger axes).
    larger_axes = np.maximum(np.asarray(target_shape), np.asarray(logits.shape[1:]))
    per_class = 4 * (int(np.prod(target_shape)) + int(np.prod(larger_axes)))
    per_chunk = max(1, min(classes, chunk_bytes // per_class))
    best = torch.full(target_shape, -torch.inf, dtype=torch.float32)
    labels = torch.zeros(target_shape, dtype=torch.int16 if classes > 255 else torch.uint8)
    for start in range(0, classes, per_chunk):
        chunk = logits[start : start + per_chunk].float()
        if list(chunk.shape[1:]) != target_shape:
            chunk = resample_torch_fornnunet(chunk, target_shape, current_spacing, spacing_transposed, is_seg=False,
                                             num_threads=torch.get_num_threads(), **kwargs)
        chunk_max, chunk_arg = chunk.max(0)
        better = chunk_max > best  # strict: on a tie the lower class wins, as argmax does
        best = torch.where(better, chunk_max, best)
        labels = torch.where(better, (chunk_arg + start).to(labels.dtype), labels)
        del chunk, chunk_max, chunk_arg, better
    segmentation = np.zeros(properties["shape_before_cropping"],
                            dtype=np.uint8 if len(spec.label_manager.foreground_labels) < 255 else np.uint16)
    slicer = tuple(slice(int(lo), int(hi)) for lo, hi in properties["bbox_used_for_cropping"])
    segmentation[slicer] = labels.numpy()
    return segmentation.transpose(plans_manager.transpose_backward)


def export_segmentation(logits, properties: dict, spec, output_file_truncated: str) -> None:
    """Write the case's segmentation as stock's export would (same reader/writer, same geometry)."""
    segmentation = segmentation_from_logits(logits, properties, spec)
    writer = spec.plans_manager.image_reader_writer_class()
    writer.write_seg(segmentation, str(Path(output_file_truncated + spec.dataset_json["file_ending"])), properties)
