"""The demo model decomposed (rank factor 0.3, fold 0) and exported to fp32 ONNX, shared by the scale-out tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from factories import decomposed_demo_bundle


@pytest.fixture(scope="package")
def demo_bundle(demo_model, tmp_path_factory) -> Path:
    return decomposed_demo_bundle(demo_model, tmp_path_factory.mktemp("scaleout-bundle"), rank_factor=0.3)
