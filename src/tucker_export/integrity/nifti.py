"""What a NIfTI file promises against what it holds, checked before any reader touches the voxels.

SimpleITK reads a ``.nii.gz`` whose gzip stream was cut short without complaint and fills the
missing voxels with zeros; nnU-Net then segments the zeros. So the stream is decompressed here
once, to its end marker, with zlib checking the CRC-32 and length trailer of every member, and
the number of bytes that arrive is compared with what the header's dimensions promise. The header
is also where a zero spacing hides: ITK replaces a pixdim <= 0 by 1 mm without saying so.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_CHUNK = 1 << 20
# NIfTI-2's header is the larger (540 bytes); 4 more hold the extension flag.
_HEADER_BYTES = 544
# Normalised direction columns whose dot products stay below this are orthonormal; real scanners
# write sforms that are orthonormal only to float32 precision, so the tolerance is not 1e-6.
ORTHONORMAL_TOLERANCE = 1e-3


@dataclass(frozen=True)
class NiftiHeader:
    """The fields of a NIfTI-1/2 header that decide whether its voxel data can be complete and placed."""

    version: int
    shape: tuple[int, ...]
    bytes_per_voxel: float
    voxel_offset: int
    spacing: tuple[float, ...]
    affine: np.ndarray
    dtype: np.dtype

    @property
    def voxels(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def expected_bytes(self) -> int:
        return self.voxel_offset + int(self.voxels * self.bytes_per_voxel)


class _Chunks:
    """The decompressed bytes of a file, chunk by chunk; ``problem`` says why the stream ended early."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.compressed = 0
        self.problem: str | None = None

    def __iter__(self) -> Iterator[bytes]:
        with open(self.path, "rb") as stream:
            if not self.path.name.endswith(".gz"):
                while chunk := stream.read(_CHUNK):
                    self.compressed += len(chunk)
                    yield chunk
                return
            inflater = zlib.decompressobj(wbits=31)
            member_started = False
            while chunk := stream.read(_CHUNK):
                self.compressed += len(chunk)
                pending = chunk
                while pending:
                    member_started = True
                    try:
                        out = inflater.decompress(pending)
                    except zlib.error as error:
                        self.problem = _zlib_problem(error, self.compressed)
                        return
                    pending = b""
                    if out:
                        yield out
                    if inflater.eof:
                        # Concatenated members are valid gzip; trailing zero padding (some tape and
                        # transfer tools add it) is ignored as gzip(1) does.
                        rest = inflater.unused_data
                        inflater = zlib.decompressobj(wbits=31)
                        member_started = False
                        if rest.strip(b"\0"):
                            pending = rest
            if member_started and not inflater.eof:
                self.problem = (f"the gzip stream ends after {self.compressed:,} bytes, before its end marker "
                                f"(the file was cut short)")


class _NonFiniteCounter:
    """NaN and Inf among float voxels fed as raw bytes from ``offset`` on, across chunk boundaries."""

    def __init__(self, offset: int, dtype: np.dtype) -> None:
        self.skip = offset
        self.dtype = dtype
        self.leftover = b""
        self.nan = self.inf = 0

    def feed(self, chunk: bytes) -> None:
        if self.skip:
            dropped = min(self.skip, len(chunk))
            self.skip -= dropped
            chunk = chunk[dropped:]
        chunk = self.leftover + chunk
        usable = len(chunk) - len(chunk) % self.dtype.itemsize
        self.leftover = chunk[usable:]
        values = np.frombuffer(chunk[:usable], dtype=self.dtype)
        nan = np.isnan(values)
        self.nan += int(nan.sum())
        self.inf += int(np.isinf(values).sum())


def _zlib_problem(error: zlib.error, compressed: int) -> str:
    text = str(error)
    if "incorrect data check" in text:
        return "its gzip stream fails its CRC-32 check (the data was damaged)"
    if "incorrect length check" in text:
        return "its gzip stream's length trailer does not match the data (the data was damaged)"
    return f"its gzip stream is corrupt within its first {compressed:,} bytes ({text})"


def parse_nifti_header(head: bytes) -> NiftiHeader | None:
    """The header in the first bytes of a NIfTI file, or None when they are not a NIfTI header."""
    import nibabel

    if len(head) < 348:
        return None
    for header_class, version, size in ((nibabel.Nifti1Header, 1, 348), (nibabel.Nifti2Header, 2, 540)):
        little = int.from_bytes(head[:4], "little")
        big = int.from_bytes(head[:4], "big")
        if size not in (little, big) or len(head) < size:
            continue
        try:
            header = header_class.from_fileobj(io.BytesIO(head[:size]), check=False)
        except Exception:  # noqa: BLE001 - nibabel raises many types for garbage; any means "not NIfTI"
            return None
        ndim = int(header["dim"][0])
        if not 1 <= ndim <= 7:
            return None
        dims = tuple(int(d) for d in header["dim"][1 : ndim + 1])
        pixdim = tuple(float(p) for p in header["pixdim"][1 : min(ndim, 3) + 1])
        return NiftiHeader(
            version=version,
            shape=dims,
            bytes_per_voxel=int(header["bitpix"]) / 8,
            voxel_offset=int(header["vox_offset"]),
            spacing=pixdim,
            affine=_affine_or_none(header),
            dtype=_data_dtype(header),
        )
    return None


