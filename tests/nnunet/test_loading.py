"""Model loading: same networks as nnU-Net's own predictor, and one sentence for every bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from factories import PLAIN, RESENC, make_model_folder

from tucker_export.cli import cli
from tucker_export.errors import (
    CheckpointError,
    ConfigurationError,
    ModelFolderError,
    TrainerNotFoundError,
)
from tucker_export.nnunet.checkpoint import load_checkpoint
from tucker_export.nnunet.loading import available_folds, load_trained_model


def _nnunet_predictor_logits(model_dir: Path, fold, x: torch.Tensor) -> torch.Tensor:
    """Logits of the network nnUNetPredictor itself builds and loads from the folder."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(device=torch.device("cpu"), verbose=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model_dir), use_folds=(fold,))
    predictor.network.load_state_dict(predictor.list_of_parameters[0])
    predictor.network.eval()
    with torch.no_grad():
        return predictor.network(x)


@pytest.mark.parametrize(
    "options",
    [
        {"architecture": PLAIN},
        {"architecture": RESENC},
        {"architecture": PLAIN, "dim": 2},
        {"strides": ((1, 1, 1), (1, 2, 2), (2, 2, 2)), "kernel_sizes": ((1, 3, 3), (3, 3, 3), (3, 3, 3))},
    ],
    ids=["plain3d", "resenc3d", "plain2d", "anisotropic"],
)
def test_networks_match_nnunet_predictor(tmp_path: Path, options: dict) -> None:
    model_dir = make_model_folder(tmp_path, folds=(0, 1), **options)
    loaded = load_trained_model(model_dir)
    assert loaded.folds == (0, 1)
    torch.manual_seed(0)
    x = torch.randn(1, 1, *loaded.spec.patch_size)
    for fold in loaded.folds:
        network = loaded.networks[fold]
        assert not network.training
        assert not network.decoder.deep_supervision
        with torch.no_grad():
            ours = network(x)
        torch.testing.assert_close(ours, _nnunet_predictor_logits(model_dir, fold, x), rtol=0, atol=0)
    # different folds really are different weights
    with torch.no_grad():
        assert not torch.equal(loaded.networks[0](x), loaded.networks[1](x))


def test_demo_model_matches_nnunet_predictor(demo_model) -> None:
    loaded = load_trained_model(demo_model.model_dir, folds=(demo_model.folds[0],))
    assert loaded.spec.trainer_name == "nnUNetTrainer_TuckerHN"
    assert loaded.spec.allowed_mirroring_axes is None  # left and right parotid: no flips
    torch.manual_seed(0)
    x = torch.randn(1, loaded.spec.num_input_channels, *loaded.spec.patch_size)
    with torch.no_grad():
        ours = loaded.networks[loaded.folds[0]](x)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("nnUNet_extTrainer", str(demo_model.trainer_search_path))
        theirs = _nnunet_predictor_logits(demo_model.model_dir, loaded.folds[0], x)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_spec_describes_inference(tmp_path: Path) -> None:
    model_dir = make_model_folder(tmp_path, num_labels=4)
    spec = load_trained_model(model_dir).spec
    assert spec.configuration_name == "3d_fullres"
    assert spec.num_segmentation_heads == 5
    assert spec.allowed_mirroring_axes == (0, 1, 2)
    assert spec.label_names[0] == "background" and spec.label_names[4] == "structure_4"


def test_fold_all_is_found(tmp_path: Path) -> None:
    model_dir = make_model_folder(tmp_path, folds=("all",))
    assert available_folds(model_dir) == ("all",)
    assert load_trained_model(model_dir).folds == ("all",)


# ---- bad input: one sentence each ------------------------------------------------------------


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelFolderError, match="does not exist"):
        load_trained_model(tmp_path / "nope")


def test_folder_that_is_not_nnunet(tmp_path: Path) -> None:
    (tmp_path / "fold_0").mkdir()
    with pytest.raises(ModelFolderError, match="no fold_N/checkpoint_final.pth"):
        load_trained_model(tmp_path)


def test_missing_fold(tmp_path: Path) -> None:
    model_dir = make_model_folder(tmp_path, folds=(0,))
    with pytest.raises(ModelFolderError, match=r"Fold 3 has no checkpoint .* \(folds with one: 0\)"):
        load_trained_model(model_dir, folds=[3])


