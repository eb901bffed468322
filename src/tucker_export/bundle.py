"""The deployment bundle: one folder that carries a model from ``decompose`` to ``infer``.

Layout::

    BUNDLE/
      bundle.json              the manifest (this module owns its schema)
      plans.json, dataset.json copied unchanged from the source model folder
      weights/fold_<f>.safetensors
      onnx/fold_<f>.<precision>.onnx
      engines/<gpu-kind>/...   TensorRT engines, keyed in the manifest
      timing_caches/<gpu-kind>.trt<version>.cache   (see tucker_export.engines.keys)

``decompose`` creates it, ``export`` and ``build`` add entries, ``infer``/``validate``/``bench``
read it. Every manifest update is an atomic rewrite of ``bundle.json``.

Manifest schema (``format_version`` 1), top level keys:

- ``format``, ``format_version``, ``created``, ``versions`` (tucker_export, nnunetv2, torch)
- ``source``: ``model_dir``, ``checksum`` (sha256 over plans, dataset.json and the checkpoints
  used), ``trainer_name``, ``plans_name``, ``configuration``, ``checkpoint_name``
- ``model``: ``num_input_channels``, ``num_segmentation_heads``, ``patch_size``,
  ``allowed_mirroring_axes``, ``label_names``
- ``rank_policy``: the policy and its parameters, as given
- ``folds``: ``{"<fold>": {"weights": {"file", "sha256"}, "layers": [...], "totals": {...}}}``;
  each layer entry: ``name``, ``op``, ``action`` ("factorized" or "kept"), ``reason``, ``ranks``
  (``[out_rank, in_rank]`` when factorized), ``params_before/after``, ``macs_before/after``,
  ``relative_error``
- ``onnx``: ``{"fold_<f>.<precision>": {"file", "sha256", "fold", "precision", "opset", "parity"}}``
- ``engines``: ``{"<engine key>": {...}}`` (see ``tucker_export.engines``)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tucker_export._io import sha256_file, staged_folder, write_json_atomic
from tucker_export.errors import BundleError

if TYPE_CHECKING:
    from tucker_export.nnunet.loading import Fold, ModelSpec

logger = logging.getLogger(__name__)

MANIFEST_NAME = "bundle.json"
FORMAT_NAME = "tucker-export-bundle"
FORMAT_VERSION = 1
# Manifest sections of the exports and of the engines, by runtime (records: tucker_export.engines).
ONNX_SECTION = "onnx"
ENGINES_SECTION = "engines"
CPU_ENGINES_SECTION = "cpu_engines"


def fold_key(fold: Fold) -> str:
    return str(fold)


def versions() -> dict[str, str]:
    """Versions that matter for reproducing a bundle."""
    import tucker_export
    from tucker_export._env import package_versions

    return {"tucker_export": tucker_export.__version__, **package_versions(("nnunetv2", "torch"))}


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def onnx_key(fold: Fold, precision: str) -> str:
    """The manifest key of fold ``fold``'s ``precision`` ONNX export."""
    return f"fold_{fold}.{precision}"


def export_command(bundle_path: Any, precision: str) -> str:
    return f"tucker-export export {bundle_path} --precision {precision}"


