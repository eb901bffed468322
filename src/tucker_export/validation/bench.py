"""`tucker-export bench` on one bundle: latency, memory, size and compute per backend and precision.

``bench_bundle(bundle, ...)``: for every backend and precision asked for, the model-only latency
(:mod:`tucker_export.validation.timing`) on a seeded ``(B, C, *patch)`` input, the peak memory while
the engine is open, and with ``input_dir`` the end-to-end time per case through ``run_inference``
(preprocess / network / export); plus parameters and MACs from the manifest and the ONNX, engine and
weight file sizes. A backend that cannot run here (no TensorRT, no fp16 export, ...) is skipped and
the reason kept. ``format_bench_report`` prints the tables. Rank-factor sweeps are in
:mod:`tucker_export.validation.sweep`.

Nothing here asserts speed: the numbers are measurements of this machine at this moment, and the
load average is recorded beside them (:mod:`tucker_export.validation.machine`).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tucker_export._io import write_json_atomic
from tucker_export._text import human as _human
from tucker_export.errors import ConfigurationError, InputImageError, TuckerExportError
from tucker_export.validation.bench_common import (
    DEFAULT_SEED,
    _check_counts,
    _json_safe,
    _table,
    parse_batch_sizes,
)
from tucker_export.validation.machine import environment, loadavg
from tucker_export.validation.timing import LatencyStats, PeakMemory, latency

if TYPE_CHECKING:
    import torch

    from tucker_export.bundle import Bundle
    from tucker_export.nnunet.loading import Fold

logger = logging.getLogger(__name__)

BENCH_BACKENDS: tuple[str, ...] = ("torch", "ort", "openvino", "trt")


# ---- one bundle ---------------------------------------------------------------------------------


@dataclass
class FoldLatency:
    """Latency and memory of one fold's engine; ``same_structure`` lists the folds it stands for."""

    fold: str
    same_structure: list[str]
    latency: list[LatencyStats]
    memory: dict[str, Any]
    loadavg_1min: dict[str, float | None]

    def to_dict(self) -> dict[str, Any]:
        return {
            "fold": self.fold,
            "same_structure": self.same_structure,
            "latency": [s.to_dict() for s in self.latency],
            "memory": _json_safe(self.memory),
            "loadavg_1min": self.loadavg_1min,
        }


@dataclass
class EndToEnd:
    """``run_inference`` on real cases: seconds per case split into preprocess / network / export."""

    settings: dict[str, Any]
    cases: list[dict[str, Any]]
    summary: dict[str, Any]
    memory: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return _json_safe(asdict(self))


@dataclass
class BackendBench:
    """One backend and precision: measured, or skipped with the reason."""

    backend: str
    precision: str
    status: str  # "measured" or "skipped"
    reason: str
    runtime: str | None = None
    folds: list[FoldLatency] = field(default_factory=list)
    end_to_end: EndToEnd | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "precision": self.precision,
            "status": self.status,
            "reason": self.reason,
            "runtime": self.runtime,
            "folds": [f.to_dict() for f in self.folds],
            "end_to_end": self.end_to_end.to_dict() if self.end_to_end else None,
        }


@dataclass
class BenchReport:
    bundle: str
    created: str
    settings: dict[str, Any]
    environment: dict[str, Any]
    model: dict[str, Any]
    compute: dict[str, dict[str, Any]]
    sizes: dict[str, Any]
    results: list[BackendBench]

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "tucker-export bench",
            "bundle": self.bundle,
            "created": self.created,
            "settings": _json_safe(self.settings),
            "environment": _json_safe(self.environment),
            "model": _json_safe(self.model),
            "compute": _json_safe(self.compute),
            "sizes": _json_safe(self.sizes),
            "results": [r.to_dict() for r in self.results],
        }

    def write_json(self, path: str | Path) -> Path:
        write_json_atomic(path, self.to_dict())
        return Path(path)


_COMPUTE_KEYS = ("input_shape", "layers", "factorized", "params_before", "params_after", "params_ratio",
                 "conv_params_before", "conv_params_after", "macs_before", "macs_after", "macs_ratio",
                 "max_relative_error")


def compute_figures(bundle: Bundle) -> dict[str, dict[str, Any]]:
    """Per fold: parameters and MACs before/after and their ratios, from the manifest totals.

    MACs are those of one network call at batch 1 and the configuration's patch size (see
    ``tucker_export.exporter.counting``); ``macs_speedup_bound`` = before / after is what a runtime
    that turned every saved MAC into time would gain.
    """
    figures: dict[str, dict[str, Any]] = {}
    for fold in bundle.fold_entries():
        totals = bundle.fold_totals(fold)
        figures[fold] = {key: totals[key] for key in _COMPUTE_KEYS if key in totals}
        if totals.get("macs_after"):
            figures[fold]["macs_speedup_bound"] = totals["macs_before"] / totals["macs_after"]
    return figures


