"""A short description of a trained model folder, for `tucker-export inspect`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tucker_export.nnunet.loading import Fold, load_trained_model


@dataclass(frozen=True)
class ModelSummary:
    model_dir: Path
    trainer_name: str
    plans_name: str
    configuration: str
    architecture: str
    folds: tuple[Fold, ...]
    patch_size: tuple[int, ...]
    num_input_channels: int
    num_segmentation_heads: int
    allowed_mirroring_axes: tuple[int, ...] | None
    parameters: int
    label_names: dict[int, str]


def summarize_model(
    model_dir: str | Path,
    *,
    folds: list[Fold] | None = None,
    checkpoint_name: str = "checkpoint_final.pth",
    trust_checkpoint: bool = False,
) -> ModelSummary:
    loaded = load_trained_model(model_dir, folds, checkpoint_name=checkpoint_name, trust_checkpoint=trust_checkpoint)
    spec = loaded.spec
    network = loaded.networks[loaded.folds[0]]
    return ModelSummary(
        model_dir=Path(model_dir),
        trainer_name=spec.trainer_name,
        plans_name=str(spec.plans.get("plans_name")),
        configuration=spec.configuration_name,
        architecture=type(network).__name__,
        folds=loaded.folds,
        patch_size=spec.patch_size,
        num_input_channels=spec.num_input_channels,
        num_segmentation_heads=spec.num_segmentation_heads,
        allowed_mirroring_axes=spec.allowed_mirroring_axes,
        parameters=sum(p.numel() for p in network.parameters()),
        label_names=spec.label_names,
    )


def format_model_summary(summary: ModelSummary) -> str:
    labels = ", ".join(f"{k}:{v}" for k, v in summary.label_names.items())
    return "\n".join(
        [
            f"model folder   {summary.model_dir}",
            f"trainer        {summary.trainer_name}",
            f"plans          {summary.plans_name} / {summary.configuration}",
            f"architecture   {summary.architecture}, {summary.parameters / 1e6:.2f} M parameters",
            f"folds          {', '.join(str(f) for f in summary.folds)}",
            f"patch size     {' x '.join(str(s) for s in summary.patch_size)}",
            f"input channels {summary.num_input_channels}",
            f"outputs        {summary.num_segmentation_heads}",
            f"mirroring axes {summary.allowed_mirroring_axes}",
            f"labels         {labels}",
        ]
    )
