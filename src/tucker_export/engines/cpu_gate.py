"""Tiles and the accuracy gate of OpenVINO CPU builds (``engines.cpu_build``).

Tiles are nnU-Net's: the bundle's own preprocessing of the scans, patch-sized crops at seeded
positions, or seeded standard-normal tiles without scans. The gate compares a compiled model's
logits on held-out tiles against the bundle's PyTorch network and says, per precision, whether it
meets its bar. Everything here is plain NumPy over arrays, so it is tested without OpenVINO.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tucker_export.errors import ConfigurationError, InputImageError

if TYPE_CHECKING:
    from tucker_export.bundle import Bundle
    from tucker_export.nnunet.cases import Case

logger = logging.getLogger(__name__)

MAX_TILE_CASES = 20


# ---- tiles --------------------------------------------------------------------------------------


@dataclass
class Tiles:
    """Network inputs ``(N, C, *patch)`` and where they came from (recorded in ``bundle.json``)."""

    array: np.ndarray
    source: dict[str, Any]
    #: label maps cropped at the same corners ``(N, 1, *patch)``, when the scans came with labels
    labels: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.array.shape[0])


def tiles_digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array, dtype=np.float32).tobytes()).hexdigest()


def crop_positions(
    shape: Sequence[int], patch: Sequence[int], count: int, rng: np.random.Generator
) -> list[tuple[int, ...]]:
    """``count`` uniformly drawn corners of patch-sized crops inside ``shape`` (0 where the volume is smaller)."""
    highs = [max(0, int(s) - int(p)) for s, p in zip(shape, patch)]
    return [tuple(int(rng.integers(0, h + 1)) for h in highs) for _ in range(count)]


def crop_tile(data: np.ndarray, corner: Sequence[int], patch: Sequence[int]) -> np.ndarray:
    """``data[:, corner:corner+patch]`` zero-padded to ``patch`` at the far end (as nnU-Net pads small volumes)."""
    slices = tuple(slice(c, c + p) for c, p in zip(corner, patch))
    tile = data[(slice(None), *slices)]
    missing = [(0, int(p) - s) for p, s in zip(patch, tile.shape[1:])]
    if any(after for _, after in missing):
        tile = np.pad(tile, [(0, 0), *missing])
    return np.ascontiguousarray(tile, dtype=np.float32)


def split_counts(total: int, parts: int) -> list[int]:
    """``total`` tiles over ``parts`` cases as evenly as possible, earlier cases first."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def _usable_cases(
    scans: Path, *, num_channels: int, file_ending: str, rng: np.random.Generator, max_cases: int
) -> list[Case]:
    """The cases under ``scans`` this model can read, a seeded choice of ``max_cases`` when there are more."""
    from tucker_export.nnunet.cases import discover_cases

    found = discover_cases(scans, num_channels=num_channels, file_ending=file_ending)
    cases = [c for c in found if not c.problem]
    if not cases:
        # The first three reasons only, so the message stays one readable sentence.
        shown = "; ".join(f"{c.name}: {c.problem}" for c in found[:3]) + ("; ..." if len(found) > 3 else "")
        raise InputImageError(f"{scans} holds no usable scans for this model ({shown}).")
    if len(cases) > max_cases:
        chosen = sorted(rng.choice(len(cases), size=max_cases, replace=False).tolist())
        cases = [cases[i] for i in chosen]
    return cases


def _require_label_maps(labels_dir: str | Path, cases: Sequence[Case], file_ending: str) -> Path:
    """``labels_dir`` as a Path, once every chosen case has its label map there (all missing ones named at once)."""
    labels_dir = Path(labels_dir)
    missing = [c.name for c in cases if not (labels_dir / f"{c.name}{file_ending}").is_file()]
    if not labels_dir.is_dir() or missing:
        raise InputImageError(
            f"Labels folder {labels_dir} lacks the label maps of {', '.join(missing[:3]) or 'every case'}"
            f"{' ...' if len(missing) > 3 else ''} (named <case>{file_ending})."
        )
    return labels_dir


