"""A case from its files to nnU-Net's preprocessed array, checked on the way.

Every caller that segments scans (`infer`, `validate`, the OpenVINO calibration tiles) reads a case
here, so every one of them refuses a broken scan the same way: the integrity checks run on the
files first, nnU-Net's own reader reads the voxels once, the voxels are checked, and nnU-Net's
preprocessing runs on the array it read (``run_case_npy``, the second half of ``run_case``),
without the resampling of a label map that inference has not got (``inference_configuration``).
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tucker_export.errors import BrokenScanError, InputImageError
from tucker_export.nnunet.cases import Case, read_dicom_series


@dataclass
class PreparedCase:
    data: np.ndarray
    properties: dict
    warnings: list[str] = field(default_factory=list)
    # wall seconds of the checks (files and voxels), nnU-Net's read, and the rest of its preprocessing
    seconds: dict[str, float] = field(default_factory=lambda: {"check": 0.0, "read": 0.0, "preprocess": 0.0})
    #: the label map preprocessed with the image (only when a label file was given)
    seg: np.ndarray | None = None


def preprocess_case(case: Case, spec, *, strict: bool = False, stock_export: bool = False,
                    label_file: Path | None = None) -> PreparedCase:
    """Check, read and preprocess ``case`` for ``spec``'s model; raises ``BrokenScanError`` with the findings.

    ``stock_export``: the case will be exported by stock nnU-Net (its memory need is checked for that).
    ``label_file``: a label map preprocessed with the image as nnU-Net's training does (``seg``).
    """
    from tucker_export.integrity.checks import ModelNeeds, check_case
    from tucker_export.integrity.volume import nonfinite_problems

    started = time.perf_counter()
    check = check_case(case, ModelNeeds.from_spec(spec, stock_export=stock_export), strict=strict)
    if not check.ok:
        raise BrokenScanError(check.message())
    checked = time.perf_counter() - started
    file_ending = spec.dataset_json["file_ending"]
    started = time.perf_counter()
    with case_input_files(case, file_ending) as files:
        reader = spec.plans_manager.image_reader_writer_class()
        data, properties = reader.read_images([str(f) for f in files])
    read = time.perf_counter() - started
    started = time.perf_counter()
    shown = [Path(f"{case.dicom_dir.name}/")] if case.dicom_dir is not None else case.files
    problems = nonfinite_problems(data, shown)
    if problems:
        raise BrokenScanError("; ".join(problems))
    checked += time.perf_counter() - started
    if data.shape[0] != spec.num_input_channels:
        raise InputImageError(f"it has {data.shape[0]} channels, the model needs {spec.num_input_channels}")
    seg = None
    if label_file is not None:
        try:
            seg, _ = reader.read_seg(str(label_file))
        except Exception as error:  # nnU-Net's readers raise whatever their backend raises
            raise InputImageError(f"label map {label_file} cannot be read ({str(error).strip().splitlines()[0]})") from None
        if tuple(seg.shape[1:]) != tuple(data.shape[1:]):
            raise InputImageError(f"label map {label_file} has shape {tuple(seg.shape[1:])}, the image {tuple(data.shape[1:])}")
    manager = spec.configuration_manager if seg is not None else inference_configuration(spec.configuration_manager)
    preprocessor = manager.preprocessor_class(verbose=False)
    started = time.perf_counter()
    data, seg, properties = preprocessor.run_case_npy(data, seg, properties, spec.plans_manager, manager, spec.dataset_json)
    seconds = {"check": checked, "read": read, "preprocess": time.perf_counter() - started}
    return PreparedCase(data, properties, check.warnings, seconds, seg if label_file is not None else None)


def inference_configuration(manager):
    """``manager`` with the segmentation resampling switched off, through the plans' own setting.

    Without a label file nnU-Net's preprocessing still resamples the nonzero mask it makes while
    cropping (a label map, class by class), and then throws it away: 42 % of the preprocessing of
    the real CT. Inference never uses it, and the data are resampled exactly as before.
    """
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

    configuration = dict(manager.configuration)
    configuration["resampling_fn_seg"] = "no_resampling_hack"
    configuration["resampling_fn_seg_kwargs"] = {}
    return ConfigurationManager(configuration)


@contextlib.contextmanager
def case_input_files(case: Case, file_ending: str) -> Iterator[list[Path]]:
    """The case's channel files; a DICOM series is converted to a temporary NIfTI first."""
    if case.dicom_dir is None:
        yield case.files
        return
    import SimpleITK as sitk

    with tempfile.TemporaryDirectory(prefix="tucker-export-dicom-") as tmp:
        path = Path(tmp) / f"{case.name}_0000{file_ending}"
        try:
            image = read_dicom_series(case.dicom_dir)
        except RuntimeError as error:
            raise InputImageError(f"DICOM series in {case.dicom_dir} cannot be read ({str(error).splitlines()[0]})") from None
        sitk.WriteImage(image, str(path))
        yield [path]
