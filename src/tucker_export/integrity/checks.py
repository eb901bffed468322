"""Is this case safe to segment? Every check on a scan, before and just after its voxels are read.

``check_case`` runs on the files alone (headers, gzip streams, DICOM slice headers, the memory the
case will need) and costs one decompression of the file; ``nonfinite_problems`` runs on the
voxels that nnU-Net's reader returns, so nothing is read twice. ``check_inputs`` runs both over a
folder for `tucker-export check`, without a model or with one. A finding is one sentence that
names the file and what is wrong.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tucker_export.integrity.dicom import read_slice_headers, series_files, series_findings, slice_step
from tucker_export.integrity.nifti import direction_problems, nifti_problems, spacing_problems
from tucker_export.integrity.volume import available_memory_bytes, memory_problem, nonfinite_problems
from tucker_export.nnunet.cases import NIFTI_ENDINGS, Case, dicom_series_ids


@dataclass(frozen=True)
class ModelNeeds:
    """What a model asks of its input, for the checks that need a model."""

    num_channels: int
    spatial_dims: int
    ct_model: bool
    classes: int
    target_spacing: tuple[float, ...]
    stock_export: bool = False  # the export's memory: stock's all-classes one or the chunked one

    @classmethod
    def from_spec(cls, spec, *, stock_export: bool = False) -> ModelNeeds:
        manager = spec.configuration_manager
        channel_names = [str(v).lower() for v in spec.dataset_json.get("channel_names", {}).values()]
        ct = "CTNormalization" in list(manager.normalization_schemes) or "ct" in channel_names
        return cls(
            num_channels=spec.num_input_channels,
            spatial_dims=len(spec.patch_size),
            ct_model=ct,
            classes=int(spec.label_manager.num_segmentation_heads),
            target_spacing=tuple(float(s) for s in manager.spacing),
            stock_export=stock_export,
        )


@dataclass
class CaseCheck:
    """The findings for one case: errors stop it, warnings are reported (errors with ``strict``)."""

    case: str
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    shape: tuple[int, ...] | None = None
    spacing: tuple[float, ...] | None = None

    @property
    def ok(self) -> bool:
        return not self.errors

    def message(self) -> str:
        return "; ".join(self.errors)


def check_case(
    case: Case,
    needs: ModelNeeds | None = None,
    *,
    strict: bool = False,
    available_memory: Callable[[], int | None] = available_memory_bytes,
) -> CaseCheck:
    """Every check that needs no voxel data; ``needs`` adds the model's (dimensionality, memory, modality)."""
    check = CaseCheck(case.name)
    if case.problem:
        check.errors.append(case.problem)
        return check
    if case.dicom_dir is not None:
        _check_dicom(case, needs, check)
    else:
        _check_files(case, needs, check)
    if check.ok and needs is not None and check.shape is not None and check.spacing is not None:
        problem = memory_problem(check.shape, check.spacing, needs.target_spacing, channels=needs.num_channels,
                                 classes=needs.classes, available=available_memory(),
                                 stock_export=needs.stock_export)
        if problem:
            check.errors.append(problem)
    if strict and check.warnings:
        check.errors.extend(f"{w} (refused in strict mode)" for w in check.warnings)
        check.warnings = []
    return check


def _check_files(case: Case, needs: ModelNeeds | None, check: CaseCheck) -> None:
    import SimpleITK as sitk

    sizes = []
    for path in case.files:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            check.errors.append(f"{path.name} cannot be read as an image (corrupt or not NIfTI)")
            return
        dimension = reader.GetDimension()
        if needs is not None and needs.spatial_dims == 3 and dimension != 3:
            check.errors.append(f"{path.name} is a {dimension}D image, the model is 3D")
            return
        if reader.GetNumberOfComponents() != 1:
            check.errors.append(f"{path.name} has {reader.GetNumberOfComponents()} components per voxel; "
                                f"give each channel its own file")
            return
        if any(path.name.endswith(e) for e in NIFTI_ENDINGS):
            check.errors.extend(f"{path.name}: {p}" for p in nifti_problems(path))
        else:  # other formats: what their reader reports is all there is to check
            check.errors.extend(f"{path.name}: {p}" for p in spacing_problems(reader.GetSpacing()))
            check.errors.extend(f"{path.name}: {p}" for p in direction_problems(
                np.reshape(reader.GetDirection(), (dimension, dimension))))
        sizes.append(tuple(reader.GetSize()))
        check.shape, check.spacing = tuple(reader.GetSize()), tuple(reader.GetSpacing())
    if len(set(sizes)) > 1:
        check.errors.append(f"its channel files have different sizes {sorted(set(sizes))}")


