"""`tucker-export infer`: a folder of scans in, nnU-Net-identical segmentations out, through an engine.

Each case is checked (``tucker_export.integrity``), then goes through nnU-Net's own
preprocessing, the engine-backed sliding window (``EnginePredictor``) and nnU-Net's export; a bad
case is reported and skipped while the others finish. ``case_pipeline`` runs the cases, the next
one prepared and the last one exported while the network runs, and writes outputs atomically.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tucker_export.case_pipeline import STAGES, CaseResult, run_cases
from tucker_export.errors import ConfigurationError
from tucker_export.nnunet.cases import discover_cases
from tucker_export.nnunet.loading import Fold, ModelSpec
from tucker_export.nnunet.predictor import EnginePredictor, FoldModel, mirror_axis_combinations
from tucker_export.runtimes import torch_callable

logger = logging.getLogger(__name__)

@dataclass
class InferenceReport:
    results: list[CaseResult]
    backend: str
    backend_reason: str
    precision: str
    folds: tuple[Fold, ...]
    batch_size: int
    overlap: bool = True
    cases_wall_s: float = 0.0  # from the first case's start to the last case's end
    workers: list[dict] = field(default_factory=list)  # scale-out runs: each worker's device, engine, start-up
    ray: dict = field(default_factory=dict)  # scale-out runs: the Ray cluster and its start-up seconds

    def to_dict(self) -> dict:
        return {
            "backend": self.backend, "backend_reason": self.backend_reason, "precision": self.precision,
            "folds": [str(f) for f in self.folds], "batch_size": self.batch_size, "overlap": self.overlap,
            "cases_wall_s": round(self.cases_wall_s, 3),
            "cases": [{"name": r.name, "status": r.status, "output": str(r.output) if r.output else None,
                       "error": r.error, "warnings": r.warnings, "seconds": r.seconds,
                       "peak_rss_mb": round(r.peak_rss_bytes / 1e6) if r.peak_rss_bytes else None,
                       **({"worker": r.worker, "device": r.device} if r.worker else {})}
                      for r in self.results],
            **({"workers": self.workers} if self.workers else {}),
            **({"ray": self.ray} if self.ray else {}),
        }

    @property
    def failed(self) -> list[CaseResult]:
        return [r for r in self.results if r.status == "failed"]

    def summary(self) -> str:
        counts = {s: sum(r.status == s for r in self.results) for s in ("done", "skipped", "failed")}
        lines = [
            f"{counts['done']} segmented, {counts['skipped']} skipped (already done), {counts['failed']} failed "
            f"[{self.backend}, {self.precision}, folds {', '.join(map(str, self.folds))}, batch {self.batch_size}]"
        ]
        done = [r for r in self.results if r.status == "done"]
        if done:
            totals = {k: sum(r.seconds.get(k, 0.0) for r in done) for k in STAGES}
            whole = sum(totals.values()) or 1.0
            lines.append(
                "time: " + ", ".join(f"{k} {v:.1f} s ({100 * v / whole:.0f}%)" for k, v in totals.items())
                + (" (summed per stage; the next case was prepared and the last one exported during the network)"
                   if self.overlap and len(done) > 1 else "")
            )
            peaks = [r.peak_rss_bytes for r in done if r.peak_rss_bytes]
            if peaks:
                lines.append(f"peak memory (RSS): {max(peaks) / 1e9:.2f} GB")
        if self.workers:
            per_worker = {w["worker"]: sum(r.worker == w["worker"] for r in done) for w in self.workers}
            lines.append(
                f"Ray ({self.ray.get('address')}): started in {self.ray.get('start_s', 0):.1f} s, workers ready in "
                f"{self.ray.get('workers_start_s', 0):.1f} s; cases in {self.cases_wall_s:.1f} s; "
                + ", ".join(f"{w['worker']} [{w['device']}, {w['backend']}] {per_worker[w['worker']]}"
                            for w in self.workers)
            )
        for result in self.failed:
            lines.append(f"FAILED {result.name}: {result.error}")
        return "\n".join(lines)


# ---- engines per fold ---------------------------------------------------------------------------


@dataclass
class FoldEngines:
    """What the predictor needs: the model description and one engine callable per fold."""

    spec: ModelSpec
    fold_models: dict[Fold, FoldModel]
    backend: str
    reason: str
    precision: str = "fp32"


def torch_fold_model(network: torch.nn.Module, device: torch.device) -> FoldModel:
    return torch_callable(network, device)


@contextlib.contextmanager
def open_fold_engines(
    *,
    bundle_path: str | Path | None,
    model_dir: str | Path | None,
    backend: str,
    precision: str,
    folds: list[Fold] | None,
    device: str,
    trust_checkpoint: bool = False,
    tile_source: str | Path | None = None,
    threads: int | None = None,
) -> Iterator[FoldEngines]:
    """Open one engine per fold for a bundle or an nnU-Net model folder; closes them on exit.

    ``tile_source`` (the scans about to be segmented) gates an OpenVINO model compiled on first use.
    """
    from tucker_export.engines.selection import (
        check_backend_precision,
        normalize_backend,
        onnx_precision,
        open_runners,
    )

    if (bundle_path is None) == (model_dir is None):
        raise ConfigurationError("Give exactly one of a bundle (-b) or an nnU-Net model folder (-m).")
    backend = normalize_backend(backend)
    check_backend_precision(backend, precision)  # before anything is loaded or built
    torch_device = parse_device(device)
    with contextlib.ExitStack() as stack:
        if model_dir is not None and backend == "torch":
            from tucker_export.nnunet.loading import load_trained_model

            loaded = load_trained_model(model_dir, folds, trust_checkpoint=trust_checkpoint)
            yield FoldEngines(
                loaded.spec,
                {f: torch_fold_model(n, torch_device) for f, n in loaded.networks.items()},
                "torch",
                "requested",
            )
            return
        from tucker_export.bundle import Bundle

        if model_dir is not None:
            from tucker_export.pipeline import undecomposed_bundle

            bundle = undecomposed_bundle(model_dir, precision=onnx_precision(precision) if backend != "torch" else None,
                                         trust_checkpoint=trust_checkpoint)
        else:
            bundle = Bundle.load(bundle_path)
        selected_folds = bundle.resolve_folds(folds)
        runners, backend_name, reason = open_runners(
            stack, bundle, backend=backend, precision=precision, folds=selected_folds, device=torch_device,
            tile_source=tile_source, threads=threads,
        )
        fold_models = {fold: runner_fold_model(runner, torch_device) for fold, runner in runners.items()}
        resolved = next(iter(runners.values())).precision if runners else precision
        yield FoldEngines(bundle.spec, fold_models, backend_name, reason, resolved)


def runner_fold_model(runner, device: torch.device) -> FoldModel:
    def run(batch: torch.Tensor) -> torch.Tensor:
        out = runner.infer(batch)
        if isinstance(out, np.ndarray):
            out = torch.from_numpy(out)
        return out.to(device=batch.device, dtype=torch.float32)

    return run


def parse_device(device: str) -> torch.device:
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ConfigurationError(f"Device {device!r} is not 'cpu', 'cuda' or 'cuda:N'.") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ConfigurationError(f"Device {device} was requested but no CUDA device is visible.", option="device",
                                 use="cpu")
    if parsed.type not in ("cpu", "cuda"):
        raise ConfigurationError(f"Device {device!r} is not 'cpu', 'cuda' or 'cuda:N'.")
    return parsed


# ---- the run --------------------------------------------------------------------------------------

# Largest batch (in patch voxels) that ``auto`` sends in one engine call: 8 mirror variants of a
# 64^3 patch, or one 128^3 patch. Activations of a TotalSegmentator-size net at batch 8 x 128^3 would
# need tens of GB.
AUTO_BATCH_VOXELS = 2**21


def auto_batch_size(backend: str, *, mirror_variants: int, patch_size: Sequence[int]) -> int:
    """Tiles x mirror variants per engine call for ``--batch-size auto``.

    PyTorch: 1, so that `infer` reproduces nnU-Net's numbers call for call. Engines: the mirror
    variants of a tile in one call (measured on the demo model with OpenVINO bf16: network time
    -10 % at 8 vs 1), as far as ``AUTO_BATCH_VOXELS`` allows.
    """
    if backend == "torch":
        return 1
    voxels = int(np.prod([int(s) for s in patch_size]))
    return max(1, min(int(mirror_variants), AUTO_BATCH_VOXELS // max(1, voxels)))


def parse_batch_size(value: int | str) -> int:
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise ConfigurationError(f"Batch size {value!r} is not 'auto' or a whole number >= 1.") from None
    if size < 1:
        raise ConfigurationError(f"Batch size must be at least 1, got {size}.")
    return size



def make_predictor(
    engines: FoldEngines, *, step_size: float, use_mirroring: bool, batch_size: int | str, device: str, progress: bool,
) -> EnginePredictor:
    """nnU-Net's predictor over ``engines`` (``batch_size="auto"``: see ``auto_batch_size``); ``.batch_size`` is resolved."""
    spec = engines.spec
    if batch_size == "auto":
        batch_size = auto_batch_size(
            engines.backend, patch_size=spec.patch_size,
            mirror_variants=len(mirror_axis_combinations(
                spec.allowed_mirroring_axes if use_mirroring else None, len(spec.patch_size))),
        )
    predictor = EnginePredictor(
        tile_step_size=step_size, use_mirroring=use_mirroring, batch_size=parse_batch_size(batch_size),
        # Per-tile bars only on a terminal: in a log file each refresh is a line, hundreds per case.
        device=device, allow_tqdm=progress and sys.stderr.isatty(),
    )
    predictor.initialize(spec, engines.fold_models)
    return predictor


