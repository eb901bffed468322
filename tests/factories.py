"""Small nnU-Net v2 model folders with random weights, for tests of structure (not accuracy).

They have the layout, plans and checkpoint format nnU-Net writes, so the loader, the decomposer
and the exporter can be tested on every architecture nnU-Net builds (PlainConvUNet,
ResidualEncoderUNet; 2D and 3D; anisotropic strides) in a second. Accuracy tests use the trained
demo model instead: random kernels are full rank, so Tucker ranks mean nothing on them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

PLAIN = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
RESENC = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"


def make_plans(
    *,
    architecture: str = PLAIN,
    dim: int = 3,
    features: tuple[int, ...] = (8, 16, 32),
    strides: tuple[tuple[int, ...], ...] | None = None,
    kernel_sizes: tuple[tuple[int, ...], ...] | None = None,
    patch_size: tuple[int, ...] | None = None,
    configuration: str | None = None,
) -> dict[str, Any]:
    n_stages = len(features)
    strides = strides or tuple((1,) * dim if i == 0 else (2,) * dim for i in range(n_stages))
    kernel_sizes = kernel_sizes or tuple((3,) * dim for _ in range(n_stages))
    patch_size = patch_size or (16,) * dim
    configuration = configuration or ("3d_fullres" if dim == 3 else "2d")
    conv = "torch.nn.modules.conv.Conv3d" if dim == 3 else "torch.nn.modules.conv.Conv2d"
    norm = "torch.nn.modules.instancenorm.InstanceNorm3d" if dim == 3 else "torch.nn.modules.instancenorm.InstanceNorm2d"
    blocks_key = "n_blocks_per_stage" if architecture == RESENC else "n_conv_per_stage"
    blocks = [1] + [2] * (n_stages - 1) if architecture == RESENC else [2] * n_stages
    arch_kwargs = {
        "n_stages": n_stages,
        "features_per_stage": list(features),
        "conv_op": conv,
        "kernel_sizes": [list(k) for k in kernel_sizes],
        "strides": [list(s) for s in strides],
        blocks_key: blocks,
        "n_conv_per_stage_decoder": [2] * (n_stages - 1),
        "conv_bias": True,
        "norm_op": norm,
        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    }
    config = {
        "data_identifier": f"nnUNetPlans_{configuration}",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 2,
        "patch_size": list(patch_size),
        "median_image_size_in_voxels": [32] * dim,
        "spacing": [1.0] * dim,
        "normalization_schemes": ["CTNormalization"],
        "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
        "architecture": {
            "network_class_name": architecture,
            "arch_kwargs": arch_kwargs,
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
        },
        "batch_dice": False,
    }
    return {
        "dataset_name": "Dataset900_Factory",
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [1.0] * 3,
        "original_median_shape_after_transp": [32] * 3,
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {configuration: config},
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            "0": {"max": 1000.0, "mean": 50.0, "median": 45.0, "min": -1000.0,
                  "percentile_00_5": -900.0, "percentile_99_5": 900.0, "std": 200.0}
        },
    }


def make_dataset_json(num_labels: int = 3, channels: int = 1) -> dict[str, Any]:
    labels = {"background": 0, **{f"structure_{i}": i for i in range(1, num_labels + 1)}}
    return {
        "channel_names": {str(c): "CT" for c in range(channels)},
        "labels": labels,
        "numTraining": 4,
        "file_ending": ".nii.gz",
    }


def make_model_folder(
    root: Path,
    *,
    folds: tuple[int | str, ...] = (0,),
    trainer_name: str = "nnUNetTrainer",
    num_labels: int = 3,
    channels: int = 1,
    seed: int = 0,
    **plan_options: Any,
) -> Path:
    """Write ``root/<trainer>__nnUNetPlans__<configuration>`` with a random-weight checkpoint per fold."""
    from tucker_export.nnunet.loading import build_network, load_model_spec

    plans = make_plans(**plan_options)
    configuration = next(iter(plans["configurations"]))
    dataset_json = make_dataset_json(num_labels, channels)
    model_dir = root / f"{trainer_name}__nnUNetPlans__{configuration}"
    model_dir.mkdir(parents=True)
    (model_dir / "plans.json").write_text(json.dumps(plans, indent=2))
    (model_dir / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    spec = load_model_spec(model_dir, configuration=configuration, trainer_name=trainer_name)
    for index, fold in enumerate(folds):
        torch.manual_seed(seed + index)
        network = build_network(spec)
        checkpoint = {
            "network_weights": network.state_dict(),
            "optimizer_state": {"state": {}, "param_groups": [{"lr": 0.01, "momentum": 0.99}]},
            "grad_scaler_state": None,
            # nnU-Net's logger stores numpy scalars: the safe loader must accept them
            "logging": {"mean_fg_dice": [np.float64(0.5)], "ema_fg_dice": [np.float32(0.4)], "epoch_end_timestamps": [1.0]},
            "_best_ema": np.float64(0.4),
            "current_epoch": 1,
            "init_args": {
                "plans": plans,
                "configuration": configuration,
                "fold": fold,
                "dataset_json": dataset_json,
                "device": torch.device("cpu"),
            },
            "trainer_name": trainer_name,
            "inference_allowed_mirroring_axes": tuple(range(len(plans["configurations"][configuration]["patch_size"]))),
        }
        (model_dir / f"fold_{fold}").mkdir()
        torch.save(checkpoint, model_dir / f"fold_{fold}" / "checkpoint_final.pth")
    return model_dir


def write_ct(path: Path, shape=(20, 30, 25), spacing=(1.2, 1.0, 1.5), seed: int = 0, dtype=np.int16):
    """A CT-like phantom with a non-trivial geometry (origin, axis swap) written with SimpleITK."""
    import SimpleITK as sitk

    rng = np.random.default_rng(seed)
    image = sitk.GetImageFromArray(rng.normal(0, 300, shape).astype(dtype))
    image.SetSpacing(spacing)
    image.SetOrigin((10.0, -5.0, 3.0))
    image.SetDirection((0, 1, 0, 1, 0, 0, 0, 0, 1))
    sitk.WriteImage(image, str(path))
    return image


def write_dicom_series(
    folder: Path,
    volume: np.ndarray,
    spacing=(1.0, 1.2, 1.5),
    *,
    modality: str = "CT",
    series_uid: str = "1.2.826.0.1.3680043.2.1125.1",
    skip_slices: tuple[int, ...] = (),
) -> None:
    """One slice per file, written in shuffled file-name order: readers must order them by position.

    ``skip_slices``: slice indices not written (a series with slices lost in transfer).
    """
    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    order = np.random.default_rng(0).permutation(volume.shape[0])
    for file_index, z in enumerate(order):
        if int(z) in skip_slices:
            continue
        slice_image = sitk.GetImageFromArray(volume[z : z + 1])
        slice_image.SetSpacing(spacing)
        slice_image.SetOrigin((0.0, 0.0, float(z) * spacing[2]))
        for tag, value in {
            "0008|0060": modality,
            "0020|000e": series_uid,
            "0020|000d": "1.2.826.0.1.3680043.2.1125.2",
            "0020|0032": f"0\\0\\{z * spacing[2]}",
            "0020|0013": str(file_index),
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0028|0030": f"{spacing[1]}\\{spacing[0]}",
            "0018|0050": str(spacing[2]),
        }.items():
            slice_image.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{series_uid[-4:]}_slice_{file_index:03d}.dcm"))
        writer.Execute(slice_image)


def decomposed_demo_bundle(demo_model, root: Path, *, rank_factor: float = 0.3, folds=(0,)) -> Path:
    """The trained demo model decomposed at ``rank_factor`` and exported to fp32 ONNX, in ``root/bundle``."""
    from tucker_export.exporter.decompose import decompose_model
    from tucker_export.exporter.onnx_export import export_bundle
    from tucker_export.exporter.ranks import RankPolicy

    bundle = decompose_model(demo_model.model_dir, root / "bundle", policy=RankPolicy(factor=rank_factor),
                             progress=False, folds=list(folds))
    export_bundle(bundle, precisions=("fp32",), progress=False)
    return bundle.path


def crop_demo_patients(demo_model, root: Path, *, patients: int = 4, size: int = 64):
    """The demo model with its test patients cropped to ``size``^3 voxels around their contours.

    The shipped patients are 128^3 voxels, 27 sliding-window tiles each at the model's 64^3 patch; a 64^3
    crop is one tile, so a test that segments real anatomy runs in a fraction of the time. Crops keep the
    scans' spacing and move the origin, as a smaller field of view from the scanner would.
    """
    import dataclasses

    import nibabel as nib
    import numpy as np

    images, labels = root / "imagesTs", root / "labelsTs"
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    for label_path in sorted(demo_model.test_labels_dir.glob("*.nii.gz"))[:patients]:
        case = label_path.name[: -len(".nii.gz")]
        label_image = nib.load(str(label_path))
        image = nib.load(str(demo_model.test_images_dir / f"{case}_0000.nii.gz"))
        label_array = np.asarray(label_image.dataobj)
        centre = np.argwhere(label_array > 0).mean(axis=0).round().astype(int)
        start = [int(np.clip(c - size // 2, 0, n - size)) for c, n in zip(centre, label_array.shape)]
        window = tuple(slice(s, s + size) for s in start)
        affine = image.affine.copy()
        affine[:3, 3] = image.affine[:3, :3] @ np.asarray(start) + image.affine[:3, 3]
        nib.save(nib.Nifti1Image(np.asarray(image.dataobj)[window], affine, image.header),
                 str(images / f"{case}_0000.nii.gz"))
        nib.save(nib.Nifti1Image(label_array[window], affine, label_image.header), str(labels / f"{case}.nii.gz"))
    return dataclasses.replace(demo_model, test_images_dir=images, test_labels_dir=labels)