def _file_size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def artifact_sizes(bundle: Bundle) -> dict[str, Any]:
    """Bytes of every weights, ONNX and engine file the manifest names (``None`` where the file is missing)."""
    weights = {str(fold): _file_size(bundle.weights_path(fold)) for fold in bundle.folds}
    onnx = {
        key: {"file": entry["file"], "fold": str(entry.get("fold")), "precision": entry.get("precision"),
              "bytes": _file_size(bundle.artifact_path(entry["file"]))}
        for key, entry in bundle.onnx_entries().items()
    }
    engines = {
        key: {"file": entry["file"], "fold": str(entry.get("fold")), "precision": entry.get("precision"),
              "gpu": entry.get("gpu", {}).get("kind"), "bytes": _file_size(bundle.artifact_path(entry["file"]))}
        for key, entry in bundle.engine_records().items()
    }
    return {"weights": weights, "onnx": onnx, "engines": engines}


def _structure_signature(layers: Sequence[Mapping[str, Any]]) -> tuple[Any, ...]:
    """Two folds with the same factorized layers and ranks cost the same to run."""
    return tuple((layer["name"], tuple(layer["ranks"]) if layer.get("ranks") else None) for layer in layers)


def latency_folds(bundle: Bundle, folds: Sequence[Fold]) -> dict[Fold, list[Fold]]:
    """One representative fold per distinct network structure, with the folds it stands for.

    Folds decomposed with the same ranks (always so for relative and fixed policies) have the same
    architecture and so the same latency; timing each of them would only cost time.
    """
    groups: dict[tuple[Any, ...], list[Fold]] = {}
    for fold in folds:
        groups.setdefault(_structure_signature(bundle.fold_layers(fold)), []).append(fold)
    return {members[0]: members for members in groups.values()}


def _bench_precisions(precisions: Sequence[str]) -> tuple[str, ...]:
    """fp32, fp16 (ONNX Runtime, TensorRT, PyTorch on CUDA), bf16, int8 (OpenVINO); order kept, duplicates dropped."""
    allowed = ("fp32", "fp16", "bf16", "int8")
    chosen: list[str] = []
    for value in precisions:
        for part in str(value).replace(",", " ").split():
            name = part.strip().lower()
            if name not in allowed:
                raise ConfigurationError(f"Precision {part!r} is not one of {', '.join(allowed)}.")
            if name not in chosen:
                chosen.append(name)
    if not chosen:
        raise ConfigurationError("At least one precision is needed (fp32, fp16, bf16 or int8).")
    return tuple(chosen)


def _skip_reason(backend: str, precision: str, device: torch.device) -> str | None:
    """Why a backend/precision pair is not measured, for cases the runner would silently change."""
    from tucker_export.engines.selection import check_backend_precision

    try:
        check_backend_precision(backend, precision)
    except ConfigurationError as error:
        return str(error)
    if backend == "torch" and precision == "fp16" and device.type != "cuda":
        # TorchRunner quietly runs fp32 here (nnU-Net autocasts on CUDA only); timing it as fp16 would mislead.
        return "PyTorch fp16 is autocast on CUDA only; on the CPU it would run fp32 (measured as torch fp32)"
    return None


def _runtime_description(runner: Any) -> str:
    providers = getattr(runner, "providers_used", None)
    base = runner.describe() if hasattr(runner, "describe") else type(runner).__name__
    return f"{base} [{', '.join(providers)}]" if providers else base


def _end_to_end_summary(cases: list[dict[str, Any]]) -> dict[str, Any]:
    done = [c for c in cases if c["status"] == "done"]
    summary: dict[str, Any] = {"cases": len(cases), "done": len(done), "failed": len(cases) - len(done)}
    for key in ("check_s", "read_s", "preprocess_s", "network_s", "export_s", "total_s"):
        values = [c[key] for c in done if c.get(key) is not None]
        summary[f"{key[:-2]}_sum_s"] = float(sum(values)) if values else None
        summary[f"{key[:-2]}_mean_s"] = float(np.mean(values)) if values else None
        summary[f"{key[:-2]}_median_s"] = float(np.median(values)) if values else None
    return summary