def run_inference(
    input_path: str | Path,
    output_dir: str | Path,
    *,
    bundle_path: str | Path | None = None,
    model_dir: str | Path | None = None,
    backend: str = "auto",
    precision: str = "auto",
    folds: list[Fold] | None = None,
    step_size: float = 0.5,
    use_mirroring: bool = True,
    batch_size: int | str = "auto",
    device: str = "cpu",
    save_probabilities: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    trust_checkpoint: bool = False,
    threads: int | None = None,
    strict: bool = False,
    overlap: bool = True,
    fast_export: bool = True,
) -> InferenceReport:
    """Segment every case under ``input_path`` into ``output_dir`` (one file per case, input geometry).

    Each case is checked first (``tucker_export.integrity``): a broken scan is reported as failed and
    nothing is written for it. ``strict`` also refuses what is otherwise a warning (a non-CT series
    for a CT model).
    ``precision="auto"``: on the CPU, OpenVINO at the fastest precision that passed its accuracy
    gate (compiled and gated on first use, on tiles of these scans); fp32 on other backends.
    ``threads``: engine threads [default: physical cores of the process's CPU affinity].
    ``batch_size="auto"``: see ``auto_batch_size``.
    ``overlap``: prepare the next case and export the previous one while the network runs
    (``tucker_export.case_pipeline``); False runs the stages one after the other.
    ``fast_export``: resample the logits a few classes at a time in PyTorch with a running argmax
    (``nnunet.fast_export``) instead of stock's all-classes scipy resampling, where it applies.
    """
    from tqdm import tqdm

    output_dir = Path(output_dir)
    with open_fold_engines(
        bundle_path=bundle_path, model_dir=model_dir, backend=backend, precision=precision,
        folds=folds, device=device, trust_checkpoint=trust_checkpoint, tile_source=input_path, threads=threads,
    ) as engines:
        spec = engines.spec
        cases = discover_cases(input_path, num_channels=spec.num_input_channels,
                               file_ending=spec.dataset_json["file_ending"])
        logger.info("Backend %s (%s); %d case(s) in %s.", engines.backend, engines.reason, len(cases), input_path)
        predictor = make_predictor(engines, step_size=step_size, use_mirroring=use_mirroring, batch_size=batch_size,
                                   device=device, progress=progress)
        output_dir.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        results = run_cases(
            cases, spec=spec, predict=predictor.predict_logits_from_preprocessed_data, output_dir=output_dir,
            overwrite=overwrite, save_probabilities=save_probabilities, strict=strict, overlap=overlap,
            fast_export=fast_export,
            progress=lambda todo: tqdm(todo, desc="cases", unit="case", disable=not progress,
                                       mininterval=0.1 if sys.stderr.isatty() else 30.0),
        )
        return InferenceReport(
            results=results, backend=engines.backend, backend_reason=engines.reason, precision=engines.precision,
            folds=tuple(engines.fold_models), batch_size=predictor.batch_size, overlap=overlap,
            cases_wall_s=time.perf_counter() - started,
        )


def check_scans(
    input_path: str | Path,
    *,
    bundle_path: str | Path | None = None,
    model_dir: str | Path | None = None,
    strict: bool = False,
    progress: bool = True,
):
    """Every integrity check `infer` runs, over every case under ``input_path``, segmenting nothing.

    With a bundle or model folder, the model's own checks too (channels, dimensionality, memory,
    modality); without, the checks on the files alone. Returns an ``InputsReport``.
    """
    from tucker_export.integrity.checks import ModelNeeds, check_inputs

    if bundle_path is not None and model_dir is not None:
        raise ConfigurationError("Give at most one of a bundle (-b) or an nnU-Net model folder (-m).")
    spec = None
    if bundle_path is not None:
        from tucker_export.bundle import Bundle

        spec = Bundle.load(bundle_path).spec
    elif model_dir is not None:
        from tucker_export.nnunet.loading import load_model_spec

        spec = load_model_spec(model_dir)
    return check_inputs(
        input_path, ModelNeeds.from_spec(spec) if spec is not None else None, strict=strict,
        file_ending=spec.dataset_json["file_ending"] if spec is not None else ".nii.gz", progress=progress,
    )
