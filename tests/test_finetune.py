"""Distillation fine-tuning: the pieces on toy tensors, the command on the trained demo model."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from factories import decomposed_demo_bundle

from tucker_export.cli import cli
from tucker_export.errors import BundleError, ConfigurationError
from tucker_export.finetune import (
    FinetuneSettings,
    agreement,
    distillation_loss,
    finetune_bundle,
    trainable_parameters,
)

# ---- pieces -----------------------------------------------------------------------------------


def test_distillation_loss_is_zero_for_the_teacher_itself_and_positive_otherwise():
    generator = torch.Generator().manual_seed(0)
    teacher = torch.randn(2, 4, 3, 3, 3, generator=generator)
    assert distillation_loss(teacher, teacher).item() == pytest.approx(0.0, abs=1e-6)
    assert distillation_loss(torch.randn(2, 4, 3, 3, 3, generator=generator), teacher).item() > 0.01


def test_agreement_counts_argmax_and_dice_per_class_the_teacher_predicts():
    teacher = torch.zeros(1, 3, 2, 2, 2)
    teacher[:, 1, 0] = 5.0  # class 1 on the first half, class 0 elsewhere; class 2 never
    student = teacher.clone()
    student[:, 1, 0, 0, 0] = -5.0  # one voxel of class 1 missed
    result = agreement(student, teacher, num_classes=3)
    assert result.argmax_agreement == pytest.approx(7 / 8)
    assert set(result.dice_per_class) == {"1"}
    assert result.dice_per_class["1"] == pytest.approx(2 * 3 / (4 + 3))


def test_only_tucker_layers_train_unless_norms_are_asked_for():
    from tucker_export.exporter.tucker import TuckerConv

    network = torch.nn.Sequential(torch.nn.Conv3d(1, 8, 1), TuckerConv(torch.nn.Conv3d(8, 8, 3, padding=1), 4, 4),
                                  torch.nn.InstanceNorm3d(8, affine=True))
    chosen = trainable_parameters(network, train_norms=False)
    assert sum(p.numel() for p in chosen) == sum(p.numel() for m in network.modules() if isinstance(m, TuckerConv)
                                                 for p in m.parameters())
    assert not any(p.requires_grad for p in network[0].parameters())
    assert not any(p.requires_grad for p in network[2].parameters())
    with_norms = trainable_parameters(network, train_norms=True)
    assert len(with_norms) == len(chosen) + 2


@pytest.mark.parametrize("change", [{"steps": 0}, {"lr": 0.0}, {"lr": 2.0}, {"batch_size": 0}, {"max_minutes": -1.0}])
def test_unusable_settings_name_the_rule(change):
    with pytest.raises(ConfigurationError, match="must be"):
        FinetuneSettings(**change).validate()


# ---- on the trained demo model -------------------------------------------------------------------


QUICK = FinetuneSettings(steps=4, eval_every=2, train_tiles=6, held_out_tiles=2, batch_size=2, seed=3)


@pytest.fixture(scope="module")
def demo_bundle(demo_model, tmp_path_factory) -> Path:
    return decomposed_demo_bundle(demo_model, tmp_path_factory.mktemp("finetune"), rank_factor=0.1)


@pytest.fixture(scope="module")
def unlabeled_scans(demo_model, tmp_path_factory) -> Path:
    """Three of the demo's training images (label-free), from the demo cache's imagesTr."""
    images = demo_model.ensure_training_images()
    assert images == demo_model.root / "imagesTr"
    assert not list(images.glob("phantom_???.nii.gz"))  # images only: no label maps beside them
    folder = tmp_path_factory.mktemp("scans")
    for path in sorted(images.glob("*_0000.nii.gz"))[:3]:
        shutil.copy(path, folder / path.name)
    return folder


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_seeded_runs_are_reproducible_and_recorded(demo_bundle, unlabeled_scans, tmp_path):
    first = finetune_bundle(demo_bundle, unlabeled_scans, output=tmp_path / "a", settings=QUICK)
    second = finetune_bundle(demo_bundle, unlabeled_scans, output=tmp_path / "b", settings=QUICK)
    assert [f.history for f in first.folds] == [f.history for f in second.folds]
    manifest_a = json.loads((tmp_path / "a" / "bundle.json").read_text())
    manifest_b = json.loads((tmp_path / "b" / "bundle.json").read_text())
    assert manifest_a["folds"]["0"]["weights"] == manifest_b["folds"]["0"]["weights"]
    record = manifest_a["finetuning"][-1]
    assert record["teacher"]["checksum"] == manifest_a["source"]["checksum"]
    assert record["scans"]["seed"] == 3 and record["scans"]["train_tiles"] + record["scans"]["held_out_tiles"] == 8
    assert record["settings"]["steps"] == 4
    fold = record["folds"]["0"]
    assert fold["after"]["mean_dice"] >= fold["before"]["mean_dice"]  # the best state is kept, never a worse one


@pytest.mark.slow
def test_new_weights_refuse_the_old_onnx_until_re_exported(demo_bundle, unlabeled_scans, tmp_path):
    from tucker_export.bundle import Bundle
    from tucker_export.exporter.onnx_export import export_bundle

    settings = FinetuneSettings(steps=20, eval_every=5, train_tiles=8, held_out_tiles=2, seed=0, lr=1e-3)
    report = finetune_bundle(demo_bundle, unlabeled_scans, output=tmp_path / "tuned", settings=settings)
    if not report.improved:
        pytest.skip("no step improved on this seed; nothing was rewritten")
    tuned = Bundle.load(tmp_path / "tuned")
    with pytest.raises(BundleError, match="exported from other weights.*tucker-export export"):
        tuned.onnx_entry(0, "fp32")
    result = CliRunner().invoke(cli, ["infer", "-i", str(unlabeled_scans), "-o", str(tmp_path / "seg"),
                                      "-b", str(tuned.path), "--backend", "ort", "--disable-tta"])
    assert result.exit_code == 1
    assert "exported from other weights" in result.output and "Traceback" not in result.output
    export_bundle(tuned, precisions=("fp32",), progress=False)
    assert Bundle.load(tuned.path).onnx_entry(0, "fp32")["weights_sha256"] == tuned.manifest["folds"]["0"]["weights"]["sha256"]


@pytest.mark.slow
def test_ctrl_c_leaves_the_bundle_as_it_was(demo_bundle, unlabeled_scans, monkeypatch, tmp_path):
    import tucker_export.finetune as finetune

    bundle = Path(shutil.copytree(demo_bundle, tmp_path / "bundle"))
    before = _hashes(bundle)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(finetune, "distill_fold", interrupted)
    with pytest.raises(KeyboardInterrupt):
        finetune_bundle(bundle, unlabeled_scans, settings=QUICK)  # in place
    assert _hashes(bundle) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no staging folder left behind


@pytest.mark.slow
def test_bad_input_gives_one_sentence_and_exit_1(demo_bundle, unlabeled_scans, tmp_path):
    from factories import write_ct

    runner = CliRunner()

    def run(*args):
        result = runner.invoke(cli, ["finetune", *map(str, args), "--steps", "2", "--tiles", "4", "--held-out-tiles", "2"])
        assert result.exit_code == 1, result.output
        assert "Traceback" not in result.output
        return result.output

    assert "does not exist" in run(demo_bundle, "-i", tmp_path / "nowhere", "-o", tmp_path / "x")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "holds no" in run(demo_bundle, "-i", empty, "-o", tmp_path / "x")
    two_channels = tmp_path / "two_channels"
    two_channels.mkdir()
    write_ct(two_channels / "case_0000.nii.gz")
    write_ct(two_channels / "case_0001.nii.gz")
    assert "channel" in run(demo_bundle, "-i", two_channels, "-o", tmp_path / "x")
    orphan = Path(shutil.copytree(demo_bundle, tmp_path / "orphan"))
    manifest = json.loads((orphan / "bundle.json").read_text())
    manifest["source"]["model_dir"] = str(tmp_path / "moved-away")
    (orphan / "bundle.json").write_text(json.dumps(manifest))
    assert "--teacher" in run(orphan, "-i", unlabeled_scans, "-o", tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_labels_add_nnunets_loss_and_a_missing_label_map_is_named(demo_bundle, tmp_path):
    from tucker_export.demo import generate_phantom
    from tucker_export.demo.phantom import write_case

    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    for seed in range(2):
        write_case(generate_phantom(seed), images / f"case_{seed}_0000.nii.gz", labels / f"case_{seed}.nii.gz")
    report = finetune_bundle(demo_bundle, images, output=tmp_path / "tuned", settings=QUICK, labels_dir=labels)
    record = json.loads((tmp_path / "tuned" / "bundle.json").read_text())["finetuning"][-1]
    assert "labels" in record["method"] and record["scans"]["labels"] == str(labels)
    assert len(report.folds) == 1
    (labels / "case_1.nii.gz").unlink()
    result = CliRunner().invoke(cli, ["finetune", str(demo_bundle), "-i", str(images), "--labels", str(labels),
                                      "-o", str(tmp_path / "again"), "--steps", "2"])
    assert result.exit_code == 1 and "lacks the label maps of case_1" in result.output
    assert not (tmp_path / "again").exists()