def end_to_end(
    input_dir: str | Path,
    *,
    bundle_path: str | Path,
    backend: str,
    precision: str,
    folds: Sequence[Fold] | None,
    device: str,
    use_mirroring: bool,
    step_size: float,
    batch_size: int,
    output_dir: str | Path | None = None,
) -> tuple[EndToEnd, Any]:
    """``run_inference`` on ``input_dir`` with per-case timings; outputs go to ``output_dir`` or a temporary folder.

    Returns the ``EndToEnd`` figures and the ``InferenceReport``.
    """
    from tucker_export.inference import run_inference

    with contextlib.ExitStack() as stack:
        if output_dir is None:
            output_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="tucker-export-bench-"))
        with PeakMemory(device) as probe:
            report = run_inference(
                input_dir, output_dir, bundle_path=bundle_path, backend=backend, precision=precision,
                folds=list(folds) if folds else None, step_size=step_size, use_mirroring=use_mirroring,
                batch_size=batch_size, device=device, overwrite=True, progress=False,
            )
    cases = []
    for result in report.results:
        seconds = result.seconds
        cases.append({
            "case": result.name, "status": result.status, "error": result.error,
            "check_s": seconds.get("check"), "read_s": seconds.get("read"), "preprocess_s": seconds.get("preprocess"), "network_s": seconds.get("network"),
            "export_s": seconds.get("export"),
            "total_s": sum(seconds.values()) if seconds else None,
        })
    settings = {"input": str(input_dir), "backend": report.backend, "backend_reason": report.backend_reason,
                "precision": precision, "folds": [str(f) for f in report.folds], "mirroring": use_mirroring,
                "step_size": step_size, "batch_size": batch_size, "device": str(device)}
    return EndToEnd(settings, cases, _end_to_end_summary(cases), probe.result), report


@dataclass(frozen=True)
class _BenchPlan:
    """What every backend/precision pair of one ``bench_bundle`` call is measured with."""

    bundle: Bundle
    selected: tuple[Fold, ...]
    representatives: dict[Fold, list[Fold]]
    input_shape: tuple[int, ...]
    sizes_to_time: tuple[int, ...]
    warmup: int
    repeats: int
    seed: int
    device: str
    torch_device: torch.device
    input_dir: str | Path | None
    use_mirroring: bool
    step_size: float
    e2e_batch_size: int


def bench_bundle(
    bundle_path: str | Path,
    *,
    backends: Sequence[str] = ("torch", "ort"),
    precisions: Sequence[str] = ("fp32",),
    batch_sizes: Sequence[int] = (1, 2, 4),
    warmup: int = 2,
    repeats: int = 10,
    input_dir: str | Path | None = None,
    folds: Sequence[Fold] | None = None,
    device: str = "cpu",
    use_mirroring: bool = True,
    step_size: float = 0.5,
    e2e_batch_size: int = 1,
    seed: int = DEFAULT_SEED,
    progress: bool = False,
) -> BenchReport:
    """Benchmark a bundle for every backend and precision asked for; see the module docstring.

    Latency is measured on one fold per distinct network structure (``latency_folds``); with
    ``input_dir`` every measured backend also segments those cases (``folds`` ensembled, TTA per
    ``use_mirroring``) and reports seconds per case. A backend that cannot run here is recorded as
    ``"skipped"`` with the reason; a backend named twice is measured once.
    """
    from tqdm.auto import tqdm

    from tucker_export.bundle import Bundle, utc_now
    from tucker_export.inference import parse_device

    # Every option is checked before the bundle is loaded, so a typo fails at once.
    _check_counts(warmup, repeats)
    sizes_to_time = parse_batch_sizes(batch_sizes)
    chosen_backends = _bench_backends(backends)
    chosen_precisions = _bench_precisions(precisions)
    torch_device = parse_device(device)
    if input_dir is not None and not Path(input_dir).exists():
        raise InputImageError(f"Input {input_dir} does not exist.")
    bundle = Bundle.load(bundle_path)
    selected = bundle.resolve_folds(list(folds) if folds else None)
    plan = _BenchPlan(
        bundle=bundle, selected=selected, representatives=latency_folds(bundle, selected),
        input_shape=(bundle.num_input_channels, *bundle.patch_size), sizes_to_time=sizes_to_time,
        warmup=warmup, repeats=repeats, seed=seed, device=device, torch_device=torch_device,
        input_dir=input_dir, use_mirroring=use_mirroring, step_size=step_size, e2e_batch_size=e2e_batch_size,
    )

    pairs = [(b, p) for b in chosen_backends for p in chosen_precisions]
    results = [_bench_pair(plan, backend, precision)
               for backend, precision in tqdm(pairs, desc="bench", unit="backend", disable=not progress)]
    return BenchReport(
        bundle=str(bundle.path.resolve()),
        created=utc_now(),
        settings=_bench_settings(plan, chosen_backends, chosen_precisions),
        environment=environment(),
        model=_model_description(bundle),
        compute=compute_figures(bundle),
        sizes=artifact_sizes(bundle),
        results=results,
    )


