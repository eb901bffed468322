"""Fixtures for engine tests: a small decomposed factory bundle with fp32 and fp16 ONNX exports."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
from factories import make_model_folder


def tensorrt_and_cuda() -> bool:
    if importlib.util.find_spec("tensorrt") is None:
        return False
    import torch

    return torch.cuda.is_available()


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.fixture(scope="session")
def exported_bundle_source(tmp_path_factory) -> Path:
    from tucker_export.exporter.decompose import decompose_model
    from tucker_export.exporter.onnx_export import ParityTolerance, export_bundle
    from tucker_export.exporter.ranks import RankPolicy

    root = tmp_path_factory.mktemp("engine-bundle")
    model_dir = make_model_folder(root / "models", folds=(0, 1))
    bundle = decompose_model(model_dir, root / "bundle", policy=RankPolicy(mode="relative", factor=0.5), progress=False)
    # random weights give near-tie logits, so the fp16 argmax bar is loosened here (not in the demo tests)
    export_bundle(bundle, precisions=("fp32", "fp16"), progress=False, tolerances={"fp16": ParityTolerance(None, 0.99)})
    return bundle.path


@pytest.fixture
def exported_bundle(exported_bundle_source, tmp_path) -> Path:
    """A private copy per test, so tests may add engines or records."""
    target = tmp_path / "bundle"
    shutil.copytree(exported_bundle_source, target)
    return target
