"""The demo model decomposed (rank factor 0.3, fold 0) and exported to fp32 ONNX, shared by the scale-out tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="package")
def demo_bundle(demo_model, tmp_path_factory) -> Path:
    from tucker_export.exporter.decompose import decompose_model
    from tucker_export.exporter.onnx_export import export_bundle
    from tucker_export.exporter.ranks import RankPolicy

    root = tmp_path_factory.mktemp("scaleout-bundle")
    bundle = decompose_model(demo_model.model_dir, root / "bundle", policy=RankPolicy(factor=0.3), progress=False, folds=[0])
    export_bundle(bundle, precisions=("fp32",), progress=False)
    return bundle.path