def _bench_backends(backends: Sequence[str]) -> list[str]:
    """The named backends, normalized, in order, each once; ``auto`` is refused (it is no one backend)."""
    from tucker_export.engines.selection import normalize_backend

    chosen: list[str] = []
    for name in backends:
        backend = normalize_backend(name)
        if backend == "auto":
            raise ConfigurationError("bench measures named backends; choose from torch, ort, openvino, trt (not auto).")
        if backend not in chosen:
            chosen.append(backend)
    if not chosen:
        raise ConfigurationError("At least one backend is needed (torch, ort, openvino or trt).")
    return chosen


def _bench_pair(plan: _BenchPlan, backend: str, precision: str) -> BackendBench:
    """One backend at one precision: latency per representative fold and, with an input, end to end."""
    from tucker_export.engines.selection import select_backend

    skip = _skip_reason(backend, precision, plan.torch_device)
    if skip is None:
        try:
            factory, reason = select_backend(backend, plan.bundle, precision, plan.torch_device, plan.selected,
                                             tile_source=plan.input_dir)
        except TuckerExportError as error:
            # A backend this machine cannot run is a result to report, not a reason to stop the bench.
            skip = str(error)
    if skip is not None:
        logger.info("Skipping %s %s: %s", backend, precision, skip)
        return BackendBench(backend, precision, "skipped", skip)
    entry = BackendBench(backend, precision, "measured", reason)
    for fold, members in plan.representatives.items():
        entry.folds.append(_fold_latency(plan, entry, factory, fold, members))
    if plan.input_dir is not None:
        entry.end_to_end, _ = end_to_end(
            plan.input_dir, bundle_path=plan.bundle.path, backend=backend, precision=precision, folds=plan.selected,
            device=plan.device, use_mirroring=plan.use_mirroring, step_size=plan.step_size,
            batch_size=plan.e2e_batch_size,
        )
    return entry


def _fold_latency(
    plan: _BenchPlan, entry: BackendBench, factory: Any, fold: Fold, members: list[Fold],
) -> FoldLatency:
    """Time ``fold``'s engine at every batch size; sets ``entry.runtime`` to what actually ran."""
    load_before = loadavg()
    with PeakMemory(plan.torch_device) as probe:
        with factory(fold) as runner:
            entry.runtime = _runtime_description(runner)
            stats = latency(runner, plan.input_shape, batch_sizes=plan.sizes_to_time, warmup=plan.warmup,
                            repeats=plan.repeats, seed=plan.seed)
            # GPU memory is sampled while the engine is still open: closing it frees what it held.
            probe.sample_gpu()
    measured = FoldLatency(
        fold=str(fold), same_structure=[str(m) for m in members], latency=list(stats.values()),
        memory=probe.result, loadavg_1min={"before": load_before, "after": loadavg()},
    )
    logger.info(
        "%s %s fold %s: %s", entry.backend, entry.precision, fold,
        ", ".join(f"batch {b} {1e3 * s.median_s:.1f} ms" for b, s in stats.items()),
    )
    return measured


def _bench_settings(plan: _BenchPlan, backends: list[str], precisions: tuple[str, ...]) -> dict[str, Any]:
    """The report's ``settings``: what was asked for, after normalization."""
    return {
        "backends": backends, "precisions": list(precisions), "batch_sizes": list(plan.sizes_to_time),
        "warmup": plan.warmup, "repeats": plan.repeats, "seed": plan.seed, "device": str(plan.torch_device),
        "folds": [str(f) for f in plan.selected], "input_shape": list(plan.input_shape),
        "input": str(plan.input_dir) if plan.input_dir is not None else None,
        "end_to_end": {"mirroring": plan.use_mirroring, "step_size": plan.step_size,
                       "batch_size": plan.e2e_batch_size}
        if plan.input_dir is not None else None,
    }


def _model_description(bundle: Bundle) -> dict[str, Any]:
    """The report's ``model``: the network's input, outputs and how it was decomposed."""
    return {
        "patch_size": list(bundle.patch_size),
        "num_input_channels": bundle.num_input_channels,
        "num_segmentation_heads": bundle.num_segmentation_heads,
        "label_names": bundle.label_names,
        "rank_policy": bundle.rank_policy,
        "source": bundle.source.get("model_dir"),
    }


# ---- text tables --------------------------------------------------------------------------------


def _mb(value: int | None) -> str:
    return f"{value / 2**20:.1f}" if value is not None else "-"


def format_bench_report(report: BenchReport | Mapping[str, Any]) -> str:
    """The tables the CLI prints: compute and sizes, latency per backend and batch, end-to-end per case."""
    data = report.to_dict() if isinstance(report, BenchReport) else report
    lines = [f"bundle {data['bundle']}"]
    policy = data["model"].get("rank_policy") or {}
    env = data["environment"]
    lines.append(
        f"rank policy {policy.get('mode')}"
        + (f" (factor {policy.get('factor')})" if policy.get("mode") == "relative" else "")
        + f"; patch {'x'.join(map(str, data['model']['patch_size']))}; device {data['settings']['device']}; "
        f"{env.get('usable_cpus')} CPU(s), torch threads {env.get('torch_threads')}, load {env.get('loadavg_1min')}"
    )
    lines.append("")
    rows = []
    for fold, c in data["compute"].items():
        rows.append([fold, _human(c.get("params_before")), _human(c.get("params_after")), f"{c.get('params_ratio', 1):.3f}",
                     _human(c.get("macs_before")), _human(c.get("macs_after")), f"{c.get('macs_ratio', 1):.3f}",
                     _mb(data["sizes"]["weights"].get(fold))])
    lines.extend(_table(["fold", "params", "-> after", "ratio", "MACs", "-> after", "ratio", "weights MB"], rows, "lrrrrrrr"))
    files = [(k, v) for section in ("onnx", "engines") for k, v in data["sizes"][section].items()]
    if files:
        lines.append("files: " + ", ".join(f"{v['file']} {_mb(v['bytes'])} MB" for _, v in files))
    lines.append("")

    rows = []
    skipped = []
    for result in data["results"]:
        if result["status"] != "measured":
            skipped.append(f"skipped {result['backend']} {result['precision']}: {result['reason']}")
            continue
        for fold in result["folds"]:
            memory = fold["memory"]
            gpu = memory.get("peak_gpu_torch_allocated_bytes")
            # a fold timed for others with the same ranks says so: "0 (=0,1)"
            shared = fold["same_structure"]
            fold_text = fold["fold"] + (f" (={','.join(shared)})" if len(shared) > 1 else "")
            for s in fold["latency"]:
                rows.append([
                    result["backend"], result["precision"], fold_text, str(s["batch_size"]),
                    f"{1e3 * s['median_s']:.1f}", f"{1e3 * s['per_patch_median_s']:.1f}",
                    f"{1e3 * s['p10_s']:.1f}-{1e3 * s['p90_s']:.1f}", f"{1e3 * s['min_s']:.1f}-{1e3 * s['max_s']:.1f}",
                    f"{s['patches_per_s']:.2f}", _mb(memory.get("peak_rss_bytes")),
                    _mb(memory.get("peak_rss_increase_bytes")), _mb(gpu) if gpu is not None else "-",
                ])
    if rows:
        lines.append(f"model-only latency, median of {data['settings']['repeats']} after {data['settings']['warmup']} "
                     f"warm-up call(s) (ms):")
        lines.extend(_table(["backend", "prec.", "fold", "batch", "median", "/patch", "p10-p90", "min-max",
                             "patch/s", "peak RSS MB", "+RSS MB", "GPU MB"], rows, "llllrrrrrrrr"))
    lines.extend(skipped)

    e2e_rows = []
    for result in data["results"]:
        e2e = result.get("end_to_end")
        if not e2e:
            continue
        s = e2e["summary"]

        def fmt(value: float | None) -> str:
            return f"{value:.2f}" if value is not None else "-"

        e2e_rows.append([result["backend"], result["precision"], f"{s['done']}/{s['cases']}",
                         fmt(s["preprocess_mean_s"]), fmt(s["network_mean_s"]), fmt(s["export_mean_s"]),
                         fmt(s["total_mean_s"]), _mb(e2e["memory"].get("peak_rss_bytes"))])
    if e2e_rows:
        settings = data["settings"]["end_to_end"]
        lines.append("")
        lines.append(f"end to end per case, mean seconds (TTA {'on' if settings['mirroring'] else 'off'}, "
                     f"step {settings['step_size']}, batch {settings['batch_size']}, folds {', '.join(data['settings']['folds'])}):")
        lines.extend(_table(["backend", "prec.", "cases", "preprocess", "network", "export", "total", "peak RSS MB"],
                            e2e_rows, "lllrrrrr"))
    return "\n".join(lines)
