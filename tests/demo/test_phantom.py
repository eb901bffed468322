"""Properties of the seeded CT-like phantom generator (known geometry for unit tests and benchmarks)."""

from __future__ import annotations

import numpy as np
import pytest

from tucker_export.demo.phantom import (
    AIR_HU,
    ANISOTROPIC_SPACING,
    FIELD_OF_VIEW_MM,
    LABEL_NAMES,
    STRUCTURE_HU,
    TISSUE_HU,
    generate_phantom,
    write_case,
)


@pytest.fixture(scope="module")
def iso_case():
    return generate_phantom(3, anisotropic=False)


@pytest.fixture(scope="module")
def aniso_case():
    return generate_phantom(3, anisotropic=True)


def test_shapes_dtypes_and_field_of_view(iso_case, aniso_case):
    for case in (iso_case, aniso_case):
        assert case.image.shape == case.labels.shape
        assert case.image.ndim == 3
        assert case.image.dtype == np.float32
        assert case.labels.dtype == np.uint8
        # Every case covers the same physical extent (within one voxel), whatever its spacing.
        extent = np.array(case.image.shape) * np.array(case.spacing)
        assert np.all(np.abs(extent - np.array(FIELD_OF_VIEW_MM)) <= np.array(case.spacing))
        # Small enough for CPU training.
        assert max(case.image.shape) <= 80


def test_label_set_is_background_plus_every_structure(iso_case, aniso_case):
    assert set(LABEL_NAMES) == {0, 1, 2, 3, 4, 5}
    assert LABEL_NAMES[0] == "background"
    for case in (iso_case, aniso_case):
        assert set(np.unique(case.labels).tolist()) == set(LABEL_NAMES)


@pytest.mark.parametrize("seed", range(6))
def test_structures_are_large_enough_for_high_dice(seed):
    case = generate_phantom(seed)
    voxel_ml = float(np.prod(case.spacing)) / 1000.0
    for value, name in LABEL_NAMES.items():
        if value:
            # >= 1.5 ml (~450 voxels at 1.5 mm) per structure, so boundary voxels cannot dominate Dice.
            assert (case.labels == value).sum() * voxel_ml > 1.5, name


def test_hu_ranges(iso_case):
    image, labels = iso_case.image, iso_case.labels
    assert image.min() > AIR_HU - 200 and image.max() < 1000
    # Air outside the body.
    assert abs(np.median(image[0, 0, :5]) - AIR_HU) < 100
    for value, name in LABEL_NAMES.items():
        if not value:
            continue
        # Median over the structure's interior is its nominal HU (jitter +-10, noise, partial volume).
        assert abs(np.median(image[labels == value]) - STRUCTURE_HU[name]) < 40, name
    body_tissue = (labels == 0) & (image > -500)
    assert abs(np.median(image[body_tissue]) - TISSUE_HU) < 40
    # Structures are told apart by intensity: distinct nominal values.
    assert len(set(STRUCTURE_HU.values()) | {TISSUE_HU, AIR_HU}) == len(STRUCTURE_HU) + 2


def test_noise_level(iso_case):
    # Noise of 20-30 HU on top of a mildly blurred image: the difference between x-neighbours in the
    # air region is dominated by noise (sqrt(2) * sigma).
    air = iso_case.image[:, :4, :]
    sigma = np.std(np.diff(air, axis=2)) / np.sqrt(2)
    assert 15 < sigma < 35


def test_deterministic_per_seed():
    a, b = generate_phantom(11), generate_phantom(11)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.spacing == b.spacing
    c = generate_phantom(12)
    assert a.image.shape != c.image.shape or not np.array_equal(a.image, c.image)


def test_anisotropic_cases(aniso_case, iso_case):
    assert aniso_case.anisotropic and not iso_case.anisotropic
    assert aniso_case.spacing == ANISOTROPIC_SPACING
    assert aniso_case.spacing[0] >= 2 * aniso_case.spacing[1]
    assert max(iso_case.spacing) / min(iso_case.spacing) < 1.1
    # Unforced seeds draw both kinds.
    drawn = {generate_phantom(seed).anisotropic for seed in range(16)}
    assert drawn == {True, False}


def test_write_case_round_trip(tmp_path, aniso_case):
    sitk = pytest.importorskip("SimpleITK")
    image_path, label_path = tmp_path / "c_0000.nii.gz", tmp_path / "c.nii.gz"
    write_case(aniso_case, image_path, label_path)
    img = sitk.ReadImage(str(image_path))
    lab = sitk.ReadImage(str(label_path))
    # SimpleITK spacing is (x, y, z); ours is (z, y, x).
    assert img.GetSpacing() == pytest.approx(tuple(reversed(aniso_case.spacing)))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(lab), aniso_case.labels)
    np.testing.assert_allclose(sitk.GetArrayFromImage(img), aniso_case.image)
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind
