"""Load trained nnU-Net v2 model folders the way nnU-Net itself does, minus the unsafe pickle.

A trained model folder is nnU-Net's ``<Trainer>__<Plans>__<configuration>`` directory holding
``dataset.json``, ``plans.json`` and ``fold_N/checkpoint_final.pth``. The network is built by the
trainer class named in the checkpoint (``build_network_architecture``), exactly as
``nnUNetPredictor.initialize_from_trained_model_folder`` does, so every architecture nnU-Net can
build (PlainConvUNet, ResidualEncoderUNet, custom trainers) loads here too.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tucker_export.errors import (
    CheckpointError,
    ConfigurationError,
    ModelFolderError,
    TrainerNotFoundError,
)
from tucker_export.nnunet.checkpoint import load_checkpoint

if TYPE_CHECKING:
    import torch
    from nnunetv2.utilities.label_handling.label_handling import LabelManager
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

logger = logging.getLogger(__name__)

Fold = int | str
DEFAULT_CHECKPOINT = "checkpoint_final.pth"

# Trainers tucker-export ships (the demo's) are found without the user setting nnUNet_extTrainer.
BUILTIN_TRAINER_PATHS: tuple[Path, ...] = (Path(__file__).resolve().parent.parent / "demo" / "trainers",)


@dataclass
class ModelSpec:
    """Everything about an nnU-Net model except its weights: enough to build networks and run inference."""

    model_dir: Path
    trainer_name: str
    configuration_name: str
    plans: dict[str, Any]
    dataset_json: dict[str, Any]
    plans_manager: PlansManager
    configuration_manager: ConfigurationManager
    num_input_channels: int
    num_segmentation_heads: int
    allowed_mirroring_axes: tuple[int, ...] | None
    _trainer_class: type | None = field(default=None, repr=False)

    @property
    def trainer_class(self) -> type:
        """Resolved on first use: engines and preprocessing need no trainer, only PyTorch networks do."""
        if self._trainer_class is None:
            self._trainer_class = find_trainer_class(self.trainer_name)
        return self._trainer_class

    @property
    def patch_size(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.configuration_manager.patch_size)

    @property
    def label_manager(self) -> LabelManager:
        return self.plans_manager.get_label_manager(self.dataset_json)

    @property
    def label_names(self) -> dict[int, str]:
        """Label id -> structure name (regions are named by their first label)."""
        names: dict[int, str] = {}
        for name, value in self.dataset_json["labels"].items():
            label = value[0] if isinstance(value, (list, tuple)) else value
            names[int(label)] = name
        return dict(sorted(names.items()))

    def build_network(self) -> torch.nn.Module:
        """A fresh network (random init, deep supervision off, eval mode) as the trainer builds it."""
        return build_network(self)


@dataclass
class LoadedModel:
    """A trained model: its spec plus one eval-mode network and state dict per requested fold."""

    spec: ModelSpec
    folds: tuple[Fold, ...]
    networks: dict[Fold, torch.nn.Module] = field(repr=False)
    state_dicts: dict[Fold, dict[str, torch.Tensor]] = field(repr=False)
    checkpoint_paths: dict[Fold, Path] = field(default_factory=dict)


def parse_fold(fold: Fold) -> Fold:
    """nnU-Net folds are integers or the string 'all'."""
    if isinstance(fold, int) or fold == "all":
        return fold
    try:
        return int(fold)
    except (TypeError, ValueError):
        raise ModelFolderError(f"Fold {fold!r} is not a fold number or 'all'.") from None


def available_folds(model_dir: str | Path, checkpoint_name: str = DEFAULT_CHECKPOINT) -> tuple[Fold, ...]:
    """The folds that have ``checkpoint_name``, numbered folds first (like nnU-Net's auto-detection)."""
    model_dir = Path(model_dir)
    folds: list[Fold] = []
    for child in sorted(model_dir.glob("fold_*")):
        if (child / checkpoint_name).is_file():
            folds.append(parse_fold(child.name.removeprefix("fold_")))
    numbered = sorted(f for f in folds if isinstance(f, int))
    return tuple(numbered) if numbered else tuple(f for f in folds if f == "all")


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelFolderError(
            f"{path.parent} is not an nnU-Net trained model folder: it has no {path.name} ({what})."
        ) from None
    except json.JSONDecodeError as error:
        raise ModelFolderError(f"{path} is not valid JSON ({error.msg} at line {error.lineno}).") from None


def find_trainer_class(trainer_name: str, extra_search_paths: tuple[Path, ...] = ()) -> type:
    """Find a trainer class the way nnU-Net does, then in tucker-export's own trainer folders.

    nnU-Net searches its own package and the folders in ``nnUNet_extTrainer``; we add our
    built-in trainers so the demo model loads without any environment set-up.
    """
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    # nnU-Net narrates its search on stdout; keep stdout for our own results.
    with contextlib.redirect_stdout(io.StringIO()):
        # nnU-Net's search imports every trainer module of its package (timm, torchvision, ...)
        # before it looks elsewhere; a trainer that lives in a module of its own name in one of
        # our folders is found without that detour (seconds of start-up saved per command).
        for folder in (*extra_search_paths, *BUILTIN_TRAINER_PATHS):
            if (folder / f"{trainer_name}.py").is_file():
                found = recursive_find_python_class(
                    str(folder), trainer_name, None, base_folder=str(folder), cleanup_imports_from_base_folder=True
                )
                if found is not None and issubclass(found, nnUNetTrainer):
                    return found
        try:
            return recursive_find_trainer_class_by_name(trainer_name)
        except (RuntimeError, AssertionError):
            pass
        for folder in (*extra_search_paths, *BUILTIN_TRAINER_PATHS):
            if not folder.is_dir():
                continue
            found = recursive_find_python_class(
                str(folder), trainer_name, None, base_folder=str(folder), cleanup_imports_from_base_folder=True
            )
            if found is not None and issubclass(found, nnUNetTrainer):
                return found
    raise TrainerNotFoundError(
        f"Trainer class {trainer_name!r} cannot be found in nnunetv2 or nnUNet_extTrainer; "
        f"install the package that defines it or point nnUNet_extTrainer at its folder."
    )


def load_model_spec(
    model_dir: str | Path,
    *,
    configuration: str | None = None,
    checkpoint: dict[str, Any] | None = None,
    trainer_name: str | None = None,
    allowed_mirroring_axes: tuple[int, ...] | None = None,
) -> ModelSpec:
    """Read plans, dataset.json and trainer information of a trained model folder.

    The configuration and trainer come from the checkpoint (as nnU-Net does) unless given.
    """
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelFolderError(f"Model folder {model_dir} does not exist.")
    dataset_json = _read_json(model_dir / "dataset.json", "the dataset description")
    plans = _read_json(model_dir / "plans.json", "nnU-Net's plans")
    if "configurations" not in plans or "labels" not in dataset_json:
        raise ModelFolderError(
            f"{model_dir} does not hold nnU-Net v2 plans.json/dataset.json (missing 'configurations' or 'labels')."
        )
    if checkpoint is not None:
        trainer_name = trainer_name or checkpoint.get("trainer_name")
        configuration = configuration or checkpoint.get("init_args", {}).get("configuration")
    if configuration is None or trainer_name is None:
        folder_parts = model_dir.name.split("__")
        if len(folder_parts) == 3:
            trainer_name = trainer_name or folder_parts[0]
            configuration = configuration or folder_parts[2]
    if configuration is None or trainer_name is None:
        raise ModelFolderError(
            f"Cannot tell the trainer and configuration of {model_dir}: no checkpoint and the folder "
            f"name is not nnU-Net's '<Trainer>__<Plans>__<configuration>'."
        )
    if configuration not in plans["configurations"]:
        available = ", ".join(sorted(plans["configurations"]))
        raise ConfigurationError(
            f"The plans in {model_dir} have no configuration {configuration!r} (available: {available})."
        )
    plans_manager = PlansManager(plans)
    configuration_manager = plans_manager.get_configuration(configuration)
    mirroring = allowed_mirroring_axes
    if checkpoint is not None and mirroring is None:
        mirroring = checkpoint.get("inference_allowed_mirroring_axes")
    return ModelSpec(
        model_dir=model_dir,
        trainer_name=trainer_name,
        configuration_name=configuration,
        plans=plans,
        dataset_json=dataset_json,
        plans_manager=plans_manager,
        configuration_manager=configuration_manager,
        num_input_channels=determine_num_input_channels(plans_manager, configuration_manager, dataset_json),
        num_segmentation_heads=plans_manager.get_label_manager(dataset_json).num_segmentation_heads,
        allowed_mirroring_axes=tuple(mirroring) if mirroring is not None else None,
    )


def build_network(spec: ModelSpec) -> torch.nn.Module:
    """Build the network with the trainer's own ``build_network_architecture`` (deep supervision off)."""
    builder = spec.trainer_class.build_network_architecture
    if "plans_manager" in inspect.signature(builder).parameters:
        network = builder(
            spec.plans_manager,
            spec.configuration_manager,
            spec.num_input_channels,
            spec.num_segmentation_heads,
            enable_deep_supervision=False,
        )
    else:  # trainers written for nnU-Net < 2.6
        network = builder(
            spec.configuration_manager.network_arch_class_name,
            spec.configuration_manager.network_arch_init_kwargs,
            spec.configuration_manager.network_arch_init_kwargs_req_import,
            spec.num_input_channels,
            spec.num_segmentation_heads,
            enable_deep_supervision=False,
        )
    return network.eval()


def load_state_dict_checked(network: torch.nn.Module, state_dict: dict[str, Any], source: str | Path) -> None:
    """``load_state_dict(strict=True)`` with a one-sentence error naming missing/unexpected keys."""
    own = set(network.state_dict().keys())
    given = set(state_dict.keys())
    missing, unexpected = sorted(own - given), sorted(given - own)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]!r})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]!r})")
        raise CheckpointError(
            f"The weights in {source} do not fit the network built from the plans: keys "
            f"{' and '.join(parts)}; check that the checkpoint belongs to this plans.json and trainer."
        )
    try:
        network.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        detail = next((line.strip() for line in str(error).splitlines() if "size mismatch" in line), str(error))
        raise CheckpointError(
            f"The weights in {source} do not fit the network built from the plans ({detail})."
        ) from None


