"""The one path from a trained nnU-Net model folder to a bundle ready to run: decompose, export, build.

``prepare_bundle`` is what the demo, ``infer -m`` (through ``undecomposed_bundle``), the rank sweep
and the benchmarks call, so each of them makes its bundles the way ``decompose`` + ``export`` +
``build`` would on the command line, and a change to that order is made here once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tucker_export.bundle import Bundle, model_checksum, onnx_key
from tucker_export.errors import ConfigurationError, ModelFolderError

if TYPE_CHECKING:
    from tucker_export.exporter.onnx_export import ExportRecord
    from tucker_export.exporter.ranks import RankPolicy
    from tucker_export.nnunet.loading import Fold

logger = logging.getLogger(__name__)

ENGINE_KINDS = ("trt", "openvino")


@dataclass
class PreparedBundle:
    """A bundle and what this preparation made in it (nothing of a step that was already done)."""

    bundle: Bundle
    decomposed: bool
    exports: list[ExportRecord] = field(default_factory=list)
    engines: list[dict[str, Any]] = field(default_factory=list)


def prepare_bundle(
    model_dir: str | Path,
    target: str | Path,
    *,
    policy: RankPolicy,
    precisions: Sequence[str] = (),
    engines: Sequence[str] = (),
    folds: Sequence[Fold] | None = None,
    reuse: bool = False,
    trust_checkpoint: bool = False,
    gate_scans: str | Path | None = None,
    progress: bool = False,
    source_checksum: str | None = None,
) -> PreparedBundle:
    """Decompose ``model_dir`` into ``target`` with ``policy``, export ``precisions`` to ONNX and build ``engines``.

    ``engines`` holds ``"trt"`` (TensorRT engines of every exported precision, for the GPUs here)
    and/or ``"openvino"`` (compiled CPU models of ``precisions``, gated on tiles of ``gate_scans``).
    With ``reuse`` an existing bundle at ``target`` made from the same model files and policy is
    kept and only its missing exports are made; otherwise ``target`` is replaced. ``source_checksum``
    is the model's ``model_checksum`` when the caller already has it (hashing checkpoints is slow).
    """
    from tucker_export.exporter.decompose import decompose_model
    from tucker_export.exporter.onnx_export import export_bundle

    unknown = [kind for kind in engines if kind not in ENGINE_KINDS]
    if unknown:
        raise ConfigurationError(f"Engine kinds must be among {', '.join(ENGINE_KINDS)}, got {', '.join(unknown)}.")
    model_dir, target = Path(model_dir), Path(target)
    bundle = _reusable_bundle(model_dir, target, policy, folds, source_checksum) if reuse else None
    decomposed = bundle is None
    if bundle is None:
        bundle = decompose_model(model_dir, target, folds=list(folds) if folds else None, policy=policy, overwrite=True,
                                 trust_checkpoint=trust_checkpoint, progress=progress)
    prepared = PreparedBundle(bundle, decomposed)
    selected = bundle.resolve_folds(list(folds) if folds else None)
    for precision in precisions:
        missing = [f for f in selected if not bundle.has_onnx(f, precision) or _stale(bundle, f, precision)]
        if missing:
            prepared.exports += export_bundle(bundle, precisions=(precision,), folds=missing, progress=progress)
    if "trt" in engines:
        from tucker_export.engines.build import build_engines

        prepared.engines += build_engines(bundle, precisions=tuple(precisions) or None, folds=list(selected),
                                          progress=progress)
    if "openvino" in engines:
        from tucker_export.engines.cpu_build import build_cpu_engines

        built = build_cpu_engines(bundle, list(precisions) or ["fp32"], folds=list(selected), gate_scans=gate_scans,
                                  progress=progress)
        prepared.engines += [result.record for result in built]
    prepared.bundle = Bundle.load(bundle.path)  # the manifest as the steps left it on disk
    return prepared


def _stale(bundle: Bundle, fold: Fold, precision: str) -> bool:
    entry = bundle.onnx_entries()[onnx_key(fold, precision)]
    return bundle.stale_onnx_reason(fold, entry) is not None


def _reusable_bundle(
    model_dir: Path, target: Path, policy: RankPolicy, folds: Sequence[Fold] | None, checksum: str | None
) -> Bundle | None:
    """The bundle at ``target`` when it was made from these model files with this policy, else None."""
    from tucker_export.errors import BundleError
    from tucker_export.nnunet.loading import DEFAULT_CHECKPOINT

    if not (target / "bundle.json").is_file():
        return None
    try:
        bundle = Bundle.load(target)
    except BundleError as error:
        logger.info("Re-making %s: %s", target, error)
        return None
    source = bundle.source
    checkpoint = source.get("checkpoint_name") or DEFAULT_CHECKPOINT
    checkpoints = [model_dir / f"fold_{f}" / checkpoint for f in bundle.folds]
    same_source = all(p.is_file() for p in checkpoints) and source.get("checksum") == (
        checksum or model_checksum(model_dir, checkpoints)
    )
    same_folds = not folds or {str(f) for f in folds} <= {str(f) for f in bundle.folds}
    if same_source and same_folds and bundle.rank_policy == policy.to_manifest():
        return bundle
    logger.info("Re-making %s: it was made from other model files, folds or rank policy.", target)
    return None


def undecomposed_bundle(model_dir: str | Path, *, precision: str | None = None, trust_checkpoint: bool = False) -> Bundle:
    """A cached bundle of the undecomposed model (rank mode ``none``), so -m runs through the same engines.

    It lives in the user cache folder (``$TUCKER_EXPORT_CACHE`` or ``~/.cache/tucker-export``) under
    the model's checksum and is made once; with ``precision`` its ONNX export for that precision is
    made once too. A lock beside it makes concurrent runs wait for one preparation.
    """
    from tucker_export._io import exclusive_lock, user_cache_dir
    from tucker_export.exporter.ranks import RankPolicy
    from tucker_export.nnunet.loading import DEFAULT_CHECKPOINT, available_folds

    model_dir = Path(model_dir)
    folds = available_folds(model_dir)
    if not folds:
        raise ModelFolderError(f"{model_dir} has no fold_N/{DEFAULT_CHECKPOINT}; is it an nnU-Net trained model folder?")
    checksum = model_checksum(model_dir, [model_dir / f"fold_{f}" / DEFAULT_CHECKPOINT for f in folds])
    target = user_cache_dir() / "bundles" / f"original-{checksum[:16]}"
    with exclusive_lock(target.parent / f".{target.name}.lock",
                        "Another process is preparing the undecomposed bundle (lock %s); waiting for it"):
        if not (target / "bundle.json").is_file():
            logger.info("Preparing an undecomposed bundle of %s in %s (once per model).", model_dir, target)
        prepared = prepare_bundle(model_dir, target, policy=RankPolicy(mode="none"),
                                  precisions=(precision,) if precision else (), reuse=True,
                                  trust_checkpoint=trust_checkpoint, source_checksum=checksum)
    return prepared.bundle
