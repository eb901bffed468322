"""nnUNetTrainer_TuckerHN: a CPU-budget training recipe for the shipped head-and-neck CT model.

nnU-Net imports this file itself (via ``nnUNet_extTrainer``) as a top-level module, both for training
and whenever a checkpoint trained with it is loaded for inference, so it depends on nnU-Net and torch
only. It changes the training *recipe* of the stock nnUNetTrainer, never the network: the architecture
is whatever the plans describe, built by nnU-Net's own ``build_network_architecture`` (inherited
unchanged), so inference needs nothing from this class beyond its name and its mirroring axes.

What differs from nnUNetTrainer, and why:

* a short schedule (``HN_NUM_EPOCHS`` x ``HN_ITERATIONS_PER_EPOCH``) and a few validation batches per
  epoch: two CPU cores have a budget of about an hour, and the recipe measures Dice on held-out
  patients with ``nnUNetPredictor`` after training anyway;
* **no mirroring, in training or at test time.** The data set has a left and a right parotid; a
  left-right flip turns one into the other, so nnU-Net's default flips (every axis) would teach the
  network to confuse them and its test-time mirroring would average them together. Flips along the
  other axes would show anatomy upside down or back to front, which no scan does. So
  ``inference_allowed_mirroring_axes`` is ``None`` and ``nnUNetPredictor`` runs one pass per tile.
  The rest of nnU-Net's augmentation (rotation, scaling, noise, blur, brightness, contrast, low
  resolution, gamma) is kept;
* bf16 autocast for the network's forward pass where the CPU computes bf16 natively (AVX512-BF16 or
  AMX; the build records which), with the loss computed in fp32 on the outputs cast back. The weights
  and the optimizer stay fp32, so the checkpoint is an ordinary fp32 one. On such a CPU a step is
  about 3x faster; elsewhere training runs in fp32;
* a step whose loss or gradient norm is not finite is skipped and counted (``skipped_steps``): nnU-Net
  clips the gradient norm, and clipping a non-finite norm writes NaN into every weight. That is how
  the first runs of this recipe died, with weight decay 1e-2 and then 3e-3: under InstanceNorm the
  decay shrank some convolutions to a norm of 0.08 (about 1e-4 per weight), their gradients grow as the
  inverse of that norm, and one step overflowed. Weight decay is therefore nnU-Net's own 3e-5, set
  on the optimizer also when a run resumes (a checkpoint carries its own);
* a checkpoint every ``HN_SAVE_EVERY`` epochs (``checkpoint_latest.pth``, resumable), and nnU-Net's
  progress plot (a 30 x 54 inch figure, seconds per call on a small CPU) drawn once at the end;
* an optional ``progress_callback`` (called with 1 after each training iteration) so a caller that
  runs the trainer in-process can drive a progress bar.

Loss (Dice + CE with deep supervision), SGD with Nesterov momentum, initial learning rate and the
poly learning-rate schedule are nnU-Net's defaults.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from nnunetv2.training.logging.nnunet_logger import MetaLogger
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class _PlotAtEndLogger(MetaLogger):
    """MetaLogger that skips the per-epoch progress plot until ``plot_enabled`` is set."""

    plot_enabled = False

    def plot_progress_png(self, output_folder: str) -> None:
        if self.plot_enabled:
            super().plot_progress_png(output_folder)


def cpu_has_native_bf16() -> bool:
    """True where oneDNN runs bf16 convolutions in hardware (AVX512-BF16 or AMX), not emulated."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - torch built without oneDNN
        return False


class nnUNetTrainer_TuckerHN(nnUNetTrainer):
    #: The recipe; the build reads these to size its progress bar and to record what it ran.
    HN_NUM_EPOCHS = 12
    HN_ITERATIONS_PER_EPOCH = 250
    HN_VAL_ITERATIONS_PER_EPOCH = 5
    HN_WEIGHT_DECAY = 3e-5
    HN_SAVE_EVERY = 2

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
        self.num_epochs = self.HN_NUM_EPOCHS
        self.num_iterations_per_epoch = self.HN_ITERATIONS_PER_EPOCH
        self.num_val_iterations_per_epoch = self.HN_VAL_ITERATIONS_PER_EPOCH
        self.weight_decay = self.HN_WEIGHT_DECAY
        self.save_every = self.HN_SAVE_EVERY
        self.use_bf16_autocast = self.device.type == "cpu" and cpu_has_native_bf16()
        logger = _PlotAtEndLogger(self.output_folder, continue_training)
        logger.update_config(
            {"plans": plans, "configuration": configuration, "fold": fold, "dataset": dataset_json}
        )
        self.logger = logger
        self.progress_callback: Callable[[int], object] | None = None
        self.skipped_steps = 0

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        """nnU-Net's rotation and patch settings, with mirroring switched off (see the module docstring)."""
        rotation_for_DA, do_dummy_2d_data_aug, initial_patch_size, _ = (
            super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        )
        self.inference_allowed_mirroring_axes = None
        return rotation_for_DA, do_dummy_2d_data_aug, initial_patch_size, None

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.use_bf16_autocast:
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _forward(self, data: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """The network under bf16 autocast (where native), its outputs back in fp32 for the loss."""
        with self._autocast():
            output = self.network(data)
        if isinstance(output, (list, tuple)):
            return [o.float() for o in output]
        return output.float()

    def on_train_start(self) -> None:
        super().on_train_start()
        for group in self.optimizer.param_groups:
            group["weight_decay"] = self.weight_decay

    def train_step(self, batch: dict) -> dict:
        data = batch["data"].to(self.device)
        target = batch["target"]
        target = [t.to(self.device) for t in target] if isinstance(target, list) else target.to(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(self._forward(data), target)
        grad_norm = torch.tensor(float("nan"))
        if torch.isfinite(loss):
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)  # nnU-Net's clipping
        if torch.isfinite(grad_norm):
            self.optimizer.step()
        else:
            # A non-finite gradient would make clipping write NaN into every weight.
            self.skipped_steps += 1
            self.print_to_log_file(f"non-finite loss {loss.item()} or gradient norm {grad_norm.item()}; step skipped "
                                   f"({self.skipped_steps} so far)")
        if self.progress_callback is not None:
            self.progress_callback(1)
        return {"loss": loss.detach().cpu().numpy()}

    def validation_step(self, batch: dict) -> dict:
        # nnU-Net's validation step calls self.network itself; autocast covers it, outputs are only compared.
        with self._autocast():
            return super().validation_step(batch)

    def on_train_end(self) -> None:
        super().on_train_end()
        if isinstance(self.logger, _PlotAtEndLogger) and self.local_rank == 0:
            self.logger.plot_enabled = True
            self.logger.plot_progress_png(self.output_folder)