class Bundle:
    """A deployment bundle on disk: the manifest plus paths to everything it names."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self._spec: ModelSpec | None = None

    # ---- opening -------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> Bundle:
        path = Path(path)
        manifest_path = path / MANIFEST_NAME
        if not path.is_dir():
            raise BundleError(f"Bundle {path} does not exist; create one with `tucker-export decompose`.")
        if not manifest_path.is_file():
            raise BundleError(
                f"{path} is not a tucker-export bundle (no {MANIFEST_NAME}); create one with `tucker-export decompose`."
            )
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as error:
            raise BundleError(f"{manifest_path} is corrupt ({error.msg} at line {error.lineno}).") from None
        if manifest.get("format") != FORMAT_NAME:
            raise BundleError(f"{manifest_path} is not a tucker-export manifest (format {manifest.get('format')!r}).")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise BundleError(
                f"{manifest_path} has format version {manifest.get('format_version')}, this tucker-export "
                f"reads version {FORMAT_VERSION}; re-create the bundle with `tucker-export decompose`."
            )
        return cls(path, manifest)

    # ---- model description ----------------------------------------------------------------
    @property
    def spec(self) -> ModelSpec:
        """The nnU-Net model description (plans, dataset.json, configuration) the bundle was made from."""
        if self._spec is None:
            from tucker_export.nnunet.loading import load_model_spec

            source = self.manifest["source"]
            mirroring = self.manifest["model"].get("allowed_mirroring_axes")
            self._spec = load_model_spec(
                self.path,
                configuration=source["configuration"],
                trainer_name=source["trainer_name"],
                allowed_mirroring_axes=tuple(mirroring) if mirroring is not None else None,
            )
        return self._spec

    @property
    def folds(self) -> tuple[Fold, ...]:
        from tucker_export.nnunet.loading import parse_fold

        return tuple(parse_fold(f) for f in self.manifest["folds"])

    @property
    def patch_size(self) -> tuple[int, ...]:
        return tuple(self.manifest["model"]["patch_size"])

    @property
    def num_input_channels(self) -> int:
        return int(self.manifest["model"]["num_input_channels"])

    @property
    def num_segmentation_heads(self) -> int:
        return int(self.manifest["model"]["num_segmentation_heads"])

    @property
    def source(self) -> dict[str, Any]:
        """Where the bundle came from: ``model_dir``, ``checksum``, trainer, plans, configuration, checkpoint."""
        return self.manifest.get("source", {})

    @property
    def rank_policy(self) -> dict[str, Any]:
        return self.manifest.get("rank_policy", {})

    @property
    def label_names(self) -> dict[str, str] | None:
        return self.manifest.get("model", {}).get("label_names")

    def fold_entry(self, fold: Fold) -> dict[str, Any]:
        try:
            return self.manifest["folds"][fold_key(fold)]
        except KeyError:
            have = ", ".join(self.manifest["folds"]) or "none"
            raise BundleError(f"Bundle {self.path} has no fold {fold} (folds: {have}).") from None

    def fold_entries(self) -> dict[str, dict[str, Any]]:
        """Every fold's entry (weights, layers, totals) by fold key, in manifest order."""
        return self.manifest.get("folds", {})

    def fold_layers(self, fold: Fold) -> list[dict[str, Any]]:
        """The per-convolution records of ``fold`` (see ``tucker_export.exporter.decompose``)."""
        return self.fold_entry(fold)["layers"]

    def fold_totals(self, fold: Fold) -> dict[str, Any]:
        return self.fold_entry(fold).get("totals", {})

    def resolve_folds(self, folds: tuple[Fold, ...] | list[Fold] | None) -> tuple[Fold, ...]:
        """The requested folds, checked against the bundle; ``None`` means all of them."""
        if not folds:
            return self.folds
        for fold in folds:
            self.fold_entry(fold)
        from tucker_export.nnunet.loading import parse_fold

        return tuple(parse_fold(f) for f in folds)

    # ---- weights and networks -------------------------------------------------------------
    def weights_path(self, fold: Fold) -> Path:
        return self.path / self.fold_entry(fold)["weights"]["file"]

    def verify_weights(self, fold: Fold) -> Path:
        """The path of ``fold``'s weights file, refused when missing or changed behind the manifest."""
        entry = self.fold_entry(fold)
        weights = self.weights_path(fold)
        if not weights.is_file():
            raise BundleError(f"Bundle {self.path} lacks the weights of fold {fold} ({weights}).")
        if entry["weights"].get("sha256"):
            # A weights file changed behind the manifest would silently disagree with its exports and gates.
            self.verify_file(entry["weights"]["file"], entry["weights"]["sha256"])
        return weights

    # ---- ONNX exports ---------------------------------------------------------------------
    def onnx_entry(self, fold: Fold, precision: str) -> dict[str, Any]:
        """The manifest entry of fold ``fold``'s ``precision`` ONNX export, refused when missing or stale."""
        command = export_command(self.path, precision)
        entry = self.onnx_entries().get(onnx_key(fold, precision))
        if entry is None:
            raise BundleError(f"Bundle {self.path} has no {precision} ONNX export of fold {fold}; run `{command}`.")
        reason = self.stale_onnx_reason(fold, entry)
        if reason is not None:
            raise BundleError(f"The {precision} ONNX export of fold {fold} {reason}; re-export it with `{command}`.")
        return entry

    def onnx_entries(self) -> dict[str, dict[str, Any]]:
        """Every ONNX export's entry by key (``fold_<f>.<precision>``), stale or not."""
        return self.manifest.get(ONNX_SECTION, {})

    def onnx_sha256(self, fold: Fold, precision: str) -> str | None:
        """The recorded checksum of an ONNX export, None when the bundle has none."""
        entry = self.onnx_entries().get(onnx_key(fold, precision))
        return entry.get("sha256") if entry else None

    def stale_onnx_reason(self, fold: Fold, entry: dict[str, Any]) -> str | None:
        """Why an ONNX entry no longer fits its fold's weights (``finetune`` wrote new ones), else None.

        An export records the sha256 of the weights it was made from; entries written before that
        field existed carry none and are taken as they are.
        """
        exported_from = entry.get("weights_sha256")
        current = self.fold_entries().get(fold_key(fold), {}).get("weights", {}).get("sha256")
        if exported_from is None or current is None or exported_from == current:
            return None
        return (
            f"was exported from other weights of fold {fold} (sha256 {exported_from[:12]}..., the weights are now "
            f"{current[:12]}..., e.g. after `tucker-export finetune`)"
        )

    def has_onnx(self, fold: Fold, precision: str) -> bool:
        return onnx_key(fold, precision) in self.onnx_entries()

    def engine_records(self, section: str = ENGINES_SECTION) -> dict[str, dict[str, Any]]:
        """TensorRT engine records (``engines``) or OpenVINO ones (``cpu_engines``) by key."""
        return self.manifest.get(section, {})

    def finetuning_records(self) -> list[dict[str, Any]]:
        return self.manifest.get("finetuning", [])

    # ---- writing --------------------------------------------------------------------------
    def set_fold(self, fold: Fold, *, weights_file: str, layers: list[dict[str, Any]], totals: dict[str, Any]) -> None:
        """Record ``fold``'s weights file (already written under the bundle) with its layers and totals."""
        self.manifest.setdefault("folds", {})[fold_key(fold)] = {
            "weights": {"file": weights_file, "sha256": sha256_file(self.path / weights_file)},
            "layers": layers,
            "totals": totals,
        }

    def refresh_weights(self, fold: Fold) -> None:
        """Record the checksum of ``fold``'s weights file after it was rewritten in place (fine-tuning)."""
        entry = self.fold_entry(fold)
        entry["weights"] = {"file": entry["weights"]["file"], "sha256": sha256_file(self.weights_path(fold))}

    def add_finetuning(self, record: dict[str, Any]) -> None:
        self.manifest.setdefault("finetuning", []).append(record)

    def copy_to(self, path: Path) -> Bundle:
        """This manifest (a deep copy) bound to another folder, to write a changed bundle beside the original."""
        import copy

        return Bundle(path, copy.deepcopy(self.manifest))

    # ---- artifacts ------------------------------------------------------------------------
    def artifact_path(self, relative: str | Path) -> Path:
        return self.path / relative

    def record(self, section: str, key: str, entry: dict[str, Any]) -> None:
        """Add or replace ``manifest[section][key]`` and save the manifest atomically."""
        self.manifest.setdefault(section, {})[key] = entry
        self.save()

    def remove_record(self, section: str, key: str) -> None:
        if self.manifest.get(section, {}).pop(key, None) is not None:
            self.save()

    def save(self) -> None:
        self.manifest["updated"] = utc_now()
        write_json_atomic(self.path / MANIFEST_NAME, self.manifest)

    def verify_file(self, relative: str, expected_sha256: str) -> Path:
        """The path of a bundle file whose checksum must match the manifest's record."""
        path = self.path / relative
        if not path.is_file():
            raise BundleError(f"Bundle {self.path} lacks {relative}; re-run the step that makes it.")
        actual = sha256_file(path)
        if actual != expected_sha256:
            raise BundleError(
                f"{path} does not match the bundle manifest (sha256 {actual[:12]}..., recorded "
                f"{expected_sha256[:12]}...); re-run the step that makes it."
            )
        return path


