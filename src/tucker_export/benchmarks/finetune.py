"""Benchmark: label-free distillation fine-tuning on the demo model, before vs after.

    python bench/bench_finetune.py [--factors 0.1 0.2] [--minutes 4] [--steps 1000] [--out bench/results/finetune.json]

For each rank factor, in one run on one machine:

1. decompose the trained demo model (every fold) at that relative rank factor;
2. ``validate`` it on the demo's held-out test cases (``test/imagesTs``, never used for training
   or fine-tuning), PyTorch backend, no TTA: Dice per structure against the original model's
   segmentations and against the ground truth;
3. ``finetune`` it on the demo's *training* images (``imagesTr`` under the demo cache, without
   their labels) with a wall-clock budget of ``--minutes`` for all folds together (split evenly);
4. ``validate`` the fine-tuned bundle the same way.

The JSON records both validations per structure, the fine-tuning report (held-out tile agreement,
best step, seconds) and the machine block with its load verdict.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from tucker_export.benchmarks.paths import RESULTS


def _per_structure(report, names: dict[int, str]) -> dict[str, Any]:
    """Mean over cases of each structure's Dice vs the original and vs the truth (and the original's vs the truth)."""
    out: dict[str, Any] = {"vs_original": {}, "vs_truth": {}, "original_vs_truth": {}}
    for key, field in (("vs_original", "engine_vs_reference"), ("vs_truth", "engine_vs_truth"),
                       ("original_vs_truth", "reference_vs_truth")):
        for label, name in names.items():
            values = [case[field][str(label)]["dice"] for case in report.cases.values()
                      if field in case and case[field][str(label)]["status"] != "absent"]
            values = [v for v in values if v is not None]
            if values:
                out[key][name] = round(float(np.mean(values)), 4)
        scores = list(out[key].values())
        out[f"{key}_mean"] = round(float(np.mean(scores)), 4) if scores else None
        out[f"{key}_min"] = round(float(np.min(scores)), 4) if scores else None
    return out


def _validate(bundle: Path, demo) -> dict[str, Any]:
    from tucker_export.validation.validate import validate_bundle

    report = validate_bundle(bundle, demo.test_images_dir, labels_dir=demo.test_labels_dir, backend="torch",
                             precision="fp32", use_mirroring=False, progress=False, parity_tiles=1)
    names = {label: name for label, name in demo.label_names.items() if label != 0}
    return _per_structure(report, names)


def plot(results: dict[str, Any], path: Path) -> Path:
    """Mean and worst-structure Dice vs the original per rank factor, before and after fine-tuning."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    factors = sorted(float(f) for f in results["rows"])
    rows = [results["rows"][str(f)] for f in factors]
    figure = Figure(figsize=(6, 4))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for when, style in (("before", "--"), ("after", "-")):
        axes.plot(factors, [r[when]["vs_original_mean"] for r in rows], style, marker="o", label=f"mean, {when}")
        axes.plot(factors, [r[when]["vs_original_min"] for r in rows], style, marker="v", label=f"worst structure, {when}")
    axes.axhline(0.995, color="grey", linewidth=0.8)
    axes.axhline(0.99, color="grey", linewidth=0.8, linestyle=":")
    axes.set_xlabel("rank factor")
    axes.set_ylabel("Dice vs the original model (held-out cases)")
    axes.set_title("Demo model: label-free fine-tuning after decomposition")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


def main() -> int:
    from tucker_export.demo import ensure_demo_model
    from tucker_export.exporter.ranks import RankPolicy
    from tucker_export.finetune import FinetuneSettings, finetune_bundle
    from tucker_export.pipeline import prepare_bundle
    from tucker_export.validation.machine import MachineWatch, environment, write_benchmark_json

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--factors", type=float, nargs="+", default=[0.1, 0.2], help="relative rank factors")
    parser.add_argument("--minutes", type=float, default=4.0,
                        help="training budget per factor, all folds together (tile reading and loading come on top)")
    parser.add_argument("--steps", type=int, default=1000, help="step cap per fold (the time budget usually ends first)")
    parser.add_argument("--lr", type=float, default=FinetuneSettings.lr)
    parser.add_argument("--tiles", type=int, default=FinetuneSettings.train_tiles)
    parser.add_argument("--out", type=Path, default=RESULTS / "finetune.json")
    args = parser.parse_args()
    watch = MachineWatch()
    demo = ensure_demo_model()
    scans = demo.ensure_training_images()
    results: dict[str, Any] = {"environment": environment(), "scans": str(scans), "held_out": str(demo.test_images_dir),
                               "minutes_per_factor": args.minutes, "rows": {}}
    with tempfile.TemporaryDirectory(prefix="bench-finetune-") as tmp:
        for factor in args.factors:
            bundle = prepare_bundle(demo.model_dir, Path(tmp) / f"bundle-{factor}", policy=RankPolicy(factor=factor)).bundle
            before = _validate(bundle.path, demo)
            settings = FinetuneSettings(steps=args.steps, lr=args.lr, train_tiles=args.tiles,
                                        max_minutes=args.minutes / len(bundle.folds))
            started = time.perf_counter()
            report = finetune_bundle(bundle.path, scans, output=Path(tmp) / f"tuned-{factor}", settings=settings,
                                     progress=True)
            seconds = time.perf_counter() - started
            after = _validate(Path(tmp) / f"tuned-{factor}", demo)
            results["rows"][str(factor)] = {
                "before": before, "after": after, "finetune_seconds_total": round(seconds, 1),
                "finetune": report.to_dict(),
            }
            print(f"\n== rank factor {factor}: fine-tuned {seconds:.0f} s on {scans} ==")
            print(f"{'structure':<12}{'vs original before':>20}{'after':>8}{'vs truth before':>17}{'after':>8}"
                  f"{'original vs truth':>19}")
            nan = float("nan")
            for name in before["vs_original"]:
                print(f"{name:<12}{before['vs_original'][name]:>20.4f}{after['vs_original'][name]:>8.4f}"
                      f"{before['vs_truth'].get(name, nan):>17.4f}{after['vs_truth'].get(name, nan):>8.4f}"
                      f"{before['original_vs_truth'].get(name, nan):>19.4f}")
            print(f"{'mean':<12}{before['vs_original_mean']:>20.4f}{after['vs_original_mean']:>8.4f}"
                  f"{before['vs_truth_mean']:>17.4f}{after['vs_truth_mean']:>8.4f}{before['original_vs_truth_mean']:>19.4f}")
            write_benchmark_json(args.out, results, watch)
    print("\n" + write_benchmark_json(args.out, results, watch))
    print(f"plot: {plot(results, args.out.with_suffix('.png'))}")
    return 0