def _data_dtype(header) -> np.dtype:
    try:
        return np.dtype(header.get_data_dtype())
    except Exception:  # noqa: BLE001 - an unknown datatype code: nothing to count, the reader will refuse it
        return np.dtype("V1")


def _affine_or_none(header) -> np.ndarray:
    try:
        return np.asarray(header.get_best_affine(), dtype=np.float64)
    except Exception:  # noqa: BLE001 - an unusable transform is reported by the geometry check
        return np.full((4, 4), np.nan)


def nifti_problems(path: Path) -> list[str]:
    """Everything wrong with ``path``'s stream, header and float voxels that a reader would not say.

    One pass over the (decompressed) bytes; [] when the file is sound.
    """
    chunks = _Chunks(path)
    head = bytearray()
    header: NiftiHeader | None = None
    counter: _NonFiniteCounter | None = None
    before_header: list[bytes] = []  # chunks that arrived before the header could be parsed
    arrived = 0
    for chunk in chunks:
        arrived += len(chunk)
        if header is None:
            head += chunk[: _HEADER_BYTES - len(head)]
            before_header.append(chunk)
            if len(head) < _HEADER_BYTES:
                continue
            header = parse_nifti_header(bytes(head))
            if header is None:
                return ["it does not start with a NIfTI-1 or NIfTI-2 header"]
            if header.dtype.kind == "f":
                counter = _NonFiniteCounter(header.voxel_offset, header.dtype)
            chunk = b"".join(before_header)
        if counter is not None:
            counter.feed(chunk)
    if header is None:  # a file shorter than the largest header
        header = parse_nifti_header(bytes(head))
        if header is not None and header.dtype.kind == "f":
            counter = _NonFiniteCounter(header.voxel_offset, header.dtype)
            counter.feed(bytes(head))
    if header is None:
        if chunks.problem:
            return [chunks.problem]
        return ["it does not start with a NIfTI-1 or NIfTI-2 header"] if head else []
    problems = []
    promise = (
        f"the header promises {header.voxels:,} voxels ({'x'.join(map(str, header.shape))} of "
        f"{header.bytes_per_voxel:g} bytes, {header.expected_bytes:,} bytes with the header)"
    )
    if chunks.problem:
        problems.append(f"{chunks.problem}; {promise}, {arrived:,} bytes arrived")
    elif arrived < header.expected_bytes:
        where = "it decompresses to" if path.name.endswith(".gz") else "the file holds"
        problems.append(f"{where} {arrived:,} bytes; {promise}")
    elif counter is not None and (counter.nan or counter.inf):
        problems.append(nonfinite_sentence(counter.nan, counter.inf, header.voxels))
    spacing = spacing_problems(header.spacing)
    problems.extend(spacing)
    if not spacing and len(header.shape) >= 3:
        problems.extend(direction_problems(header.affine[:3, :3], what="its header's direction matrix"))
    return problems


def nonfinite_sentence(nan: int, inf: int, voxels: int) -> str:
    return (f"{nan:,} NaN and {inf:,} infinite voxels of {voxels:,}; readers turn them into made-up "
            f"intensities (SimpleITK reads NaN as 0)")


def spacing_problems(spacing) -> list[str]:
    bad = [float(s) for s in spacing if not np.isfinite(s) or s <= 0]
    if not bad:
        return []
    shown = ", ".join(f"{s:g}" for s in spacing)
    return [f"its voxel spacing ({shown} mm) has a zero, negative or non-finite value; "
            f"readers would substitute 1 mm and the segmentation would be wrongly scaled"]


def direction_problems(matrix, *, what: str = "its direction matrix") -> list[str]:
    """Non-orthonormal (sheared, singular or non-finite) direction cosines, which ITK cannot place."""
    matrix = np.asarray(matrix, dtype=np.float64)
    if not np.all(np.isfinite(matrix)):
        return [f"{what} has non-finite entries"]
    norms = np.linalg.norm(matrix, axis=0)
    if np.any(norms == 0):
        return [f"{what} has a zero column"]
    unit = matrix / norms
    deviation = float(np.max(np.abs(unit.T @ unit - np.eye(matrix.shape[1]))))
    if deviation > ORTHONORMAL_TOLERANCE:
        return [f"{what} is not orthonormal (its axes deviate from right angles by up to {deviation:.3f} in "
                f"cosine); the segmentation would not overlay the scan"]
    return []
