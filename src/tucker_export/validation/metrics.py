"""Per-class segmentation metrics: Dice, IoU, normalized surface Dice (NSD) and optional HD95.

Why this module exists: a compressed deployment is only acceptable if its segmentations agree with
the uncompressed PyTorch model, class by class. Overlap metrics (Dice, IoU) miss boundary drift on
large structures, so we also report NSD, the boundary metric of Nikolov et al. 2021 ("Clinically
applicable segmentation of head and neck anatomy for radiotherapy", J Med Internet Res 23(7):e26151),
at a tolerance in millimetres, and optionally HD95.

Why it is implemented here with scipy instead of a library: no light, maintained PyPI package
covers all four metrics. DeepMind's ``surface-distance`` is not published on PyPI as a maintained
package, MONAI pulls in a large framework, and ``medpy`` (0.5.x) has Dice, IoU and HD95 but no NSD,
raises on empty masks and works on the full volume. The definitions below follow the published ones
and MONAI's voxel-based ``compute_surface_dice`` (``use_subvoxels=False``):

* Surface of a binary mask: ``mask & ~binary_erosion(mask, face_connectivity)``, i.e. the mask
  voxels that have at least one *face* neighbour (6-neighbourhood in 3D, 4-neighbourhood in 2D)
  outside the mask. Voxels on the image border count as surface (outside the image is background).
  This is the same choice as MONAI's ``get_mask_edges`` and medpy's ``connectivity=1`` default.
* Surface points are voxel centres and every surface voxel has weight 1 (no surfel areas, unlike
  DeepMind's ``surface-distance``); with strongly anisotropic voxels this slightly over-weights
  faces perpendicular to the fine axes, which is the accepted trade-off of the voxel variant.
* Distances are Euclidean in millimetres between voxel centres (voxel index times ``spacing``),
  so anisotropic spacing is exact. They equal ``scipy.ndimage.distance_transform_edt(~surface,
  sampling=spacing)`` read at the other surface's voxels (the tests check this), but are computed
  with a ``scipy.spatial.cKDTree`` over the surface voxels, whose cost grows with surface area
  instead of bounding-box volume (several times faster on organ-sized classes). ``spacing`` is always
  an explicit argument in *array axis order*; for a SimpleITK image that is
  ``tuple(reversed(image.GetSpacing()))`` because ``GetArrayFromImage`` returns z, y, x.
* NSD at tolerance tau: ``(|{a in S_P : d(a, S_R) <= tau}| + |{b in S_R : d(b, S_P) <= tau}|)
  / (|S_P| + |S_R|)``. Distances equal to tau count as within (a relative slack of 1e-9 absorbs
  floating-point rounding of the distances).
* HD95: the 95th percentile (numpy's linear interpolation) of the pooled symmetric surface
  distances ``d(S_P -> S_R) ∪ d(S_R -> S_P)``, as medpy's ``hd95`` does. (MONAI and DeepMind take the
  maximum of the two directed 95th percentiles instead; on symmetric errors they agree.)

Classes absent from one or both label maps are reported explicitly through ``ClassMetrics.status``,
never skipped and never scored as perfect:

* ``"present"``: in both maps; all metrics computed.
* ``"missing_in_prediction"``: in the reference only; Dice = IoU = NSD = 0, HD95 = None (undefined:
  there is no predicted surface to measure from).
* ``"missing_in_reference"``: in the prediction only (pure false positive); Dice = IoU = NSD = 0,
  HD95 = None.
* ``"absent"``: in neither; every metric is None and the class is excluded from means.

Speed: bounding boxes of every label come from one ``scipy.ndimage.find_objects`` pass per map, and
each class is cut out of both maps at the union of its two bounding boxes padded by one voxel.
Padding by the tolerance is not needed: every surface voxel of both masks lies inside the union box,
so every nearest-surface distance is realised by a pair of voxels inside it; the one-voxel pad keeps
the erosion identical to the full-volume one (image-border voxels stay surface because the crop is
clipped to the image). Voxels on both surfaces are at distance 0 and skip the nearest-neighbour
search, so near-identical predictions are cheapest.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from tucker_export.errors import InputImageError

__all__ = [
    "ABSENT",
    "MISSING_IN_PREDICTION",
    "MISSING_IN_REFERENCE",
    "PRESENT",
    "ClassMetrics",
    "ClassStatus",
    "compute_class_metrics",
    "dice_score",
    "summarize",
]

ClassStatus = Literal["present", "missing_in_prediction", "missing_in_reference", "absent"]

PRESENT: ClassStatus = "present"
MISSING_IN_PREDICTION: ClassStatus = "missing_in_prediction"
MISSING_IN_REFERENCE: ClassStatus = "missing_in_reference"
ABSENT: ClassStatus = "absent"

# Distances exactly at the tolerance count as within it; this relative slack keeps that true when
# the computed distance (index times spacing, then sqrt) rounds a hair above the tolerance
# (e.g. 0.7 mm spacing, 0.7 mm tau).
_TOLERANCE_SLACK = 1e-9

_BBox = tuple[slice, ...]


@dataclass(frozen=True)
class ClassMetrics:
    """Metrics of one class; ``None`` means undefined for this ``status`` (or HD95 not requested).

    ``status`` says why a metric may be 0 or None, so a reader never mistakes a missing class for a
    perfect or an unmeasured one. Voxel counts are kept so a Dice of 0 on a 3-voxel class can be told
    apart from a Dice of 0 on an organ.
    """

    label: int
    status: ClassStatus
    dice: float | None
    iou: float | None
    nsd: float | None
    hd95: float | None
    voxels_reference: int
    voxels_prediction: int
    nsd_tolerance_mm: float

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (None, never NaN, for undefined values)."""
        return asdict(self)