def tiles_from_scans(
    bundle: Bundle, scans: str | Path, count: int, *, seed: int = 0, progress: bool = False,
    max_cases: int = MAX_TILE_CASES, labels_dir: str | Path | None = None,
) -> Tiles:
    """``count`` seeded crops of the scans under ``scans``, after the bundle's own nnU-Net preprocessing.

    At most ``max_cases`` cases are read (a seeded choice when there are more). A case that
    cannot be read is skipped with a warning; none readable is an error. With ``labels_dir``
    every case needs its label map ``<case><file ending>`` there, cropped with the image.
    """
    from tqdm.auto import tqdm

    from tucker_export.errors import BrokenScanError
    from tucker_export.nnunet.reading import preprocess_case

    if count < 1:
        raise ConfigurationError(f"The number of tiles must be at least 1, got {count}.")
    scans = Path(scans)
    if not scans.exists():
        raise InputImageError(f"Calibration scans {scans} do not exist; give a folder of CT scans.", option="calibration_dir")
    spec = bundle.spec
    file_ending = spec.dataset_json["file_ending"]
    # One generator for the case choice and every crop, so a seed fixes the whole draw.
    rng = np.random.default_rng(seed)
    cases = _usable_cases(scans, num_channels=spec.num_input_channels, file_ending=file_ending, rng=rng,
                          max_cases=max_cases)
    patch = bundle.patch_size
    if labels_dir is not None:
        labels_dir = _require_label_maps(labels_dir, cases, file_ending)
    tiles: list[np.ndarray] = []
    label_tiles: list[np.ndarray] = []
    used: list[str] = []
    for case, n in tqdm(list(zip(cases, split_counts(count, len(cases)))), desc="tiles", unit="case",
                        disable=not progress, leave=False):
        if n == 0:
            continue
        label_file = labels_dir / f"{case.name}{file_ending}" if labels_dir is not None else None
        try:
            prepared = preprocess_case(case, spec, label_file=label_file)
        except BrokenScanError as error:
            logger.warning("Case %s skipped: %s.", case.name, error)
            continue
        corners = crop_positions(prepared.data.shape[1:], patch, n, rng)
        tiles.extend(crop_tile(prepared.data, corner, patch) for corner in corners)
        if prepared.seg is not None:
            # nnU-Net marks voxels outside the cropped body with -1; they are background here.
            seg = np.maximum(prepared.seg, 0)
            label_tiles.extend(crop_tile(seg, corner, patch) for corner in corners)
        used.append(case.name)
    if not tiles:
        raise InputImageError(f"No scan under {scans} could be read for calibration.")
    array = np.stack(tiles)
    source = {"kind": "scans", "folder": str(scans), "cases": used, "count": len(tiles), "seed": seed,
              "sha256": tiles_digest(array)}
    if labels_dir is not None:
        source["labels"] = str(labels_dir)
    return Tiles(array, source, np.stack(label_tiles) if label_tiles else None)


def seeded_tiles(bundle: Bundle, count: int, *, seed: int = 0) -> Tiles:
    from tucker_export.exporter.onnx_export import seeded_input

    array = seeded_input(count, bundle.num_input_channels, bundle.patch_size, seed)
    return Tiles(array, {"kind": "seeded_normal", "count": count, "seed": seed, "sha256": tiles_digest(array)})


