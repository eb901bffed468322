"""prepare_bundle: one decompose -> export (-> build) path, reusing what was already made."""

from __future__ import annotations

import pytest
import torch
from factories import make_model_folder

from tucker_export.errors import ConfigurationError
from tucker_export.exporter.ranks import RankPolicy
from tucker_export.pipeline import prepare_bundle, undecomposed_bundle


@pytest.fixture()
def model_dir(tmp_path):
    torch.manual_seed(0)
    return make_model_folder(tmp_path / "models", folds=(0, 1))


def test_prepare_decomposes_and_exports_then_reuses(model_dir, tmp_path):
    target = tmp_path / "bundle"
    first = prepare_bundle(model_dir, target, policy=RankPolicy(factor=0.5), precisions=("fp32",), folds=[0])
    assert first.decomposed and [r.key for r in first.exports] == ["fold_0.fp32"]
    assert first.bundle.folds == (0,) and first.bundle.has_onnx(0, "fp32")

    again = prepare_bundle(model_dir, target, policy=RankPolicy(factor=0.5), precisions=("fp32",), folds=[0], reuse=True)
    assert not again.decomposed and again.exports == []

    other = prepare_bundle(model_dir, target, policy=RankPolicy(factor=0.25), folds=[0], reuse=True)
    assert other.decomposed and other.bundle.rank_policy["factor"] == 0.25 and not other.bundle.has_onnx(0, "fp32")


def test_reuse_remakes_a_bundle_of_changed_model_files(model_dir, tmp_path):
    target = tmp_path / "bundle"
    prepare_bundle(model_dir, target, policy=RankPolicy(mode="none"), folds=[0])
    (model_dir / "plans.json").write_text((model_dir / "plans.json").read_text() + "\n")
    assert prepare_bundle(model_dir, target, policy=RankPolicy(mode="none"), folds=[0], reuse=True).decomposed


def test_unknown_engine_kind_is_refused_before_any_work(model_dir, tmp_path):
    with pytest.raises(ConfigurationError, match="among trt, openvino, got tensorflow"):
        prepare_bundle(model_dir, tmp_path / "bundle", policy=RankPolicy(), engines=("tensorflow",))
    assert not (tmp_path / "bundle").exists()


def test_undecomposed_bundle_lives_in_the_user_cache_and_is_made_once(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TUCKER_EXPORT_CACHE", str(tmp_path / "cache"))
    bundle = undecomposed_bundle(model_dir, precision="fp32")
    assert bundle.path.parent == tmp_path / "cache" / "bundles" and bundle.rank_policy == {"mode": "none"}
    assert bundle.folds == (0, 1) and all(bundle.has_onnx(f, "fp32") for f in (0, 1))
    manifest_time = (bundle.path / "bundle.json").stat().st_mtime_ns
    assert undecomposed_bundle(model_dir, precision="fp32").path == bundle.path
    assert (bundle.path / "bundle.json").stat().st_mtime_ns == manifest_time  # nothing re-made