def dice_score(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient ``2|A∩B| / (|A|+|B|)`` of two binary masks of the same shape.

    Masks must be bool or contain only 0 and 1, so that a label map passed by mistake is rejected
    instead of being scored as "any foreground". Returns NaN when both masks are empty, because
    Dice is 0/0 there and calling it 1 would hide a class that is missing from both.
    """
    a_mask = _as_binary_mask("a", a)
    b_mask = _as_binary_mask("b", b)
    if a_mask.shape != b_mask.shape:
        raise InputImageError(f"Masks must have identical shapes, got a {a_mask.shape} and b {b_mask.shape}.")
    total = int(np.count_nonzero(a_mask)) + int(np.count_nonzero(b_mask))
    if total == 0:
        return math.nan
    return 2.0 * int(np.count_nonzero(a_mask & b_mask)) / total


def label_dice(prediction: np.ndarray, reference: np.ndarray, labels: Sequence[int]) -> dict[int, float]:
    """Dice of each label of two label maps of any shape (``dice_score`` of their masks): NaN where both lack it.

    Any number of axes is accepted, so a batch of tiles' argmax maps is scored as one volume.
    """
    pred, ref = np.asarray(prediction), np.asarray(reference)
    if pred.shape != ref.shape:
        raise InputImageError(f"Prediction and reference must have identical shapes, got {pred.shape} and {ref.shape}.")
    return {int(label): dice_score(pred == label, ref == label) for label in labels}


def read_label_map(path: str | Path) -> np.ndarray:
    """A label map file's voxels in SimpleITK's (z, y, x) order, the one reader of segmentations here."""
    import SimpleITK as sitk

    try:
        return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    except RuntimeError as error:  # SimpleITK raises RuntimeError for unreadable files
        raise InputImageError(f"Label map {path} cannot be read ({str(error).strip().splitlines()[-1]}).") from None


def compute_class_metrics(
    prediction: np.ndarray,
    reference: np.ndarray,
    labels: Sequence[int],
    spacing: Sequence[float],
    nsd_tolerance_mm: float = 2.0,
    hd95: bool = False,
) -> dict[int, ClassMetrics]:
    """Dice, IoU, NSD (and HD95 if asked) of every label in ``labels``, keyed by label.

    ``prediction`` and ``reference`` are integer label maps of identical 2D or 3D shape.
    ``spacing`` is the voxel size in mm per array axis (array order, not SimpleITK's x, y, z order);
    it is required because NSD and HD95 are physical distances and nnU-Net data is routinely
    anisotropic. Every requested label gets an entry, whatever its status (see module docstring).
    """
    pred = _as_label_map("prediction", prediction)
    ref = _as_label_map("reference", reference)
    if pred.shape != ref.shape:
        raise InputImageError(
            f"Prediction and reference must have identical shapes, got {pred.shape} and {ref.shape}."
        )
    spacing_t = _check_spacing(spacing, pred.ndim)
    tolerance = _check_tolerance(nsd_tolerance_mm)
    label_list = _check_labels(labels)

    pred_boxes = _bounding_boxes(pred, label_list)
    ref_boxes = _bounding_boxes(ref, label_list)
    structure = ndimage.generate_binary_structure(pred.ndim, 1)

    results: dict[int, ClassMetrics] = {}
    for label in label_list:
        box_p, box_r = pred_boxes[label], ref_boxes[label]
        if box_p is None and box_r is None:
            results[label] = ClassMetrics(label, ABSENT, None, None, None, None, 0, 0, tolerance)
            continue
        if box_p is None or box_r is None:
            box = box_p if box_p is not None else box_r
            assert box is not None
            source = pred if box_p is not None else ref
            count = int(np.count_nonzero(source[box] == label))
            if box_p is None:
                results[label] = ClassMetrics(
                    label, MISSING_IN_PREDICTION, 0.0, 0.0, 0.0, None, count, 0, tolerance
                )
            else:
                results[label] = ClassMetrics(
                    label, MISSING_IN_REFERENCE, 0.0, 0.0, 0.0, None, 0, count, tolerance
                )
            continue

        box = _union_box(box_p, box_r, pred.shape, pad=1)
        mask_p = pred[box] == label
        mask_r = ref[box] == label
        n_p = int(np.count_nonzero(mask_p))
        n_r = int(np.count_nonzero(mask_r))
        inter = int(np.count_nonzero(mask_p & mask_r))
        dice = 2.0 * inter / (n_p + n_r)
        iou = inter / (n_p + n_r - inter)

        limit = tolerance * (1.0 + _TOLERANCE_SLACK)
        # The k-d tree's bound is strict (d < bound), so prune at twice the limit, never at it.
        bound = math.inf if hd95 else 2.0 * limit
        d_pr, d_rp = _directed_surface_distances(mask_p, mask_r, spacing_t, structure, bound)
        within = int(np.count_nonzero(d_pr <= limit)) + int(np.count_nonzero(d_rp <= limit))
        nsd = within / (d_pr.size + d_rp.size)
        hd = float(np.percentile(np.concatenate([d_pr, d_rp]), 95)) if hd95 else None
        results[label] = ClassMetrics(label, PRESENT, dice, iou, nsd, hd, n_r, n_p, tolerance)
    return results


def summarize(metrics: Mapping[int, ClassMetrics]) -> dict[str, Any]:
    """Means across classes, with the lists of classes each mean includes.

    Dice, IoU and NSD are averaged over classes present in at least one map (``classes_counted``):
    a class missing from either side contributes its 0, so a dropped organ lowers the mean instead
    of vanishing from it. Classes absent from both are listed in ``classes_absent`` and excluded.
    HD95 is averaged over ``hd95_classes_counted`` (status "present" with HD95 computed) only,
    because it is undefined for a missing class. Means are None when no class qualifies.
    """
    items = sorted(metrics.values(), key=lambda m: m.label)
    by_status: dict[str, list[int]] = {
        s: [] for s in (PRESENT, MISSING_IN_PREDICTION, MISSING_IN_REFERENCE, ABSENT)
    }
    for m in items:
        by_status[m.status].append(m.label)
    counted = [m for m in items if m.status != ABSENT]
    hd_counted = [m for m in items if m.status == PRESENT and m.hd95 is not None]
    tolerances = sorted({m.nsd_tolerance_mm for m in items})

    def _mean(values: list[float | None]) -> float | None:
        clean = [v for v in values if v is not None]
        return float(np.mean(clean)) if clean else None

    return {
        "classes": [m.label for m in items],
        "classes_counted": [m.label for m in counted],
        "classes_present": by_status[PRESENT],
        "classes_missing_in_prediction": by_status[MISSING_IN_PREDICTION],
        "classes_missing_in_reference": by_status[MISSING_IN_REFERENCE],
        "classes_absent": by_status[ABSENT],
        "mean_dice": _mean([m.dice for m in counted]),
        "mean_iou": _mean([m.iou for m in counted]),
        "mean_nsd": _mean([m.nsd for m in counted]),
        "nsd_tolerance_mm": tolerances[0] if len(tolerances) == 1 else tolerances,
        "mean_hd95": _mean([m.hd95 for m in hd_counted]),
        "hd95_classes_counted": [m.label for m in hd_counted],
    }


# --------------------------------------------------------------------------------------------------
# internals


def _directed_surface_distances(
    mask_p: np.ndarray,
    mask_r: np.ndarray,
    spacing: tuple[float, ...],
    structure: np.ndarray,
    upper_bound: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from each prediction surface voxel to the reference surface, and back.

    Both masks must be non-empty, so both surfaces are non-empty. Voxels on both surfaces are at
    distance 0 without a search (a near-identical prediction, the usual case when validating a
    compressed model, costs almost nothing); the rest are looked up in a k-d tree of the other
    surface's voxel centres in mm. Distances above ``upper_bound`` may be returned as ``inf``, which
    lets the search prune when only the NSD threshold matters.
    """
    surf_p = mask_p & ~ndimage.binary_erosion(mask_p, structure=structure, border_value=0)
    surf_r = mask_r & ~ndimage.binary_erosion(mask_r, structure=structure, border_value=0)
    scale = np.asarray(spacing, dtype=np.float64)
    return (
        _distances_to_surface(surf_p, surf_r, scale, upper_bound),
        _distances_to_surface(surf_r, surf_p, scale, upper_bound),
    )


def _distances_to_surface(
    source: np.ndarray, target: np.ndarray, scale: np.ndarray, upper_bound: float
) -> np.ndarray:
    """Nearest-``target`` distance (mm) of every ``source`` voxel; shared voxels first, at 0."""
    n_shared = int(np.count_nonzero(source & target))
    only_source = np.argwhere(source & ~target)
    distances = np.zeros(n_shared + only_source.shape[0], dtype=np.float64)
    if only_source.shape[0]:
        tree = cKDTree(np.argwhere(target) * scale)
        distances[n_shared:] = tree.query(only_source * scale, distance_upper_bound=upper_bound)[0]
    return distances


def _bounding_boxes(arr: np.ndarray, labels: list[int]) -> dict[int, _BBox | None]:
    """Bounding box of each label in ``arr`` (None if the label does not occur).

    Positive labels come from a single ``find_objects`` pass; labels <= 0 (which ``find_objects``
    ignores) fall back to a per-label scan.
    """
    boxes: dict[int, _BBox | None] = {}
    positive = [lab for lab in labels if lab > 0]
    if positive:
        found = ndimage.find_objects(arr, max_label=max(positive))
        for lab in positive:
            boxes[lab] = found[lab - 1]
    for lab in labels:
        if lab <= 0:
            coords = np.nonzero(arr == lab)
            if coords[0].size == 0:
                boxes[lab] = None
            else:
                boxes[lab] = tuple(slice(int(c.min()), int(c.max()) + 1) for c in coords)
    return boxes


def _union_box(a: _BBox, b: _BBox, shape: tuple[int, ...], pad: int) -> _BBox:
    """Smallest box holding ``a`` and ``b``, grown by ``pad`` voxels and clipped to the image."""
    return tuple(
        slice(max(min(sa.start, sb.start) - pad, 0), min(max(sa.stop, sb.stop) + pad, n))
        for sa, sb, n in zip(a, b, shape, strict=True)
    )


def _as_label_map(name: str, arr: np.ndarray) -> np.ndarray:
    """Check that ``arr`` is a 2D or 3D integer (or bool) array and return it as an integer array."""
    out = np.asarray(arr)
    if out.dtype == np.bool_:
        out = out.astype(np.uint8)
    if out.dtype.kind not in "iu":
        raise InputImageError(
            f"The {name} must be an integer label map, got dtype {out.dtype}; "
            "round and cast it first (e.g. np.rint(x).astype(np.int16))."
        )
    if out.ndim not in (2, 3):
        raise InputImageError(
            f"The {name} must be a 2D or 3D label map without channel axis, got shape {out.shape}."
        )
    return out


def _as_binary_mask(name: str, arr: np.ndarray) -> np.ndarray:
    """Check that ``arr`` is bool or holds only 0/1 and return it as bool."""
    out = np.asarray(arr)
    if out.dtype == np.bool_:
        return out
    if out.dtype.kind not in "iuf":
        raise InputImageError(f"Mask {name} must be bool or numeric 0/1, got dtype {out.dtype}.")
    values = np.unique(out)
    if not np.all(np.isin(values, (0, 1))):
        shown = values[:5].tolist()
        raise InputImageError(
            f"Mask {name} must contain only 0 and 1 (binary), got values {shown}"
            f"{' ...' if values.size > 5 else ''}; compare a label map with its label first."
        )
    return out.astype(bool)


def _check_spacing(spacing: Sequence[float], ndim: int) -> tuple[float, ...]:
    """Spacing must give one finite, positive size in mm per array axis."""
    try:
        values = tuple(float(s) for s in spacing)
    except (TypeError, ValueError):
        raise InputImageError(
            f"Spacing must be a sequence of {ndim} voxel sizes in mm, got {spacing!r}."
        ) from None
    if len(values) != ndim:
        raise InputImageError(
            f"Spacing must have one entry per array axis ({ndim}), got {len(values)}: {values}."
        )
    if not all(math.isfinite(s) and s > 0 for s in values):
        raise InputImageError(f"Spacing values must be finite and > 0 mm, got {values}.")
    return values


def _check_tolerance(tolerance: float) -> float:
    """NSD tolerance must be a finite distance > 0 mm (0 would make NSD a pure voxel-overlap test)."""
    try:
        value = float(tolerance)
    except (TypeError, ValueError):
        raise InputImageError(f"NSD tolerance must be a number in mm, got {tolerance!r}.") from None
    if not (math.isfinite(value) and value > 0):
        raise InputImageError(f"NSD tolerance must be finite and > 0 mm, got {value}.")
    return value


def _check_labels(labels: Sequence[int]) -> list[int]:
    """Labels must be a non-empty sequence of distinct integers."""
    if isinstance(labels, (str, bytes)) or not isinstance(labels, Sequence | np.ndarray):
        raise InputImageError(f"Labels must be a sequence of integers, got {labels!r}.")
    out: list[int] = []
    for lab in labels:
        if isinstance(lab, bool | np.bool_) or not isinstance(lab, numbers.Integral):
            raise InputImageError(f"Labels must be integers, got {lab!r} in {list(labels)!r}.")
        out.append(int(lab))
    if not out:
        raise InputImageError("Labels must name at least one class, got an empty sequence.")
    if len(set(out)) != len(out):
        dupes = sorted({lab for lab in out if out.count(lab) > 1})
        raise InputImageError(f"Labels must be distinct, got duplicates {dupes} in {out}.")
    return out