def gate_and_calibration_tiles(
    bundle: Bundle,
    precisions: Sequence[str],
    *,
    calibration_dir: str | Path | None,
    calibration_tiles: int,
    gate_tiles: int,
    gate_scans: str | Path | None,
    max_gate_cases: int,
    seed: int,
    progress: bool,
) -> tuple[Tiles, Tiles | None]:
    """The gate tiles and, when int8 is among ``precisions``, the calibration tiles (else None).

    With ``calibration_dir`` both come from one draw of those scans; otherwise the gate runs on
    tiles of ``gate_scans``, or on seeded standard-normal tiles without either.
    """
    calibration: Tiles | None = None
    if calibration_dir is not None:
        n_calibration = calibration_tiles if "int8" in precisions else 0
        if "int8" in precisions and calibration_tiles < 1:
            raise ConfigurationError(
                f"The number of calibration tiles must be at least 1, got {calibration_tiles}.", option="calibration_tiles"
            )
        both = tiles_from_scans(bundle, calibration_dir, n_calibration + gate_tiles, seed=seed, progress=progress)
        # Held-out gate tiles: the last ones drawn, never seen by the quantizer.
        n_gate = min(gate_tiles, len(both)) if not n_calibration else min(gate_tiles, max(1, len(both) // 5))
        gate = Tiles(both.array[-n_gate:], {**both.source, "count": n_gate, "sha256": tiles_digest(both.array[-n_gate:]),
                                            "role": "held out from calibration" if n_calibration else "gate"})
        if n_calibration:
            calibration = Tiles(both.array[:-n_gate], {**both.source, "count": len(both) - n_gate,
                                                       "sha256": tiles_digest(both.array[:-n_gate])})
    elif gate_scans is not None:
        gate = tiles_from_scans(bundle, gate_scans, gate_tiles, seed=seed, progress=progress, max_cases=max_gate_cases)
    else:
        gate = seeded_tiles(bundle, gate_tiles, seed=seed)
    return gate, calibration


# ---- the accuracy gate --------------------------------------------------------------------------


@dataclass(frozen=True)
class GateBar:
    """What a compiled model must reach against PyTorch fp32 on the gate tiles.

    ``max_abs_diff`` is relative to the logit scale (``max(1, max |reference logit|)``): real CT
    gives logits in the tens, where float32 summation order alone moves the fourth digit.
    ``min_class_dice`` counts classes with at least ``min_class_voxels`` reference voxels in the
    tiles; a few voxels' Dice says nothing. Tile Dice is stricter than case Dice (no Gaussian
    weighting or mirror averaging), hence 0.98 here; per-class Dice >= 0.99 of whole segmentations
    is what the end-to-end benchmark and the demo test check.
    """

    max_abs_diff: float | None = None
    min_argmax_agreement: float | None = None
    min_class_dice: float | None = None
    min_class_voxels: int = 1000


GATE_BARS: dict[str, GateBar] = {
    "fp32": GateBar(max_abs_diff=1e-3),
    "bf16": GateBar(min_argmax_agreement=0.995, min_class_dice=0.98),
    "int8": GateBar(min_argmax_agreement=0.995, min_class_dice=0.98),
}


def class_dice_of_argmax(reference: np.ndarray, candidate: np.ndarray, min_voxels: int = 1) -> dict[int, float]:
    """Dice of each foreground class with ``min_voxels`` or more in the reference's argmax, candidate vs reference."""
    from tucker_export.validation.metrics import label_dice

    ref = reference.argmax(axis=1)
    cand = candidate.argmax(axis=1)
    labels, counts = np.unique(ref, return_counts=True)
    kept = [int(label) for label, count in zip(labels.tolist(), counts.tolist(), strict=True) if label and count >= min_voxels]
    return label_dice(cand, ref, kept)


def judge_gate(reference: np.ndarray, candidate: np.ndarray, precision: str, *, label: str) -> dict[str, Any]:
    """The gate's figures, its bar, ``passed`` and one failure clause per missed bar."""
    from tucker_export.exporter.onnx_export import compare_logits

    bar = GATE_BARS[precision]
    figures = compare_logits(reference, candidate)
    scale = max(1.0, float(np.abs(reference).max()))
    dice = class_dice_of_argmax(reference, candidate, bar.min_class_voxels)
    failures = []
    if bar.max_abs_diff is not None and not figures["max_abs_diff"] <= bar.max_abs_diff * scale:
        failures.append(
            f"{label}: max abs logit diff {figures['max_abs_diff']:.3g} > {bar.max_abs_diff:g} x logit scale {scale:.3g}"
        )
    if bar.min_argmax_agreement is not None and not figures["argmax_agreement"] >= bar.min_argmax_agreement:
        failures.append(
            f"{label}: argmax agreement {100 * figures['argmax_agreement']:.2f}% < {100 * bar.min_argmax_agreement:.1f}%"
        )
    if bar.min_class_dice is not None:
        low = {k: v for k, v in dice.items() if not v >= bar.min_class_dice}
        if low:
            worst = ", ".join(f"class {k} {v:.3f}" for k, v in sorted(low.items()))
            failures.append(f"{label}: tile Dice vs PyTorch below {bar.min_class_dice:g} ({worst})")
    return {
        **{k: float(v) for k, v in figures.items()},
        "logit_scale": scale,
        "class_dice": {str(k): round(v, 5) for k, v in dice.items()},
        "bar": asdict(bar),
        "passed": not failures,
        "failures": failures,
    }


def run_in_batches(infer: Callable[[np.ndarray], np.ndarray], array: np.ndarray, batch: int = 2) -> np.ndarray:
    return np.concatenate([infer(array[i:i + batch]) for i in range(0, len(array), batch)])


def median_latency_ms(infer: Callable[[np.ndarray], Any], sample: np.ndarray, repeats: int = 3) -> float:
    """Median wall time of ``repeats`` calls after one untimed call (so first-call set-up is not counted)."""
    infer(sample)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        infer(sample)
        times.append(time.perf_counter() - started)
    return float(np.median(times) * 1000.0)
