"""Checks on the voxels once read, and on the memory a case will need before any work starts."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tucker_export.integrity.nifti import nonfinite_sentence

GIB = 1024**3


def nonfinite_problems(data: np.ndarray, files: Sequence[Path]) -> list[str]:
    """NaN/Inf voxels per channel of ``data`` (channels first, one per file)."""
    if not np.issubdtype(data.dtype, np.floating):
        return []
    problems = []
    for channel, path in zip(data, files):
        finite = np.isfinite(channel)
        if finite.all():
            continue
        nan = int(np.isnan(channel).sum())
        inf = int(channel.size - finite.sum()) - nan
        problems.append(f"{path.name}: {nonfinite_sentence(nan, inf, channel.size)}")
    return problems


def estimate_peak_bytes(
    shape: Sequence[int],
    spacing: Sequence[float],
    target_spacing: Sequence[float],
    *,
    channels: int,
    classes: int,
    stock_export: bool = False,
) -> int:
    """Peak bytes of the arrays of one case: read, preprocess, sliding window, export.

    ``shape``/``spacing`` are the scan's, ``target_spacing`` the model's (any axis order: only the
    voxel-count ratio is used). The sliding window holds an fp16 accumulator per class at the
    model's spacing. Stock's export (``stock_export``) then converts those logits to float64 and
    resamples every class map to the scan's geometry at once, which is the largest stage by far on
    fine scans with many classes; the chunked export (``nnunet.fast_export``) keeps one chunk of
    maps (``CHUNK_BYTES``) and two volumes. The engine and the process's own memory are not
    included: they are already in use when the available memory is read.
    """
    from tucker_export.nnunet.fast_export import CHUNK_BYTES

    scan_voxels = float(np.prod([int(s) for s in shape]))
    ratio = float(np.prod([float(s) for s in spacing]) / np.prod([float(t) for t in target_spacing]))
    model_voxels = scan_voxels * ratio
    accumulators = (classes + 1) * model_voxels * 2
    if stock_export:
        export = accumulators + classes * model_voxels * 8 + classes * scan_voxels * 2 + scan_voxels
    else:
        chunk = min(CHUNK_BYTES, classes * 4 * (scan_voxels + max(scan_voxels, model_voxels)))
        export = accumulators + chunk + scan_voxels * (4 + 2 + 1)
    stages = (
        channels * scan_voxels * 8,  # the reader's image and nnU-Net's float32 copy
        channels * (scan_voxels + model_voxels) * 4,  # resampling to the model's spacing
        channels * model_voxels * 4 + accumulators,  # sliding window
        export,
    )
    return int(max(stages))


def available_memory_bytes() -> int | None:
    """Memory this process may still take: MemAvailable, capped by a cgroup limit; None if unknown."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
                break
    except OSError:
        pass
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    limit = _cgroup_headroom()
    return min(available, limit) if limit is not None else available


def _cgroup_headroom() -> int | None:
    """Room under a cgroup v2 memory limit (containers, Slurm jobs), or None when unlimited."""
    root = Path("/sys/fs/cgroup")
    try:
        limit_text = (root / "memory.max").read_text().strip()
        if limit_text == "max":
            return None
        return max(0, int(limit_text) - int((root / "memory.current").read_text().strip()))
    except (OSError, ValueError):
        return None


def memory_problem(
    shape: Sequence[int],
    spacing: Sequence[float],
    target_spacing: Sequence[float],
    *,
    channels: int,
    classes: int,
    available: int | None,
    stock_export: bool = False,
) -> str | None:
    """Why this case would run out of memory, before any work; None when it fits or is unknown."""
    if available is None:
        return None
    need = estimate_peak_bytes(shape, spacing, target_spacing, channels=channels, classes=classes,
                               stock_export=stock_export)
    if need <= available:
        return None
    size = "x".join(str(int(s)) for s in shape)
    target = "x".join(f"{float(t):g}" for t in target_spacing)
    return (
        f"segmenting it needs about {need / GIB:.1f} GiB at its peak ({size} voxels, resampled to {target} mm, "
        f"{classes} classes) and this machine has {available / GIB:.1f} GiB available; free memory, use a machine "
        f"with at least {np.ceil(need / GIB):.0f} GiB free, or crop the scan to the region to segment"
    )
