"""Seeded generator of small CT-like 3D phantoms with organ-like label maps.

Unit tests and benchmarks that need a known geometry (a shape, a spacing, a case of a given size) make
them; the built-in model is trained on real CT (:mod:`.retrain`), and the phantom model of earlier
versions survives only in ``tests/data/bundle_v1_2026-12``, which the tests segment phantoms with. Each case is a torso-like body ellipsoid of soft tissue in
air with five structures of distinct Hounsfield units:

====  ========  =========  =========================================================
label name      HU         shape
====  ========  =========  =========================================================
1     liver     +120       large deformed blob, anterior, on a random side, below the lungs
2     kidney    +220       pair of (slightly deformed, rotated) ellipsoids, posterior
3     spine     +700       curved tube along the body axis, posterior midline
4     lung      -800       pair of large deformed ellipsoids in the upper half
5     fat       -180       deformed blob, anterior, opposite the liver
====  ========  =========  =========================================================

Soft tissue is +40 HU and air -1000 HU; each case jitters every value by up to +-10 HU.

Shapes are defined analytically in millimetres, so a case can be sampled on any grid: most cases are
near-isotropic (about 1.5 mm), some are anisotropic (3.0 mm slices, 1.5 mm in plane), like thick-slice
CT. Every case covers the same field of view, so after nnU-Net resamples it to the median spacing all
cases have (nearly) the same shape, which the demo plans cover with a single patch.

Array axis order is (z, y, x) as SimpleITK's ``GetArrayFromImage`` returns it; spacings are given in
the same (z, y, x) order. The soft-tissue contrasts are deliberately larger than in real CT (liver vs.
muscle is ~20 HU there; these look more like a contrast-enhanced scan, and the "fat" is darker than
real fat) so that a model trained for a few minutes on two CPU cores reaches Dice >= 0.9; the demo
exists to exercise the deployment pipeline, not to benchmark segmentation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "AIR_HU",
    "ANISOTROPIC_SPACING",
    "FIELD_OF_VIEW_MM",
    "LABEL_NAMES",
    "NOMINAL_SPACING",
    "STRUCTURE_HU",
    "TISSUE_HU",
    "PhantomCase",
    "generate_phantom",
    "write_case",
]

#: Physical extent (z, y, x) of every case in millimetres. At the nominal 1.5 mm spacing this is a
#: (30, 46, 46) grid, which the demo plans cover with one (32, 48, 48) patch: small enough for a few
#: minutes of CPU training, large enough (structures of hundreds to thousands of voxels) for Dice >= 0.9.
FIELD_OF_VIEW_MM: tuple[float, float, float] = (45.0, 69.0, 69.0)
#: Nominal (z, y, x) spacing of near-isotropic cases; each case jitters it by a few percent.
NOMINAL_SPACING: tuple[float, float, float] = (1.5, 1.5, 1.5)
#: (z, y, x) spacing of the anisotropic (thick-slice) cases.
ANISOTROPIC_SPACING: tuple[float, float, float] = (3.0, 1.5, 1.5)
#: Probability that ``generate_phantom(seed)`` draws an anisotropic case when not told.
ANISOTROPIC_PROBABILITY = 0.25

AIR_HU = -1000.0
TISSUE_HU = 40.0

#: Label value -> structure name; 0 is background (air and plain soft tissue).
LABEL_NAMES: dict[int, str] = {0: "background", 1: "liver", 2: "kidney", 3: "spine", 4: "lung", 5: "fat"}
#: Structure name -> mean HU (each case jitters it by up to +-10 HU).
STRUCTURE_HU: dict[str, float] = {
    "liver": 120.0,
    "kidney": 220.0,
    "spine": 700.0,
    "lung": -800.0,
    "fat": -180.0,
}


@dataclass(frozen=True)
class PhantomCase:
    """One phantom: ``image`` in HU (float32) and ``labels`` (uint8), both (z, y, x), with ``spacing`` in mm."""

    image: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, float, float]
    anisotropic: bool


def _grid(shape: tuple[int, ...], spacing: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Voxel-centre coordinates in mm, centred on the volume, as broadcastable (z, y, x) arrays."""
    axes = [(np.arange(n, dtype=np.float32) - (n - 1) / 2.0) * s for n, s in zip(shape, spacing)]
    z, y, x = np.meshgrid(*axes, indexing="ij", sparse=True)
    return z, y, x