def test_missing_plans(tmp_path: Path) -> None:
    model_dir = make_model_folder(tmp_path)
    (model_dir / "plans.json").unlink()
    with pytest.raises(ModelFolderError, match="has no plans.json"):
        load_trained_model(model_dir)


def test_plans_without_configuration(tmp_path: Path) -> None:
    model_dir = make_model_folder(tmp_path)
    with pytest.raises(ConfigurationError, match=r"no configuration '3d_lowres' \(available: 3d_fullres\)"):
        load_trained_model(model_dir, configuration="3d_lowres")


def test_unknown_trainer(tmp_path: Path) -> None:
    model_dir = make_model_folder(tmp_path)
    checkpoint_path = model_dir / "fold_0" / "checkpoint_final.pth"
    checkpoint = load_checkpoint(checkpoint_path)
    checkpoint["trainer_name"] = "nnUNetTrainer_DoesNotExist"
    torch.save(checkpoint, checkpoint_path)
    with pytest.raises(TrainerNotFoundError, match="'nnUNetTrainer_DoesNotExist' cannot be found"):
        load_trained_model(model_dir)


def test_keys_that_do_not_fit(tmp_path: Path) -> None:
    model_dir = make_model_folder(tmp_path, features=(8, 16, 32))
    plans = json.loads((model_dir / "plans.json").read_text())
    plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["features_per_stage"] = [8, 16, 24]
    (model_dir / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(CheckpointError, match="do not fit the network built from the plans"):
        load_trained_model(model_dir)


def test_truncated_checkpoint(tmp_path: Path) -> None:
    model_dir = make_model_folder(tmp_path)
    path = model_dir / "fold_0" / "checkpoint_final.pth"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_trained_model(model_dir)


class Payload:  # stands in for any class a hostile or exotic checkpoint could pickle
    pass


def test_unsafe_checkpoint_is_refused_unless_trusted(tmp_path: Path) -> None:
    model_dir = make_model_folder(tmp_path)
    path = model_dir / "fold_0" / "checkpoint_final.pth"
    checkpoint = load_checkpoint(path)
    checkpoint["extra"] = Payload()
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match=r"contains .*Payload.*; use trust_checkpoint=True"):
        load_trained_model(model_dir)
    assert load_trained_model(model_dir, trust_checkpoint=True).folds == (0,)


# ---- the CLI turns each into one sentence and exit 1 -------------------------------------------


@pytest.mark.parametrize(
    "breakage, expected",
    [
        ("missing_folder", "does not exist"),
        ("missing_fold", "Fold 5 has no checkpoint"),
        ("bad_trainer", "cannot be found"),
        ("bad_keys", "do not fit"),
    ],
)
def test_cli_bad_input_is_one_sentence(tmp_path: Path, breakage: str, expected: str) -> None:
    model_dir = make_model_folder(tmp_path)
    args = ["inspect", str(model_dir)]
    if breakage == "missing_folder":
        shutil.rmtree(model_dir)
    elif breakage == "missing_fold":
        args += ["-f", "5"]
    elif breakage == "bad_trainer":
        path = model_dir / "fold_0" / "checkpoint_final.pth"
        checkpoint = load_checkpoint(path)
        checkpoint["trainer_name"] = "NoSuchTrainer"
        torch.save(checkpoint, path)
    elif breakage == "bad_keys":
        path = model_dir / "fold_0" / "checkpoint_final.pth"
        checkpoint = load_checkpoint(path)
        checkpoint["network_weights"].pop(next(iter(checkpoint["network_weights"])))
        torch.save(checkpoint, path)
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1, result.output
    assert expected in result.output
    assert "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if line.startswith("Error:")]) == 1


def test_cli_inspect_summarises(tmp_path: Path) -> None:
    model_dir = make_model_folder(tmp_path, folds=(0, 1))
    result = CliRunner().invoke(cli, ["inspect", str(model_dir), "-f", "0,1"])
    assert result.exit_code == 0, result.output
    assert "PlainConvUNet" in result.output and "folds          0, 1" in result.output


def test_numpy_scalars_load_safely(tmp_path: Path) -> None:
    checkpoint = load_checkpoint(make_model_folder(tmp_path) / "fold_0" / "checkpoint_final.pth")
    assert isinstance(checkpoint["_best_ema"], np.floating)