def new_bundle(
    path: Path, spec: ModelSpec, *, source_checksum: str, checkpoint_name: str, source_folds: list[str],
    rank_policy: dict[str, Any], decomposition: dict[str, Any],
) -> Bundle:
    """A new, not yet saved bundle in ``path`` made from ``spec``'s model folder (folds are added with ``set_fold``)."""
    manifest = _manifest_skeleton(spec, source_checksum=source_checksum, checkpoint_name=checkpoint_name)
    manifest["source"]["folds"] = source_folds
    manifest["rank_policy"] = rank_policy
    manifest["decomposition"] = decomposition
    return Bundle(path, manifest)


def _manifest_skeleton(spec: ModelSpec, *, source_checksum: str, checkpoint_name: str) -> dict[str, Any]:
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "created": utc_now(),
        "versions": versions(),
        "source": {
            "model_dir": str(spec.model_dir.resolve()),
            "checksum": source_checksum,
            "trainer_name": spec.trainer_name,
            "plans_name": spec.plans.get("plans_name"),
            "configuration": spec.configuration_name,
            "checkpoint_name": checkpoint_name,
        },
        "model": {
            "num_input_channels": spec.num_input_channels,
            "num_segmentation_heads": spec.num_segmentation_heads,
            "patch_size": list(spec.patch_size),
            "allowed_mirroring_axes": list(spec.allowed_mirroring_axes) if spec.allowed_mirroring_axes is not None else None,
            "label_names": {str(k): v for k, v in spec.label_names.items()},
        },
        "rank_policy": {},
        "folds": {},
        "onnx": {},
        "engines": {},
    }


def model_checksum(model_dir: Path, checkpoint_paths: list[Path]) -> str:
    """One sha256 over plans.json, dataset.json and the checkpoints, so a bundle names its exact source."""
    import hashlib

    digest = hashlib.sha256()
    for path in [model_dir / "plans.json", model_dir / "dataset.json", *sorted(checkpoint_paths)]:
        digest.update(path.name.encode())
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def check_bundle_target(target: Path, *, overwrite: bool) -> None:
    """Refuse a path that is a file, or a non-empty folder without ``overwrite`` (checked before any slow work)."""
    if target.exists() and not target.is_dir():
        raise BundleError(f"Bundle path {target} exists and is not a folder; choose another output path.")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise BundleError(
            f"Bundle path {target} exists and is not empty; replace it on purpose", option="overwrite", use=True
        )


@contextmanager
def staged_bundle_dir(target: str | Path, *, overwrite: bool) -> Iterator[Path]:
    """A fresh folder to build a bundle in; it replaces ``target`` only when the block succeeds.

    An existing non-empty ``target`` is refused without ``overwrite`` and left untouched on failure.
    """
    target = Path(target)
    check_bundle_target(target, overwrite=overwrite)
    with staged_folder(target) as staging:
        yield staging
