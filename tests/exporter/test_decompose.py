"""decompose_model writes a bundle that rebuilds the decomposed network bit for bit."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tucker_export._io import sha256_file
from tucker_export.bundle import model_checksum
from tucker_export.errors import BundleError
from tucker_export.exporter import decompose as decompose_module
from tucker_export.exporter.decompose import decompose_model, decompose_network, format_summary, stage_of
from tucker_export.exporter.ranks import RankPolicy
from tucker_export.exporter.rebuild import build_network
from tucker_export.exporter.tucker import TuckerConv

from ._nets import load_network, model_folder, random_input

LAYER_KEYS = {"name", "aliases", "stage", "op", "in_channels", "out_channels", "kernel_size", "stride", "action",
              "reason", "ranks", "params_before", "params_after", "macs_before", "macs_after", "relative_error"}


@pytest.mark.parametrize("name", ["plain-3d", "resenc-2d"])
def test_bundle_round_trip_is_bit_exact(tmp_path, name):
    model_dir = model_folder(tmp_path, name, folds=(0, 1))
    policy = RankPolicy(factor=0.3)
    bundle = decompose_model(model_dir, tmp_path / "bundle", policy=policy, progress=False)
    assert bundle.folds == (0, 1)
    for fold in (0, 1):
        network, input_shape = load_network(model_dir, fold)
        decompose_network(network, input_shape, policy)
        rebuilt = build_network(bundle, fold)
        assert any(isinstance(m, TuckerConv) for m in rebuilt.modules())
        expected_state = network.state_dict()
        assert rebuilt.state_dict().keys() == expected_state.keys()
        assert all(torch.equal(v, expected_state[k]) for k, v in rebuilt.state_dict().items())
        x = random_input(input_shape, seed=fold)
        with torch.no_grad():
            assert torch.equal(rebuilt(x), network(x))


def test_manifest_records_source_policy_layers_and_totals(tmp_path):
    model_dir = model_folder(tmp_path, "resenc-3d")
    bundle = decompose_model(model_dir, tmp_path / "bundle", policy=RankPolicy(mode="energy", energy=0.8),
                             progress=False)
    manifest = json.loads((tmp_path / "bundle" / "bundle.json").read_text())
    assert manifest == bundle.manifest
    source = manifest["source"]
    assert source["model_dir"] == str(model_dir.resolve())
    assert source["checksum"] == model_checksum(model_dir, [model_dir / "fold_0" / "checkpoint_final.pth"])
    assert source["configuration"] == "3d_fullres" and source["folds"] == ["0"]
    assert {"tucker_export", "nnunetv2", "torch"} <= manifest["versions"].keys()
    assert manifest["rank_policy"] == {"mode": "energy", "round_to": 8, "rank_min": None, "energy": 0.8}
    assert manifest["decomposition"]["hooi_iterations"] == 0
    for name in ("plans.json", "dataset.json"):
        assert (tmp_path / "bundle" / name).read_bytes() == (model_dir / name).read_bytes()
    fold = manifest["folds"]["0"]
    assert fold["weights"]["file"] == "weights/fold_0.safetensors"
    assert fold["weights"]["sha256"] == sha256_file(tmp_path / "bundle" / fold["weights"]["file"])
    for layer in fold["layers"]:
        assert set(layer) == LAYER_KEYS
        if layer["action"] == "factorized":
            assert layer["reason"] is None and len(layer["ranks"]) == 2 and 0 < layer["relative_error"] < 1
            assert layer["params_after"] < layer["params_before"] and layer["macs_after"] < layer["macs_before"]
        else:
            assert layer["reason"] and layer["ranks"] is None and layer["relative_error"] == 0.0
    totals = fold["totals"]
    assert totals["layers"] == len(fold["layers"])
    assert totals["macs_after"] == sum(layer["macs_after"] for layer in fold["layers"])
    assert totals["conv_params_before"] == sum(layer["params_before"] for layer in fold["layers"])
    assert totals["input_shape"] == [1, 16, 16, 16]


def test_none_policy_writes_the_original_weights_and_reproduces_logits_exactly(tmp_path):
    model_dir = model_folder(tmp_path, "plain-3d-anisotropic")
    bundle = decompose_model(model_dir, tmp_path / "bundle", policy=RankPolicy(mode="none"), progress=False)
    original, input_shape = load_network(model_dir)
    stored = load_file(bundle.weights_path(0))
    reference = original.state_dict()
    assert stored.keys() <= reference.keys()
    assert all(torch.equal(v, reference[k]) for k, v in stored.items())
    assert all(entry["action"] == "kept" and entry["reason"] == "rank mode none" for entry in bundle.fold_entry(0)["layers"])
    rebuilt = build_network(bundle, 0)
    x = random_input(input_shape)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), original(x))
    assert bundle.fold_entry(0)["totals"]["macs_ratio"] == 1.0


def test_existing_bundle_is_refused_without_overwrite_and_kept_when_decompose_fails(tmp_path, monkeypatch):
    model_dir = model_folder(tmp_path, "plain-2d")
    target = tmp_path / "bundle"
    decompose_model(model_dir, target, progress=False)
    before = {p.name: p.read_bytes() for p in target.rglob("*") if p.is_file()}
    with pytest.raises(BundleError, match="not empty; replace it on purpose; use overwrite=True"):
        decompose_model(model_dir, target, progress=False)

    def broken(*args, **kwargs):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(decompose_module, "decompose_network", broken)
    with pytest.raises(RuntimeError, match="simulated crash"):
        decompose_model(model_dir, target, overwrite=True, progress=False)
    assert {p.name: p.read_bytes() for p in target.rglob("*") if p.is_file()} == before
    assert not any(p.name.startswith(".bundle") for p in tmp_path.iterdir())
    monkeypatch.undo()
    bundle = decompose_model(model_dir, target, overwrite=True, policy=RankPolicy(mode="none"), progress=False)
    assert bundle.manifest["rank_policy"] == {"mode": "none"}


def test_summary_has_stages_totals_and_layers_when_verbose(tmp_path):
    bundle = decompose_model(model_folder(tmp_path, "plain-3d"), tmp_path / "bundle", progress=False)
    short = format_summary(bundle)
    assert "encoder.1" in short and "decoder.0" in short and "total (convs)" in short
    assert "encoder.stages.1.0.convs.0.conv" not in short
    long = format_summary(bundle, verbose=True)
    assert "encoder.stages.1.0.convs.0.conv" in long and "kept: first conv with 1 input channel" in long


def test_stage_names():
    assert stage_of("encoder.stages.3.0.convs.1.conv") == "encoder.3"
    assert stage_of("encoder.stem.convs.0.conv") == "encoder.stem"
    assert stage_of("decoder.transpconvs.2") == "decoder.2"
    assert stage_of("decoder.stages.2.convs.0.conv") == "decoder.2"
    assert stage_of("decoder.seg_layers.4") == "decoder.seg"
    assert stage_of("0") == "0"


def test_hooi_iterations_are_recorded_and_do_not_worsen_any_layer(tmp_path):
    model_dir = model_folder(tmp_path, "plain-2d")
    hosvd = decompose_model(model_dir, tmp_path / "hosvd", progress=False)
    hooi = decompose_model(model_dir, tmp_path / "hooi", hooi_iterations=3, progress=False)
    assert hooi.manifest["decomposition"]["method"] == "tucker2-hooi"
    assert hooi.manifest["decomposition"]["hooi_iterations"] == 3
    for a, b in zip(hosvd.fold_entry(0)["layers"], hooi.fold_entry(0)["layers"]):
        assert a["ranks"] == b["ranks"]
        assert b["relative_error"] <= a["relative_error"] + 1e-9
    x = random_input((1, 16, 16))
    with torch.no_grad():
        assert build_network(hooi, 0)(x).shape == (1, 4, 16, 16)


def test_the_thread_setting_is_scoped_to_the_decomposition(tmp_path, monkeypatch):
    network, input_shape = load_network(model_folder(tmp_path, "plain-2d"))
    before = torch.get_num_threads()
    seen = []
    original = decompose_module._decompose_network

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return original(*args, **kwargs)

    monkeypatch.setattr(decompose_module, "_decompose_network", spy)
    decompose_network(network, input_shape, RankPolicy(), threads=1)
    assert seen == [1] and torch.get_num_threads() == before
