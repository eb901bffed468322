"""nnUNetTrainer_TuckerDemo: a few-minutes CPU training recipe for tucker-export's demo phantoms.

nnU-Net imports this file itself (via ``nnUNet_extTrainer``) as a top-level module, both for training
and whenever a checkpoint trained with it is loaded for inference, so it depends on nnU-Net and torch
only. It changes the training *recipe* of the stock nnUNetTrainer, never the network: the architecture
is whatever the plans describe, built by nnU-Net's own ``build_network_architecture`` (inherited
unchanged), so inference needs nothing from this class beyond its name and its mirroring axes.

What differs from nnUNetTrainer, and why:

* 16 epochs of 40 iterations (the phantoms are easy, two CPU cores have a budget of minutes) and one
  validation batch per epoch (nnU-Net's pseudo Dice is only informative; the demo builder measures
  Dice on held-out cases with nnUNetPredictor);
* data augmentation reduced to left-right mirroring. Held-out phantoms come from the training
  generator, so rotation, scaling, blur, gamma and low-resolution simulation only slow a short
  training down; the phantoms have a head-feet and front-back anatomy but a random left-right
  layout, so left-right is the only valid flip. What the trainer allows is what nnU-Net's predictor
  mirrors at test time: 2 passes instead of 8;
* weight decay 2e-2 instead of 3e-5. With only a few hundred SGD steps the weights of the
  full-resolution layers otherwise stay dominated by their random initialisation, i.e. have a flat
  singular-value spectrum, and a Tucker decomposition (what tucker-export demonstrates) truncates
  the learned function along with the noise. Decay removes the unused random part (measured: at
  rank factor 0.3 the decomposed model agrees with the original at Dice ~0.95 instead of ~0.75, and
  the held-out Dice itself improves). 5e-2 and more collapse training to spine and lung only;
* no intermediate ``checkpoint_latest.pth``; ``checkpoint_final.pth`` and ``checkpoint_best.pth``
  are written as usual;
* nnU-Net's progress plot (a 30 x 54 inch matplotlib figure, seconds per call on a small CPU) is
  drawn once at the end of training instead of after every epoch;
* an optional ``progress_callback`` (called with 1 after each training iteration) so a caller that
  runs the trainer in-process can drive a progress bar.

Loss (Dice + CE with deep supervision), SGD with Nesterov momentum, initial learning rate and the
poly learning-rate schedule are nnU-Net's defaults.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform
from batchgeneratorsv2.transforms.utils.remove_label import RemoveLabelTansform
from nnunetv2.training.logging.nnunet_logger import MetaLogger
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class _PlotAtEndLogger(MetaLogger):
    """MetaLogger that skips the per-epoch progress plot until ``plot_enabled`` is set."""

    plot_enabled = False

    def plot_progress_png(self, output_folder: str) -> None:
        if self.plot_enabled:
            super().plot_progress_png(output_folder)


class nnUNetTrainer_TuckerDemo(nnUNetTrainer):
    #: The recipe; the demo builder reads the first two to size its progress bar.
    DEMO_NUM_EPOCHS = 16
    DEMO_ITERATIONS_PER_EPOCH = 40
    DEMO_VAL_ITERATIONS_PER_EPOCH = 1
    DEMO_WEIGHT_DECAY = 2e-2

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),  # noqa: B008 - nnU-Net's signature, which it introspects
    ) -> None:
        continue_training = bool(plans.get("continue_training", False))  # popped by super().__init__
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = self.DEMO_NUM_EPOCHS
        self.num_iterations_per_epoch = self.DEMO_ITERATIONS_PER_EPOCH
        self.num_val_iterations_per_epoch = self.DEMO_VAL_ITERATIONS_PER_EPOCH
        self.weight_decay = self.DEMO_WEIGHT_DECAY
        # Never write checkpoint_latest.pth mid-run: the run is too short for resuming to matter.
        self.save_every = self.num_epochs + 1
        # nnU-Net's logger, minus the expensive per-epoch plot (see module docstring).
        logger = _PlotAtEndLogger(self.output_folder, continue_training)
        logger.update_config(
            {"plans": plans, "configuration": configuration, "fold": fold, "dataset": dataset_json}
        )
        self.logger = logger
        self.progress_callback: Callable[[int], object] | None = None

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        """nnU-Net's settings, but mirroring only left-right and no rotation margin around the patch."""
        rotation_for_DA, do_dummy_2d_data_aug, _, _ = (
            super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        )
        # Left-right is the last axis of the raw (z, y, x) arrays; find it after nnU-Net's transpose.
        left_right = int(list(self.plans_manager.transpose_forward).index(2))
        mirror_axes = (left_right,)
        self.inference_allowed_mirroring_axes = mirror_axes
        # No spatial augmentation, so the sampled region needs no enlargement for rotations.
        initial_patch_size = np.asarray(self.configuration_manager.patch_size)
        return rotation_for_DA, do_dummy_2d_data_aug, initial_patch_size, mirror_axes

    @staticmethod
    def get_training_transforms(
        patch_size,
        rotation_for_DA,
        deep_supervision_scales,
        mirror_axes,
        do_dummy_2d_data_aug,
        use_mask_for_norm=None,
        is_cascaded=False,
        foreground_labels=None,
        regions=None,
        ignore_label=None,
    ) -> BasicTransform:
        """Mirroring plus nnU-Net's label bookkeeping; the data loader's random placement still shifts the body."""
        if is_cascaded or regions is not None or do_dummy_2d_data_aug:
            raise NotImplementedError("nnUNetTrainer_TuckerDemo supports plain 3D label training only")
        transforms: list[BasicTransform] = []
        if mirror_axes:
            transforms.append(MirrorTransform(allowed_axes=mirror_axes))
        transforms.append(RemoveLabelTansform(-1, 0))
        if deep_supervision_scales is not None:
            transforms.append(DownsampleSegForDSTransform(ds_scales=deep_supervision_scales))
        return ComposeTransforms(transforms)

    def train_step(self, batch: dict) -> dict:
        result = super().train_step(batch)
        if self.progress_callback is not None:
            self.progress_callback(1)
        return result

    def on_train_end(self) -> None:
        super().on_train_end()
        if isinstance(self.logger, _PlotAtEndLogger) and self.local_rank == 0:
            self.logger.plot_enabled = True
            self.logger.plot_progress_png(self.output_folder)
