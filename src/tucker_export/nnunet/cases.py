"""Finding the cases in what a user points `infer` at.

Accepted inputs:

- a folder of images in nnU-Net's naming (``case_0000.nii.gz``, ``case_0001.nii.gz``, ...), and
  plain single-channel files (``case.nii.gz``), mixed freely;
- a single image file (its ``_000N`` siblings are picked up for multi-channel models);
- DICOM: a series folder, or a folder whose subfolders are series. Slices are ordered by GDCM
  by patient position, never by file name.

A case that cannot be used is not an error here: it is returned with a ``problem`` so that the
caller can report it and carry on with the others.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from tucker_export.errors import InputImageError

logger = logging.getLogger(__name__)

_CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
NIFTI_ENDINGS = (".nii.gz", ".nii")


@dataclass
class Case:
    """One case to segment: channel files in order, or a DICOM series folder."""

    name: str
    files: list[Path] = field(default_factory=list)
    dicom_dir: Path | None = None
    problem: str | None = None


def _strip_ending(path: Path, endings: tuple[str, ...]) -> str | None:
    for ending in endings:
        if path.name.endswith(ending):
            return path.name[: -len(ending)]
    return None


def dicom_series_ids(folder: Path) -> list[str]:
    import SimpleITK as sitk

    return list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)) or [])


def _image_cases(files: list[Path], endings: tuple[str, ...], num_channels: int | None) -> list[Case]:
    grouped: dict[str, dict[int, Path]] = {}
    plain: dict[str, Path] = {}
    for path in files:
        stem = _strip_ending(path, endings)
        if stem is None:
            continue
        match = _CHANNEL_SUFFIX.match(stem)
        if match:
            grouped.setdefault(match["case"], {})[int(match["channel"])] = path
        else:
            plain[stem] = path
    cases = []
    for name, channels in grouped.items():
        ordered = [channels[i] for i in sorted(channels)]
        case = Case(name=name, files=ordered)
        if sorted(channels) != list(range(len(channels))):
            case.problem = f"its channel files are not numbered 0000..{len(channels) - 1:04d} (found {sorted(channels)})"
        elif num_channels is not None and len(ordered) != num_channels:
            case.problem = f"it has {len(ordered)} channel file(s), the model needs {num_channels}"
        cases.append(case)
    for name, path in plain.items():
        if name in grouped:
            continue
        case = Case(name=name, files=[path])
        if num_channels not in (None, 1):
            case.problem = (
                f"it is a single file, the model needs {num_channels} channels named {name}_0000..{name}_{num_channels - 1:04d}"
            )
        cases.append(case)
    return cases


def discover_cases(
    input_path: str | Path, *, num_channels: int | None, file_ending: str = ".nii.gz"
) -> list[Case]:
    """The cases under ``input_path``, sorted by name; raises only when there is nothing to do.

    ``num_channels``: the model's input channels, checked per case; None checks no count.
    """
    input_path = Path(input_path)
    endings = tuple(dict.fromkeys((file_ending, *NIFTI_ENDINGS)))
    if not input_path.exists():
        raise InputImageError(f"Input {input_path} does not exist.")
    if input_path.is_file():
        stem = _strip_ending(input_path, endings)
        if stem is None:
            raise InputImageError(
                f"Input file {input_path.name} is not a {' or '.join(endings)} image; pass a NIfTI file, "
                f"a folder of them, or a DICOM series folder."
            )
        match = _CHANNEL_SUFFIX.match(stem)
        if match and (num_channels is None or num_channels > 1):
            siblings = sorted(input_path.parent.glob(f"{match['case']}_[0-9][0-9][0-9][0-9]*"))
            return _image_cases(siblings, endings, num_channels)
        return [Case(name=match["case"] if match else stem, files=[input_path])]

    children = sorted(input_path.iterdir())
    files = [p for p in children if p.is_file() and not p.name.startswith(".")]
    cases = _image_cases(files, endings, num_channels)
    if not cases and dicom_series_ids(input_path):
        cases.append(_dicom_case(input_path.name, input_path, num_channels))
    for sub in (p for p in children if p.is_dir() and not p.name.startswith(".")):
        if dicom_series_ids(sub):
            cases.append(_dicom_case(sub.name, sub, num_channels))
    if not cases:
        raise InputImageError(
            f"Input folder {input_path} holds no {' or '.join(endings)} images and no DICOM series."
        )
    names = [c.name for c in cases]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InputImageError(
            f"Input folder {input_path} has several cases named {duplicates[0]!r} (e.g. a NIfTI file and a DICOM "
            f"folder); rename one so each output file is unique."
        )
    return sorted(cases, key=lambda c: c.name)


def _dicom_case(name: str, folder: Path, num_channels: int | None) -> Case:
    case = Case(name=name, dicom_dir=folder)
    series = dicom_series_ids(folder)
    if len(series) > 1:
        case.problem = f"{folder.name}/ holds {len(series)} DICOM series; put each series in its own folder"
    elif num_channels not in (None, 1):
        case.problem = f"a DICOM series is one channel, the model needs {num_channels}"
    return case


def read_dicom_series(folder: Path):
    """The series in ``folder`` as one SimpleITK image, slices ordered by position (GDCM)."""
    import SimpleITK as sitk

    (series_id,) = dicom_series_ids(folder)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_id))
    return reader.Execute()
