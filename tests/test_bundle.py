"""The bundle refuses files changed behind its manifest, and its staging never leaves a half-made folder."""

from __future__ import annotations

import pytest
from exporter._nets import model_folder

from tucker_export.bundle import Bundle, staged_bundle_dir
from tucker_export.errors import BundleError
from tucker_export.exporter.decompose import decompose_model
from tucker_export.exporter.ranks import RankPolicy
from tucker_export.exporter.rebuild import build_network


def test_changed_weights_are_refused_with_path_and_both_hashes(tmp_path):
    model_dir = model_folder(tmp_path, "plain-3d", folds=(0,))
    bundle = decompose_model(model_dir, tmp_path / "bundle", policy=RankPolicy(factor=0.3), progress=False)
    build_network(bundle, 0)  # untouched: loads
    weights = bundle.weights_path(0)
    recorded = bundle.fold_entry(0)["weights"]["sha256"]
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError) as error:
        build_network(Bundle.load(bundle.path), 0)
    message = str(error.value)
    assert str(weights) in message and recorded[:12] in message and "does not match the bundle manifest" in message


def test_failed_staging_leaves_the_old_bundle(tmp_path):
    target = tmp_path / "bundle"
    target.mkdir()
    (target / "bundle.json").write_text("{}")
    with pytest.raises(BundleError, match="overwrite=True"):
        with staged_bundle_dir(target, overwrite=False):
            pass
    with pytest.raises(RuntimeError):
        with staged_bundle_dir(target, overwrite=True) as staging:
            (staging / "half").write_text("x")
            raise RuntimeError("crash")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
    assert (target / "bundle.json").read_text() == "{}"