class _SmoothField:
    """A random smooth scalar field (a few low-frequency sinusoids) in normalised coordinates.

    Analytic rather than filtered noise, so the same case looks the same on an isotropic and on an
    anisotropic grid, and evaluation costs a handful of vectorised ``sin`` calls.
    """

    def __init__(self, rng: np.random.Generator, n_terms: int = 4, max_freq: float = 3.0) -> None:
        directions = rng.normal(size=(n_terms, 3))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        self.freqs = directions * rng.uniform(1.0, max_freq, size=(n_terms, 1))
        self.phases = rng.uniform(0.0, 2.0 * math.pi, size=n_terms)
        # Normalised so the field stays roughly within [-1, 1].
        self.amps = rng.uniform(0.5, 1.0, size=n_terms) / math.sqrt(n_terms)

    def __call__(self, uz: np.ndarray, uy: np.ndarray, ux: np.ndarray) -> np.ndarray:
        out = np.zeros(np.broadcast_shapes(uz.shape, uy.shape, ux.shape), dtype=np.float32)
        for (fz, fy, fx), phase, amp in zip(self.freqs, self.phases, self.amps):
            out += np.float32(amp) * np.sin(fz * uz + fy * uy + fx * ux + phase).astype(np.float32)
        return out


def _ellipsoid_level(
    coords: tuple[np.ndarray, np.ndarray, np.ndarray],
    centre: np.ndarray,
    semi_axes: np.ndarray,
    angle: float,
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Implicit ellipsoid value (< 1 inside) rotated by ``angle`` about z, plus the local unit coordinates."""
    z, y, x = coords
    dz, dy, dx = z - centre[0], y - centre[1], x - centre[2]
    c, s = math.cos(angle), math.sin(angle)
    ry, rx = c * dy - s * dx, s * dy + c * dx
    uz, uy, ux = dz / semi_axes[0], ry / semi_axes[1], rx / semi_axes[2]
    return uz * uz + uy * uy + ux * ux, (uz, uy, ux)


def _blob(
    coords: tuple[np.ndarray, np.ndarray, np.ndarray],
    rng: np.random.Generator,
    centre: np.ndarray,
    semi_axes: np.ndarray,
    deform: float,
    max_angle: float = 0.35,
) -> np.ndarray:
    """A randomly rotated ellipsoid whose surface is pushed in and out by a smooth field (amplitude ``deform``)."""
    angle = float(rng.uniform(-max_angle, max_angle))
    level, local = _ellipsoid_level(coords, centre, semi_axes, angle)
    if deform > 0:
        level = level + np.float32(deform) * _SmoothField(rng)(*local)
    return level < 1.0


def _jitter(rng: np.random.Generator, value: np.ndarray, rel: float) -> np.ndarray:
    return value * rng.uniform(1.0 - rel, 1.0 + rel, size=np.shape(value))


def _structures(
    coords: tuple[np.ndarray, np.ndarray, np.ndarray], rng: np.random.Generator, half: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Body mask and label map for one case; every random draw happens here, in a fixed order."""
    z, y, x = coords
    shape = np.broadcast_shapes(z.shape, y.shape, x.shape)

    def pos(fz: float, fy: float, fx: float, jit: float = 0.06) -> np.ndarray:
        # Centres are fractions of the half field of view (z superior+, y posterior+, x patient left+).
        return (np.array([fz, fy, fx]) + rng.uniform(-jit, jit, size=3)) * half

    # Torso: an ellipsoid much longer than the field of view in z, so it looks like a cut-out trunk.
    body_centre = pos(0.0, 0.0, 0.0, jit=0.03)
    body_axes = _jitter(rng, np.array([1.8, 0.78, 0.92]) * half, 0.05)
    body_level, _ = _ellipsoid_level(coords, body_centre, body_axes, float(rng.uniform(-0.1, 0.1)))
    body = body_level < 1.0

    labels = np.zeros(shape, dtype=np.uint8)

    # Painted in a fixed order; later structures win where shapes touch. Lungs come after the liver so the
    # liver dome is cut by the lung base (one piece) instead of leaving liver islands inside a lung.
    # Which side the liver sits on is random, so the data set is left-right symmetric in distribution
    # and a left-right flip (the demo trainer's only augmentation and test-time mirroring) keeps labels valid.
    side = 1.0 if rng.random() < 0.5 else -1.0
    fat = _blob(
        coords,
        rng,
        pos(-0.35, -0.40, -0.45 * side),
        _jitter(rng, np.array([0.36, 0.26, 0.28]) * half, 0.15),
        0.25,
    )
    labels[fat] = 5
    liver = _blob(
        coords,
        rng,
        pos(-0.35, -0.15, 0.35 * side),
        _jitter(rng, np.array([0.45, 0.38, 0.38]) * half, 0.1),
        0.3,
    )
    labels[liver] = 1
    for lr in (-1.0, 1.0):
        lung = _blob(
            coords,
            rng,
            pos(0.45, -0.05, 0.46 * lr),
            _jitter(rng, np.array([0.55, 0.42, 0.28]) * half, 0.1),
            0.15,
        )
        labels[lung] = 4
    for lr in (-1.0, 1.0):
        kidney = _blob(
            coords,
            rng,
            pos(-0.45, 0.38, 0.45 * lr, jit=0.04),
            _jitter(rng, np.array([0.40, 0.23, 0.22]) * half, 0.1),
            0.1,
        )
        labels[kidney] = 2

    # Spine: a tube along z whose centre line sways smoothly in y and x.
    radius = float(rng.uniform(0.22, 0.26) * half[2])
    zn = z / half[0]
    cy = (0.5 + 0.05 * np.sin(rng.uniform(1.0, 2.5) * zn + rng.uniform(0, 2 * math.pi))) * half[1]
    cx = (0.06 * np.sin(rng.uniform(1.0, 2.5) * zn + rng.uniform(0, 2 * math.pi))) * half[2]
    spine = (y - cy) ** 2 + (x - cx) ** 2 < radius**2
    labels[spine] = 3

    # Organs never stick out of the body.
    labels[~body] = 0
    return body, labels


def generate_phantom(seed: int, *, anisotropic: bool | None = None) -> PhantomCase:
    """Generate one CT-like phantom; the same ``seed`` (and ``anisotropic``) always gives the same case.

    ``anisotropic=None`` lets the seed decide (probability 0.25); True/False force thick-slice
    (3.0 x 1.5 x 1.5 mm) or near-isotropic (~1.5 mm, jittered by a few percent per axis) sampling.
    """
    from scipy.ndimage import (
        gaussian_filter,  # scipy is an nnU-Net dependency; imported late to keep import cheap
    )

    rng = np.random.default_rng(np.random.SeedSequence([0x7C4E, int(seed)]))
    if anisotropic is None:
        anisotropic = bool(rng.random() < ANISOTROPIC_PROBABILITY)
    if anisotropic:
        spacing = ANISOTROPIC_SPACING
    else:
        jitter = rng.uniform(0.95, 1.05)
        spacing = tuple(float(round(s * jitter * rng.uniform(0.98, 1.02), 3)) for s in NOMINAL_SPACING)
    fov = np.array(FIELD_OF_VIEW_MM)
    shape = tuple(int(round(f / s)) for f, s in zip(fov, spacing))
    coords = _grid(shape, spacing)

    body, labels = _structures(coords, rng, fov / 2.0)

    image = np.full(shape, AIR_HU, dtype=np.float32)
    image[body] = TISSUE_HU + rng.uniform(-10, 10)
    for value, name in LABEL_NAMES.items():
        if value:
            image[labels == value] = STRUCTURE_HU[name] + rng.uniform(-10, 10)
    # Mild low-frequency inhomogeneity inside the body (beam hardening / contrast timing stand-in).
    z, y, x = coords
    half = fov / 2.0
    image += np.where(
        body, 10.0 * _SmoothField(rng, max_freq=2.0)(z / half[0], y / half[1], x / half[2]), 0.0
    ).astype(np.float32)
    # Partial-volume blur of ~0.8 mm, then scanner noise of 20-30 HU.
    image = gaussian_filter(image, sigma=[0.8 / s for s in spacing], mode="nearest")
    image += rng.normal(0.0, rng.uniform(20.0, 30.0), size=shape).astype(np.float32)
    return PhantomCase(
        image=image.astype(np.float32), labels=labels, spacing=spacing, anisotropic=anisotropic
    )


def write_case(case: PhantomCase, image_path: Path, label_path: Path | None = None) -> None:
    """Write the image (and optionally the label map) as NIfTI files with the case's spacing.

    nnU-Net's SimpleITKIO reads them back with the same (z, y, x) array order and spacing.
    """
    import SimpleITK as sitk

    from tucker_export._io import atomic_path

    def _write(array: np.ndarray, path: Path) -> None:
        img = sitk.GetImageFromArray(array)
        img.SetSpacing(tuple(float(s) for s in reversed(case.spacing)))  # SimpleITK wants (x, y, z)
        with atomic_path(path) as tmp:
            sitk.WriteImage(img, str(tmp), useCompression=True)

    _write(case.image, Path(image_path))
    if label_path is not None:
        _write(case.labels, Path(label_path))
