"""A DICOM series checked slice by slice before it is stacked into one volume.

GDCM orders the slices by position and stacks whatever is there: a slice lost in transfer leaves
a gap that the stacked volume hides (its spacing comes from the first two slices), so organs are
placed wrongly from the gap on. The positions, orientations and thicknesses of every slice are
read from the headers (no pixel data) and compared here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

# A step this much larger than the median step is a missing slice, not scanner jitter.
GAP_FACTOR = 1.5
ORIENTATION_TOLERANCE = 1e-3
THICKNESS_TOLERANCE_MM = 0.01


@dataclass(frozen=True)
class DicomSlice:
    path: Path
    position: tuple[float, ...] | None
    orientation: tuple[float, ...] | None
    thickness: float | None
    modality: str | None
    size: tuple[int, ...] = ()  # columns, rows (as the reader reports the slice)
    spacing: tuple[float, ...] = ()  # in-plane pixel spacing, same order

@dataclass(frozen=True)
class SeriesFindings:
    errors: list[str]
    warnings: list[str]


def _numbers(text: str | None) -> tuple[float, ...] | None:
    if not text:
        return None
    try:
        return tuple(float(part) for part in text.strip().split("\\"))
    except ValueError:
        return None


def read_slice_headers(files: list[Path]) -> list[DicomSlice]:
    import SimpleITK as sitk

    slices = []
    for path in files:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()

        def tag(key: str, reader=reader) -> str | None:
            return reader.GetMetaData(key).strip() if reader.HasMetaDataKey(key) else None

        thickness = _numbers(tag("0018|0050"))
        slices.append(DicomSlice(
            path=path,
            position=_numbers(tag("0020|0032")),
            orientation=_numbers(tag("0020|0037")),
            thickness=thickness[0] if thickness else None,
            modality=tag("0008|0060"),
            size=tuple(reader.GetSize()[:2]),
            spacing=tuple(reader.GetSpacing()[:2]),
        ))
    return slices


def series_findings(slices: list[DicomSlice], *, ct_model: bool) -> SeriesFindings:
    """Gaps, repeated positions, mixed orientation or thickness, and a modality other than CT."""
    errors: list[str] = []
    warnings: list[str] = []
    orientations = [s.orientation for s in slices if s.orientation is not None and len(s.orientation) == 6]
    if orientations:
        reference = np.asarray(orientations[0])
        for s in slices:
            if s.orientation is not None and np.max(np.abs(np.asarray(s.orientation) - reference)) > ORIENTATION_TOLERANCE:
                errors.append(
                    f"slice {s.path.name} is oriented {_fmt(s.orientation)}, the series' first slice {_fmt(reference)}; "
                    f"a series must have one orientation"
                )
                break
    thicknesses = sorted({round(s.thickness, 2) for s in slices if s.thickness is not None})
    if thicknesses and thicknesses[-1] - thicknesses[0] > THICKNESS_TOLERANCE_MM:
        errors.append(f"its slices have different thicknesses ({', '.join(f'{t:g}' for t in thicknesses)} mm)")
    if not errors and orientations and len(slices) >= 3:
        errors.extend(_gap_problems(slices))
    modalities = sorted({s.modality for s in slices if s.modality})
    if ct_model and modalities and modalities != ["CT"]:
        warnings.append(f"its modality is {'/'.join(modalities)}, the model was trained on CT")
    return SeriesFindings(errors, warnings)


def stacked(slices: list[DicomSlice]) -> tuple[list[DicomSlice], np.ndarray] | None:
    """The slices ordered along the series' normal with their heights (mm); None if they cannot be placed."""
    orientation = next((s.orientation for s in slices if s.orientation is not None and len(s.orientation) == 6), None)
    if orientation is None or any(s.position is None or len(s.position) != 3 for s in slices):
        return None
    normal = np.cross(orientation[:3], orientation[3:])
    order = sorted(slices, key=lambda s: float(np.dot(s.position, normal)))
    return order, np.array([np.dot(s.position, normal) for s in order])


def slice_step(slices: list[DicomSlice]) -> float | None:
    """The median distance between neighbouring slices, or None with fewer than two placed slices."""
    placed = stacked(slices)
    if placed is None or len(placed[1]) < 2:
        return None
    return float(np.median(np.diff(placed[1])))


def _gap_problems(slices: list[DicomSlice]) -> list[str]:
    placed = stacked(slices)
    if placed is None:
        missing = next(s for s in slices if s.position is None or len(s.position) != 3)
        return [f"slice {missing.path.name} has no ImagePositionPatient, so the slices cannot be placed"]
    order, heights = placed
    steps = np.diff(heights)
    median = float(np.median(steps))
    repeated = np.flatnonzero(steps < 1e-3 * max(median, 1e-6))
    if len(repeated):
        i = int(repeated[0])
        return [f"slices {order[i].path.name} and {order[i + 1].path.name} lie at the same position "
                f"({heights[i]:.2f} mm); the folder holds a slice twice or two series"]
    gaps = np.flatnonzero(steps > GAP_FACTOR * median)
    if not len(gaps):
        return []
    i = int(gaps[0])
    missing = int(round(steps[i] / median)) - 1
    more = f" ({len(gaps)} gaps in all)" if len(gaps) > 1 else ""
    return [
        f"between slices {order[i].path.name} and {order[i + 1].path.name} (at {heights[i]:.2f} and "
        f"{heights[i + 1]:.2f} mm) the step is {steps[i]:.2f} mm, {steps[i] / median:.1f}x the median "
        f"{median:.2f} mm: about {max(missing, 1)} slice(s) missing{more}"
    ]


def _fmt(values) -> str:
    return "(" + ", ".join(f"{float(v):g}" for v in values) + ")"


def series_files(folder: Path, series_id: str) -> list[Path]:
    import SimpleITK as sitk

    return [Path(p) for p in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_id)]
