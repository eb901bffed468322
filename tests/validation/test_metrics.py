"""Tests of tucker_export.validation.metrics on hand-made masks whose metrics are known by hand.

Reference cube used throughout (``_cube``): side 5, so its face-connected surface has
5**3 - 3**3 = 98 voxels. Shifting a copy by one voxel along one axis gives two surfaces that share
4 * (5 - 1)**2 = 64 voxels (distance 0); the other 34 voxels of each surface are one voxel step
along the shift axis from the other surface, except that the 9 inner voxels of the overlapping cap
are also one *in-plane* step or two from the other cube's side ring (see the anisotropic tests).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import ndimage

from tucker_export.errors import InputImageError, TuckerExportError
from tucker_export.validation.metrics import (
    ABSENT,
    MISSING_IN_PREDICTION,
    MISSING_IN_REFERENCE,
    PRESENT,
    ClassMetrics,
    compute_class_metrics,
    dice_score,
    summarize,
)

SHAPE = (12, 12, 12)


def _cube(start: tuple[int, int, int], side: int = 5, label: int = 1, shape=SHAPE) -> np.ndarray:
    out = np.zeros(shape, dtype=np.uint8)
    out[tuple(slice(s, s + side) for s in start)] = label
    return out


def _one(pred: np.ndarray, ref: np.ndarray, spacing, tol: float = 2.0, hd95: bool = False) -> ClassMetrics:
    return compute_class_metrics(pred, ref, [1], spacing, nsd_tolerance_mm=tol, hd95=hd95)[1]


# ----------------------------------------------------------------------------------------- overlap


def test_dice_iou_of_half_overlapping_cubes():
    # 4^3 cubes overlapping in a 2x4x4 slab: |A|=|B|=64, |A∩B|=32.
    ref = _cube((2, 2, 2), side=4)
    pred = _cube((4, 2, 2), side=4)
    m = _one(pred, ref, (1.0, 1.0, 1.0))
    assert m.status == PRESENT
    assert m.dice == pytest.approx(2 * 32 / 128)
    assert m.iou == pytest.approx(32 / 96)
    assert (m.voxels_reference, m.voxels_prediction) == (64, 64)
    assert dice_score(pred == 1, ref == 1) == pytest.approx(0.5)


def test_dice_iou_of_nested_cubes():
    # 4^3 cube inside a 6^3 cube: |A∩B| = 64, |A|+|B| = 280, |A∪B| = 216.
    ref = _cube((3, 3, 3), side=6)
    pred = _cube((4, 4, 4), side=4)
    m = _one(pred, ref, (1.0, 1.0, 1.0))
    assert m.dice == pytest.approx(128 / 280)
    assert m.iou == pytest.approx(64 / 216)
    assert dice_score(pred, ref) == pytest.approx(128 / 280)  # 0/1 integer masks are accepted


def test_identical_masks_are_perfect():
    ref = _cube((2, 3, 4))
    m = _one(ref.copy(), ref, (0.7, 1.3, 2.0), tol=0.1, hd95=True)
    assert (m.dice, m.iou, m.nsd, m.hd95) == (1.0, 1.0, 1.0, 0.0)


# ------------------------------------------------------------------------------------------- NSD


@pytest.mark.parametrize(("tol", "expected"), [(0.5, 128 / 196), (0.99, 128 / 196), (1.0, 1.0), (5.0, 1.0)])
def test_nsd_of_cube_shifted_one_voxel_isotropic(tol: float, expected: float):
    # 64 shared surface voxels per cube are at 0 mm; the other 34 are exactly 1 mm away.
    ref = _cube((2, 2, 2))
    pred = _cube((3, 2, 2))
    assert _one(pred, ref, (1.0, 1.0, 1.0), tol=tol).nsd == pytest.approx(expected)


def test_nsd_tolerance_equal_to_distance_counts_as_within_despite_rounding():
    # 0.7 mm voxels, 1-voxel shift, tolerance 0.7 mm: every distance is 0 or 0.7 mm -> within.
    ref = _cube((2, 2, 2))
    pred = _cube((2, 2, 3))
    assert _one(pred, ref, (0.7, 0.7, 0.7), tol=0.7).nsd == 1.0


def test_nsd_anisotropic_shift_along_coarse_vs_fine_axis():
    # Spacing (3, 1, 1) mm, tolerance 2 mm, shift of one voxel.
    spacing = (3.0, 1.0, 1.0)
    ref = _cube((2, 2, 2))
    # Along the fine axis 2 the shift is 1 mm: all surface voxels are within 2 mm.
    assert _one(_cube((2, 2, 3)), ref, spacing, tol=2.0).nsd == pytest.approx(1.0)
    # Along the coarse axis 0 the shift is 3 mm. Per cube: 64 shared voxels (0 mm), the 25 voxels of
    # the non-overlapping cap are 3 mm from the other surface, and the 9 inner voxels of the
    # overlapping cap are 1 mm (8 of them) or 2 mm (centre) from the other cube's side ring in the
    # same slice -> (64 + 9) within per cube.
    coarse = _one(_cube((3, 2, 2)), ref, spacing, tol=2.0)
    assert coarse.nsd == pytest.approx(2 * 73 / 196)
    # 1.5 mm drops the centre voxel of each inner cap (2 mm away).
    assert _one(_cube((3, 2, 2)), ref, spacing, tol=1.5).nsd == pytest.approx(2 * 72 / 196)
    assert _one(_cube((3, 2, 2)), ref, spacing, tol=3.0).nsd == pytest.approx(1.0)
    # Spacing is read in array-axis order: the same coarse-axis shift with (1, 1, 3) mm is 1 mm.
    assert _one(_cube((3, 2, 2)), ref, (1.0, 1.0, 3.0), tol=2.0).nsd == pytest.approx(1.0)


def test_nsd_2d_square_shifted_one_pixel():
    # 5x5 squares, 4-connected boundary of 16 pixels each; shifted by one row they share 8 boundary
    # pixels and the other 8 of each are 1 mm away.
    ref = np.zeros((10, 10), dtype=np.int32)
    ref[2:7, 2:7] = 1
    pred = np.roll(ref, 1, axis=0)
    assert _one(pred, ref, (1.0, 1.0), tol=0.5).nsd == pytest.approx(16 / 32)
    assert _one(pred, ref, (1.0, 1.0), tol=1.0).nsd == pytest.approx(1.0)
    # With 2 mm rows the shift is 2 mm, but 2 of the 3 inner pixels of each overlapping edge are
    # 1 mm (one column) from the other square's side -> (8 + 2) within per square.
    assert _one(pred, ref, (2.0, 1.0), tol=1.0).nsd == pytest.approx(2 * 10 / 32)
    assert _one(pred, ref, (2.0, 1.0), tol=0.5).nsd == pytest.approx(16 / 32)


def test_masks_touching_the_image_border_have_surface_there():
    # The whole image is class 1 in the reference; the prediction drops the last slice. Border
    # voxels are surface, so the reference surface includes its last slice, which is 1 mm from the
    # prediction's (new) last slice.
    ref = np.ones((6, 6, 6), dtype=np.uint8)
    pred = ref.copy()
    pred[-1] = 0
    m = _one(pred, ref, (1.0, 1.0, 1.0), tol=0.5, hd95=True)
    surf_ref = 6**3 - 4**3  # all faces are image border
    surf_pred = 5 * 6 * 6 - 3 * 4 * 4
    # Unmatched: reference last slice (36) and prediction last slice (36) minus the ring they share
    # with the reference's side faces (20) -> 16.
    assert m.nsd == pytest.approx((surf_ref - 36 + surf_pred - 16) / (surf_ref + surf_pred))
    assert m.dice == pytest.approx(2 * 180 / (216 + 180))


# ------------------------------------------------------------------------------------------ HD95


def test_hd95_of_cube_shifted_along_coarse_axis_equals_shift():
    # Pooled 196 distances: 128 at 0, 16 at 1 mm, 2 at 2 mm, 50 at 3 mm. The 95th percentile sits at
    # sorted position 0.95 * 195 = 185.25 > 146, i.e. among the 3 mm distances.
    ref = _cube((2, 2, 2))
    m = _one(_cube((3, 2, 2)), ref, (3.0, 1.0, 1.0), tol=2.0, hd95=True)
    assert m.hd95 == pytest.approx(3.0)
    assert _one(_cube((2, 3, 2)), ref, (3.0, 1.0, 1.0), hd95=True).hd95 == pytest.approx(1.0)


def test_hd95_of_single_voxels_uses_anisotropic_spacing():
    ref = np.zeros((4, 5, 3), dtype=np.int16)
    pred = np.zeros_like(ref)
    ref[1, 1, 1] = 1
    pred[2, 3, 1] = 1
    spacing = (2.0, 3.0, 1.0)  # offset (1, 2, 0) voxels = (2, 6, 0) mm
    m = _one(pred, ref, spacing, tol=6.0, hd95=True)
    assert m.hd95 == pytest.approx(math.sqrt(40.0))
    assert m.nsd == 0.0
    assert _one(pred, ref, spacing, tol=6.5).nsd == 1.0


def test_hd95_is_none_unless_requested():
    ref = _cube((2, 2, 2))
    assert _one(_cube((3, 2, 2)), ref, (1.0, 1.0, 1.0)).hd95 is None


# ------------------------------------------------------------------- cross-check with full volume


def _reference_impl(pred: np.ndarray, ref: np.ndarray, spacing, tol: float) -> tuple[float, float]:
    """Independent NSD/HD95: full-volume distance transforms, no cropping, no k-d tree."""
    st = ndimage.generate_binary_structure(pred.ndim, 1)
    sp = pred & ~ndimage.binary_erosion(pred, st, border_value=0)
    sr = ref & ~ndimage.binary_erosion(ref, st, border_value=0)
    d_pr = ndimage.distance_transform_edt(~sr, sampling=spacing)[sp]
    d_rp = ndimage.distance_transform_edt(~sp, sampling=spacing)[sr]
    nsd = (np.sum(d_pr <= tol) + np.sum(d_rp <= tol)) / (d_pr.size + d_rp.size)
    return float(nsd), float(np.percentile(np.concatenate([d_pr, d_rp]), 95))


def test_matches_full_volume_distance_transform_on_random_multilabel_maps():
    rng = np.random.default_rng(1234)
    checked = 0
    for _ in range(8):
        shape = (14, 17, 11)
        ref = np.digitize(ndimage.gaussian_filter(rng.random(shape), 1.5), [0.47, 0.5, 0.53]).astype(np.int16)
        pred = np.digitize(ndimage.gaussian_filter(rng.random(shape), 1.5), [0.47, 0.5, 0.53]).astype(
            np.int16
        )
        spacing = tuple(float(s) for s in rng.uniform(0.4, 3.5, 3))
        tol = float(rng.uniform(0.5, 4.0))
        result = compute_class_metrics(pred, ref, [1, 2, 3], spacing, tol, hd95=True)
        for label, m in result.items():
            if m.status != PRESENT:
                continue
            nsd, hd = _reference_impl(pred == label, ref == label, spacing, tol)
            assert m.nsd == pytest.approx(nsd, abs=1e-12)
            assert m.hd95 == pytest.approx(hd, rel=1e-12, abs=1e-12)
            assert m.dice == pytest.approx(dice_score(pred == label, ref == label))
            checked += 1
    assert checked >= 10


# ----------------------------------------------------------------------------- absent classes


def _four_status_maps() -> tuple[np.ndarray, np.ndarray]:
    ref = np.zeros((10, 10, 10), dtype=np.uint8)
    pred = np.zeros_like(ref)
    ref[1:4, 1:4, 1:4] = 1  # class 1: in both, identical
    pred[1:4, 1:4, 1:4] = 1
    ref[6:8, 6:8, 6:8] = 2  # class 2: reference only (8 voxels)
    pred[6:9, 1:3, 6:7] = 3  # class 3: prediction only (6 voxels)
    return pred, ref  # class 4: in neither


def test_each_status_is_reported_explicitly():
    pred, ref = _four_status_maps()
    result = compute_class_metrics(pred, ref, [1, 2, 3, 4], (1.0, 1.0, 1.0), 1.0, hd95=True)
    assert list(result) == [1, 2, 3, 4]
    assert [result[k].status for k in (1, 2, 3, 4)] == [
        PRESENT,
        MISSING_IN_PREDICTION,
        MISSING_IN_REFERENCE,
        ABSENT,
    ]

    assert (result[1].dice, result[1].nsd, result[1].hd95) == (1.0, 1.0, 0.0)
    m2 = result[2]
    assert (m2.dice, m2.iou, m2.nsd, m2.hd95) == (0.0, 0.0, 0.0, None)
    assert (m2.voxels_reference, m2.voxels_prediction) == (8, 0)
    m3 = result[3]
    assert (m3.dice, m3.iou, m3.nsd, m3.hd95) == (0.0, 0.0, 0.0, None)
    assert (m3.voxels_reference, m3.voxels_prediction) == (0, 6)
    m4 = result[4]
    assert (m4.dice, m4.iou, m4.nsd, m4.hd95) == (None, None, None, None)
    assert (m4.voxels_reference, m4.voxels_prediction) == (0, 0)

    for m in result.values():  # strict JSON: no NaN/inf anywhere
        d = m.to_dict()
        assert d["label"] == m.label and d["status"] == m.status and d["nsd_tolerance_mm"] == 1.0
        json.dumps(d, allow_nan=False)


def test_summarize_states_which_classes_each_mean_includes():
    pred, ref = _four_status_maps()
    ref[1, 1, 1] = 0  # class 1 no longer perfect
    result = compute_class_metrics(pred, ref, [4, 3, 2, 1], (1.0, 1.0, 1.0), 1.0, hd95=True)
    s = summarize(result)
    assert s["classes"] == [1, 2, 3, 4]
    assert s["classes_counted"] == [1, 2, 3]
    assert s["classes_present"] == [1]
    assert s["classes_missing_in_prediction"] == [2]
    assert s["classes_missing_in_reference"] == [3]
    assert s["classes_absent"] == [4]
    assert s["mean_dice"] == pytest.approx(result[1].dice / 3)  # missing classes count as 0
    assert s["mean_iou"] == pytest.approx(result[1].iou / 3)
    assert s["mean_nsd"] == pytest.approx(result[1].nsd / 3)
    assert s["hd95_classes_counted"] == [1]
    assert s["mean_hd95"] == pytest.approx(result[1].hd95)
    assert s["nsd_tolerance_mm"] == 1.0
    json.dumps(s, allow_nan=False)


def test_summarize_with_only_absent_classes_has_no_means():
    z = np.zeros((4, 4, 4), dtype=np.uint8)
    s = summarize(compute_class_metrics(z, z, [1, 2], (1.0, 1.0, 1.0)))
    assert s["classes_counted"] == [] and s["classes_absent"] == [1, 2]
    assert s["mean_dice"] is None and s["mean_nsd"] is None and s["mean_hd95"] is None


def test_background_label_zero_and_bool_maps_are_supported():
    ref = _cube((2, 2, 2)).astype(bool)
    pred = _cube((3, 2, 2)).astype(bool)
    result = compute_class_metrics(pred, ref, [0, 1], (1.0, 1.0, 1.0), 1.0)
    assert result[0].status == PRESENT
    assert result[0].dice == pytest.approx(dice_score(~pred, ~ref))
    assert result[1].nsd == pytest.approx(1.0)


def test_dice_score_of_two_empty_masks_is_nan_not_perfect():
    z = np.zeros((3, 3), dtype=bool)
    assert math.isnan(dice_score(z, z))


# ------------------------------------------------------------------------------------------ speed


def test_surface_distances_run_on_each_class_crop_not_the_volume(monkeypatch):
    """What keeps 20 organ-sized classes in 128^3 fast, asserted without a clock: every class's
    distances are computed on the union of its two bounding boxes (plus one voxel), never on the volume."""
    from tucker_export.validation import metrics

    rng = np.random.default_rng(7)
    zz, yy, xx = np.indices((128, 128, 128), dtype=np.int16)
    ref = np.zeros((128, 128, 128), dtype=np.uint8)
    for k in range(1, 21):
        c = rng.uniform(20, 108, 3)
        r = rng.uniform(6, 25, 3)
        ref[((zz - c[0]) / r[0]) ** 2 + ((yy - c[1]) / r[1]) ** 2 + ((xx - c[2]) / r[2]) ** 2 <= 1] = k
    pred = np.roll(ref, 1, axis=0)
    shapes = []
    original = metrics._directed_surface_distances

    def recording(mask_p, mask_r, *args):
        shapes.append(mask_p.shape)
        return original(mask_p, mask_r, *args)

    monkeypatch.setattr(metrics, "_directed_surface_distances", recording)
    result = compute_class_metrics(pred, ref, list(range(1, 21)), (2.5, 0.8, 0.8), 2.0, hd95=True)
    assert len(result) == 20 and len(shapes) == 20
    for label, shape in zip(range(1, 21), shapes, strict=True):
        both = np.argwhere((pred == label) | (ref == label))
        expected = tuple(int(min(hi + 2, 128) - max(lo - 1, 0)) for lo, hi in zip(both.min(0), both.max(0), strict=True))
        assert shape == expected, label


# ----------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"prediction": np.zeros((4, 4, 5), np.uint8)}, "(4, 4, 5) and (4, 4, 4)"),
        ({"prediction": np.zeros((4, 4, 4), np.float32)}, "float32"),
        ({"prediction": np.zeros((1, 4, 4, 4), np.uint8)}, "(1, 4, 4, 4)"),
        ({"spacing": (1.0, 1.0)}, "(3), got 2"),
        ({"spacing": (1.0, 0.0, 1.0)}, "(1.0, 0.0, 1.0)"),
        ({"spacing": (1.0, float("nan"), 1.0)}, "nan"),
        ({"nsd_tolerance_mm": 0.0}, "got 0.0"),
        ({"nsd_tolerance_mm": -1.0}, "got -1.0"),
        ({"labels": []}, "at least one"),
        ({"labels": [1, 2, 1]}, "duplicates [1]"),
        ({"labels": [1, 2.5]}, "2.5"),
        ({"labels": "12"}, "'12'"),
    ],
)
def test_invalid_inputs_raise_input_image_error(kwargs: dict, needle: str):
    args = {
        "prediction": np.zeros((4, 4, 4), np.uint8),
        "reference": np.zeros((4, 4, 4), np.uint8),
        "labels": [1],
        "spacing": (1.0, 1.0, 1.0),
    }
    args.update(kwargs)
    with pytest.raises(InputImageError) as excinfo:
        compute_class_metrics(**args)
    assert needle in str(excinfo.value)
    assert isinstance(excinfo.value, TuckerExportError)


def test_dice_score_rejects_label_maps_and_shape_mismatch():
    with pytest.raises(InputImageError, match="only 0 and 1"):
        dice_score(np.array([0, 1, 2]), np.array([0, 1, 1]))
    with pytest.raises(InputImageError, match=r"\(3,\) and b \(2,\)"):
        dice_score(np.zeros(3, bool), np.zeros(2, bool))


def test_class_metrics_is_frozen():
    m = _one(_cube((2, 2, 2)), _cube((2, 2, 2)), (1.0, 1.0, 1.0))
    with pytest.raises(AttributeError):
        m.dice = 0.0  # type: ignore[misc]


def test_label_dice_and_the_label_reader(tmp_path):
    import SimpleITK as sitk

    from tucker_export.validation.metrics import label_dice, read_label_map

    ref = np.zeros((4, 5, 6), dtype=np.uint8)
    ref[:2] = 1
    pred = ref.copy()
    pred[0] = 2
    scores = label_dice(pred, ref, [1, 2, 3])
    assert scores[1] == pytest.approx(2 * 30 / (30 + 60)) and scores[2] == 0.0 and math.isnan(scores[3])
    path = tmp_path / "seg.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(ref), str(path))
    assert np.array_equal(read_label_map(path), ref)
    (tmp_path / "broken.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(InputImageError, match="broken.nii.gz cannot be read"):
        read_label_map(tmp_path / "broken.nii.gz")
