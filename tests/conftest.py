"""Shared fixtures. tests/ is put on sys.path so test modules can import ``factories``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "totalsegmentator-example"


@pytest.fixture(scope="session")
def shared_ct_dir() -> Path:
    """The real CT example from ../shared; users' clones do not have it, so tests skip without it."""
    if not (SHARED_DATA / "example_ct.nii.gz").is_file():
        pytest.skip(f"real CT example not found at {SHARED_DATA} (only present in this project's workplace)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def demo_model():
    """The shipped head-and-neck CT model with its four held-out patients (nothing is trained)."""
    from tucker_export.demo import ensure_demo_model

    return ensure_demo_model()


@pytest.fixture(scope="session")
def demo_crops(demo_model, tmp_path_factory):
    """The shipped model with its four patients cropped to 64^3 around the contours: one tile per case."""
    from factories import crop_demo_patients

    return crop_demo_patients(demo_model, tmp_path_factory.mktemp("demo-crops"))