def load_trained_model(
    model_dir: str | Path,
    folds: tuple[Fold, ...] | list[Fold] | None = None,
    *,
    checkpoint_name: str = DEFAULT_CHECKPOINT,
    configuration: str | None = None,
    trust_checkpoint: bool = False,
) -> LoadedModel:
    """Load one eval-mode network per fold from an nnU-Net v2 trained model folder.

    ``folds=None`` takes every fold with a checkpoint. Networks are on the CPU in fp32.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelFolderError(f"Model folder {model_dir} does not exist.")
    if folds is None:
        folds = available_folds(model_dir, checkpoint_name)
        if not folds:
            raise ModelFolderError(
                f"{model_dir} has no fold_N/{checkpoint_name}; is it an nnU-Net trained model folder "
                f"(the one named <Trainer>__<Plans>__<configuration>)?"
            )
    folds = tuple(parse_fold(f) for f in folds)
    checkpoint_paths: dict[Fold, Path] = {}
    for fold in folds:
        path = model_dir / f"fold_{fold}" / checkpoint_name
        if not path.is_file():
            have = ", ".join(str(f) for f in available_folds(model_dir, checkpoint_name)) or "none"
            raise ModelFolderError(f"Fold {fold} has no checkpoint {path} (folds with one: {have}).")
        checkpoint_paths[fold] = path

    networks: dict[Fold, torch.nn.Module] = {}
    state_dicts: dict[Fold, dict[str, Any]] = {}
    spec: ModelSpec | None = None
    for fold, path in checkpoint_paths.items():
        checkpoint = load_checkpoint(path, trust_checkpoint=trust_checkpoint)
        if spec is None:
            spec = load_model_spec(model_dir, configuration=configuration, checkpoint=checkpoint)
        spec.trainer_class  # noqa: B018 - fail on a missing trainer before building anything
        network = spec.build_network()
        load_state_dict_checked(network, checkpoint["network_weights"], path)
        networks[fold] = network.eval()
        state_dicts[fold] = checkpoint["network_weights"]
        logger.debug("Loaded fold %s from %s", fold, path)
    assert spec is not None  # folds is non-empty here
    return LoadedModel(
        spec=spec, folds=folds, networks=networks, state_dicts=state_dicts, checkpoint_paths=checkpoint_paths
    )
