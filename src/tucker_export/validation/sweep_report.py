"""The rank-factor sweep's report: its rows, the table the CLI prints and the PNG plot of the trade-off."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tucker_export._io import atomic_path, write_json_atomic
from tucker_export.validation.bench_common import _json_safe, _table
from tucker_export.validation.timing import LatencyStats


@dataclass
class SweepRow:
    """One point of the trade-off: the original (``rank_factor`` None) or one rank factor."""

    label: str
    rank_factor: float | None
    rank_policy: dict[str, Any]
    compute: dict[str, Any]
    onnx_bytes: int | None
    weights_bytes: int | None
    latency: list[LatencyStats]
    speedup: dict[str, float | None]
    end_to_end: dict[str, Any]
    dice_vs_original: dict[str, float | None]
    nsd_vs_original: dict[str, float | None]
    dice_vs_truth: dict[str, float | None] | None
    per_case: dict[str, dict[str, Any]]

    @property
    def mean_dice_vs_original(self) -> float | None:
        values = [v for v in self.dice_vs_original.values() if v is not None]
        return float(np.mean(values)) if values else None

    @property
    def mean_dice_vs_truth(self) -> float | None:
        values = [v for v in (self.dice_vs_truth or {}).values() if v is not None]
        return float(np.mean(values)) if values else None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["latency"] = [s.to_dict() for s in self.latency]
        data["mean_dice_vs_original"] = self.mean_dice_vs_original
        data["mean_dice_vs_truth"] = self.mean_dice_vs_truth
        return _json_safe(data)


@dataclass
class SweepReport:
    model_dir: str
    created: str
    settings: dict[str, Any]
    environment: dict[str, Any]
    structures: list[str]
    cases: list[str]
    rows: list[SweepRow]
    machine_load: dict[str, Any] | None = None  # MachineWatch's verdict over the whole sweep

    @property
    def baseline(self) -> SweepRow:
        return self.rows[0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "tucker-export rank-factor sweep",
            "model_dir": self.model_dir,
            "created": self.created,
            "settings": _json_safe(self.settings),
            "environment": _json_safe(self.environment),
            "structures": self.structures,
            "cases": self.cases,
            "definitions": {
                "speedup": "original model-only median latency / this row's, same backend, precision and batch size",
                "macs_ratio": "MACs of one network call after / before decomposition (manifest totals)",
                "dice_vs_original": "per structure, mean over cases of the Dice between this row's segmentation and "
                                    "the original model's (same backend path); cases where neither has the "
                                    "structure are left out",
                "dice_vs_truth": "the same against the ground-truth labels",
            },
            "rows": [row.to_dict() for row in self.rows],
            "machine_load": _json_safe(self.machine_load),
        }


def format_sweep_table(report: SweepReport | Mapping[str, Any]) -> str:
    """Trade-off table (one row per factor) and the per-structure Dice vs the original."""
    data = report.to_dict() if isinstance(report, SweepReport) else report
    settings = data["settings"]
    batch = settings["latency_batch_sizes"][0]
    has_truth = any(r.get("dice_vs_truth") for r in data["rows"])

    def fmt(value: float | None, digits: int = 3) -> str:
        return f"{value:.{digits}f}" if value is not None else "-"

    lines = [
        f"rank-factor sweep of {data['model_dir']}",
        f"{settings['backend']} {settings['precision']} on {settings['device']}; TTA {settings['tta']}; "
        f"{len(data['cases'])} case(s); folds {', '.join(settings['folds'])}; latency: fold {settings['latency_fold']}, "
        f"median of {settings['repeats']}{' (rows interleaved)' if settings['interleaved'] else ''}",
        "",
    ]
    header = ["factor", "params", "MACs", "MACs bound", f"ms (b{batch})", "p10-p90", "speed-up", "e2e net",
              "Dice vs orig", "min struct"] + (["Dice vs GT"] if has_truth else [])
    rows = []
    for row in data["rows"]:
        stats = row["latency"][0]
        dice = [v for v in row["dice_vs_original"].values() if v is not None]
        cells = [
            row["label"], fmt(row["compute"].get("params_ratio")), fmt(row["compute"].get("macs_ratio")),
            fmt(row["speedup"].get("macs_bound"), 2) + "x", f"{1e3 * stats['median_s']:.1f}",
            f"{1e3 * stats['p10_s']:.0f}-{1e3 * stats['p90_s']:.0f}",
            fmt(row["speedup"].get(f"batch_{batch}"), 2) + "x", fmt(row["speedup"].get("end_to_end_network"), 2) + "x",
            fmt(row["mean_dice_vs_original"], 4), fmt(min(dice) if dice else None, 4),
        ]
        if has_truth:
            cells.append(fmt(row["mean_dice_vs_truth"], 4))
        rows.append(cells)
    lines.extend(_table(header, rows, "l" + "r" * (len(header) - 1)))
    lines.append("")
    lines.append("Dice vs the original, per structure (mean over cases):")
    structures = data["structures"]
    rows = [[row["label"], *(fmt(row["dice_vs_original"].get(s), 4) for s in structures)] for row in data["rows"]]
    lines.extend(_table(["factor", *structures], rows, "l" + "r" * len(structures)))
    if any(v is None for row in data["rows"] for v in row["dice_vs_original"].values()):
        lines.append("- : the structure is in neither segmentation of any case")
    if data.get("machine_load"):
        from tucker_export.validation.machine import describe_verdict

        lines.append(f"machine: {describe_verdict(data['machine_load'])}")
    return "\n".join(lines)


def plot_sweep(report: SweepReport | Mapping[str, Any], path: str | Path, *, title: str | None = None,
               dpi: int = 110) -> Path:
    """PNG of the trade-off: Dice vs the original per structure (and their mean) against the speed-up
    (left) and against the fraction of MACs kept (right), each point labelled with its rank factor.

    Drawn on a standalone Agg figure, so matplotlib's global backend and style stay untouched.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    data = report.to_dict() if isinstance(report, SweepReport) else report
    settings = data["settings"]
    batch = settings["latency_batch_sizes"][0]
    rows = data["rows"]
    labels = [r["label"] for r in rows]
    speedups = [r["speedup"].get(f"batch_{batch}") or math.nan for r in rows]
    macs = [r["compute"].get("macs_ratio") or math.nan for r in rows]
    structures = data["structures"]

    def series(name: str | None) -> list[float]:
        if name is None:
            return [r["mean_dice_vs_original"] if r["mean_dice_vs_original"] is not None else math.nan for r in rows]
        return [r["dice_vs_original"].get(name) if r["dice_vs_original"].get(name) is not None else math.nan
                for r in rows]

    figure = Figure(figsize=(12, 5), dpi=dpi, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 2, sharey=True)
    panels = ((axes[0], speedups, f"speed-up of one network call (batch {batch}, original latency / Tucker latency)"),
              (axes[1], macs, "MACs kept (Tucker / original)"))
    colors = [f"C{i % 10}" for i in range(len(structures))]
    for ax, xs, xlabel in panels:
        # The mean goes underneath (grey, wide) so that a structure lying on it stays visible.
        mean = series(None)
        ax.plot(xs, mean, marker="s", ms=7, lw=4, color="0.25", alpha=0.45, zorder=2, label="mean of structures")
        for name, color in zip(structures, colors):
            values = series(name)
            no_data = not any(math.isfinite(v) for v in values)
            ax.plot(xs, values, marker="o", ms=4, lw=1.3, color=color, zorder=3,
                    label=f"{name} (absent in every case)" if no_data else name)
        ax.plot(xs[:1], mean[:1], marker="*", ms=14, color="black", ls="none", zorder=4, label="original model")
        # rank-factor labels alternate above and below the mean so neighbouring points stay legible
        for index, (x, y, text) in enumerate(zip(xs, mean, labels)):
            if index == 0 or not (math.isfinite(x) and math.isfinite(y)):
                continue
            offset = (5, 7) if index % 2 else (5, -13)
            ax.annotate(text, (x, y), textcoords="offset points", xytext=offset, fontsize=8, zorder=5)
        ax.axhline(1.0, color="grey", lw=0.8, ls=":")
        ax.set_xlabel(xlabel)
        ax.grid(True, alpha=0.3)
    axes[1].invert_xaxis()  # more compression to the right in both panels
    axes[0].axvline(1.0, color="grey", lw=0.8, ls=":")
    axes[0].set_ylabel("Dice vs original model (mean over cases)")
    axes[1].legend(loc="lower left", fontsize=8, framealpha=0.9)
    model_name = Path(data["model_dir"]).name
    figure.suptitle(
        title or (
            f"Tucker rank-factor sweep, {model_name}\n{settings['backend']} {settings['precision']} on "
            f"{settings['device']}, TTA {settings['tta']}, {len(data['cases'])} case(s), "
            f"folds {', '.join(settings['folds'])}; point labels = rank factor"
        ),
        fontsize=10,
    )
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=dpi)
    return path


def write_sweep_outputs(report: SweepReport, out_dir: str | Path, name: str = "sweep",
                        *, title: str | None = None) -> tuple[Path, Path]:
    """``out_dir/<name>.json`` and ``out_dir/<name>.png``, each written atomically."""
    out_dir = Path(out_dir)
    json_path, png_path = out_dir / f"{name}.json", out_dir / f"{name}.png"
    write_json_atomic(json_path, report.to_dict())
    plot_sweep(report, png_path, title=title)
    return json_path, png_path