def _check_dicom(case: Case, needs: ModelNeeds | None, check: CaseCheck) -> None:
    folder = case.dicom_dir
    files = series_files(folder, dicom_series_ids(folder)[0])  # one series: discovery refuses folders of several
    try:
        slices = read_slice_headers(files)
    except RuntimeError as error:
        check.errors.append(f"{folder.name}/: a slice cannot be read ({str(error).strip().splitlines()[0]})")
        return
    findings = series_findings(slices, ct_model=needs is not None and needs.ct_model)
    check.errors.extend(f"{folder.name}/: {e}" for e in findings.errors)
    check.warnings.extend(f"{folder.name}/: {w}" for w in findings.warnings)
    step = slice_step(slices) or slices[0].thickness or 1.0
    check.shape = (*slices[0].size, len(files))
    check.spacing = (*slices[0].spacing, step)


@dataclass
class InputsReport:
    """`tucker-export check`: one ``CaseCheck`` per case, voxels read and checked for the sound ones."""

    checks: list[CaseCheck]

    @property
    def failed(self) -> list[CaseCheck]:
        return [c for c in self.checks if not c.ok]

    def to_dict(self) -> dict:
        return {"cases": [{"name": c.case, "ok": c.ok, "errors": c.errors, "warnings": c.warnings,
                           "shape": list(c.shape) if c.shape else None,
                           "spacing": list(c.spacing) if c.spacing else None} for c in self.checks]}


def check_inputs(
    input_path: str | Path,
    needs: ModelNeeds | None = None,
    *,
    strict: bool = False,
    file_ending: str = ".nii.gz",
    progress: bool = False,
) -> InputsReport:
    """Every check on every case under ``input_path``, reading the voxels of the cases that pass."""
    from tqdm import tqdm

    from tucker_export.nnunet.cases import discover_cases

    cases = discover_cases(input_path, num_channels=needs.num_channels if needs else None, file_ending=file_ending)
    checks = []
    for case in tqdm(cases, desc="checking", unit="case", disable=not progress):
        check = check_case(case, needs, strict=strict)
        if check.ok:
            check.errors.extend(_voxel_problems(case))
        checks.append(check)
    return InputsReport(checks)


def _voxel_problems(case: Case) -> list[str]:
    """NaN/Inf in voxels no file check has seen: NIfTI floats were counted from the raw bytes already
    (and SimpleITK would read their NaN as 0), so only DICOM series and other formats are read here."""
    import SimpleITK as sitk

    from tucker_export.nnunet.cases import read_dicom_series

    if case.dicom_dir is not None:
        sources = [(Path(f"{case.dicom_dir.name}/"), lambda: read_dicom_series(case.dicom_dir))]
    else:
        sources = [(f, lambda f=f: sitk.ReadImage(str(f))) for f in case.files
                   if not any(f.name.endswith(e) for e in NIFTI_ENDINGS)]
    problems = []
    for name, read in sources:
        try:
            array = sitk.GetArrayViewFromImage(read())
        except RuntimeError as error:
            return [f"its voxels cannot be read ({str(error).strip().splitlines()[0]})"]
        problems.extend(nonfinite_problems(np.asarray(array)[None], [name]))
    return problems


def format_inputs_report(report: InputsReport) -> str:
    """A table: case, verdict, size and spacing, then each finding on its own line."""
    lines = [f"{'case':<28} {'verdict':<8} {'size':<16} spacing (mm)"]
    for check in report.checks:
        verdict = "FAILED" if not check.ok else ("warning" if check.warnings else "ok")
        size = "x".join(map(str, check.shape)) if check.shape else "-"
        spacing = "x".join(f"{s:g}" for s in check.spacing) if check.spacing else "-"
        lines.append(f"{check.case:<28} {verdict:<8} {size:<16} {spacing}")
        lines.extend(f"    error: {e}" for e in check.errors)
        lines.extend(f"    warning: {w}" for w in check.warnings)
    failed = len(report.failed)
    lines.append(f"{len(report.checks) - failed} of {len(report.checks)} case(s) can be segmented, {failed} cannot.")
    return "\n".join(lines)
