"""Gzip streams and NIfTI headers: every way a file can promise more than it holds."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel
import numpy as np
import pytest
from factories import write_ct

from tucker_export.integrity.nifti import _NonFiniteCounter, direction_problems, nifti_problems

SHAPE = (20, 30, 25)  # z, y, x as written; 15,000 int16 voxels
VOXELS = 15_000


@pytest.fixture
def scan(tmp_path: Path) -> Path:
    path = tmp_path / "scan.nii.gz"
    write_ct(path, shape=SHAPE)
    return path


def test_a_sound_file_has_no_problems(scan: Path) -> None:
    assert nifti_problems(scan) == []


def test_nan_voxels_are_found_in_the_file_because_simpleitk_reads_them_as_zero(tmp_path: Path) -> None:
    import SimpleITK as sitk

    volume = np.ones(SHAPE, np.float32)
    volume[2, 3, 4:7] = np.nan
    volume[5, 5, 5] = -np.inf
    path = tmp_path / "nan.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(volume), str(path))
    assert not np.isnan(sitk.GetArrayFromImage(sitk.ReadImage(str(path)))).any()  # why the file is checked
    assert nifti_problems(path) == [
        f"3 NaN and 1 infinite voxels of {VOXELS:,}; readers turn them into made-up intensities (SimpleITK reads NaN as 0)"
    ]


def test_nonfinite_counter_across_chunk_boundaries() -> None:
    values = np.array([1.0, np.nan, 2.0, np.inf, np.nan], "<f4").tobytes()
    counter = _NonFiniteCounter(offset=3, dtype=np.dtype("<f4"))
    raw = b"hdr" + values
    for start in range(0, len(raw), 3):  # 3-byte chunks split every float
        counter.feed(raw[start : start + 3])
    assert (counter.nan, counter.inf) == (2, 1)


@pytest.mark.parametrize("keep", [0.05, 0.5, 0.9, -8, -4, -1])
def test_truncated_gzip_is_named_with_what_the_header_promises(scan: Path, keep: float) -> None:
    data = scan.read_bytes()
    cut = int(len(data) * keep) if keep > 0 else len(data) + int(keep)
    scan.write_bytes(data[:cut])
    (problem,) = nifti_problems(scan)
    assert problem.startswith(f"the gzip stream ends after {cut:,} bytes, before its end marker")
    if cut > 400:  # enough for the header to arrive
        assert f"the header promises {VOXELS:,} voxels" in problem


def test_damaged_crc_and_length_trailers(scan: Path) -> None:
    data = bytearray(scan.read_bytes())
    data[-8] ^= 0xFF  # first byte of the CRC-32
    scan.write_bytes(bytes(data))
    assert "fails its CRC-32 check" in nifti_problems(scan)[0]
    data[-8] ^= 0xFF
    data[-1] ^= 0x01  # the ISIZE trailer
    scan.write_bytes(bytes(data))
    assert "length trailer does not match" in nifti_problems(scan)[0]


def test_concatenated_members_and_zero_padding_are_valid(scan: Path, tmp_path: Path) -> None:
    raw = gzip.decompress(scan.read_bytes())
    split = tmp_path / "two_members.nii.gz"
    split.write_bytes(gzip.compress(raw[:5000]) + gzip.compress(raw[5000:]) + b"\0" * 512)
    assert nifti_problems(split) == []


def test_uncompressed_nifti_shorter_than_its_header_says(tmp_path: Path) -> None:
    path = tmp_path / "scan.nii"
    write_ct(path, shape=SHAPE)
    data = path.read_bytes()
    path.write_bytes(data[: 352 + 2 * VOXELS - 1000])
    (problem,) = nifti_problems(path)
    assert problem == (
        f"the file holds {352 + 2 * VOXELS - 1000:,} bytes; the header promises {VOXELS:,} voxels "
        f"(25x30x20 of 2 bytes, {352 + 2 * VOXELS:,} bytes with the header)"
    )


def _patch_header(path: Path, offset: int, value: np.ndarray) -> None:
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[offset : offset + value.nbytes] = value.tobytes()
    path.write_bytes(gzip.compress(bytes(raw)))


def test_zero_and_negative_spacing(scan: Path) -> None:
    _patch_header(scan, 80, np.array([0.0], "<f4"))  # pixdim[1]
    (problem,) = nifti_problems(scan)
    assert "its voxel spacing (0, 1, 1.5 mm) has a zero, negative or non-finite value" in problem
    _patch_header(scan, 80, np.array([-1.0], "<f4"))
    assert "(-1, 1, 1.5 mm)" in nifti_problems(scan)[0]


def test_sheared_sform_is_not_orthonormal(tmp_path: Path) -> None:
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    affine[0, 1] = 0.4  # shear
    image = nibabel.Nifti1Image(np.zeros((4, 5, 6), np.int16), affine)
    image.set_sform(affine, code=1)
    path = tmp_path / "sheared.nii.gz"
    nibabel.save(image, path)
    (problem,) = nifti_problems(path)
    assert "its header's direction matrix is not orthonormal" in problem


def test_direction_problems() -> None:
    assert direction_problems(np.eye(3)) == []
    assert direction_problems(np.diag([0.8, 0.8, 3.0])) == []  # scaled axes are still orthogonal
    assert "not orthonormal" in direction_problems([[1, 0.1, 0], [0, 1, 0], [0, 0, 1]])[0]
    assert "zero column" in direction_problems([[1, 0, 0], [0, 1, 0], [0, 0, 0]])[0]
    assert "non-finite" in direction_problems([[np.nan, 0, 0], [0, 1, 0], [0, 0, 1]])[0]


def test_not_nifti_and_real_ct_cut_short(tmp_path: Path, shared_ct_dir: Path) -> None:
    """The issue's example: the first 20,000 bytes of the real 483 KB CT."""
    cut = tmp_path / "example_ct_sm.nii.gz"
    cut.write_bytes((shared_ct_dir / "example_ct_sm.nii.gz").read_bytes()[:20_000])
    (problem,) = nifti_problems(cut)
    assert problem.startswith("the gzip stream ends after 20,000 bytes, before its end marker")
    assert "the header promises 369,660 voxels (122x101x30 of 2 bytes" in problem
