"""End-to-end benchmark: stock `nnUNetv2_predict` vs `tucker-export infer` variants, as command-line processes.

    python bench/bench_infer.py                          # the real CT crop (if ../shared has it), else demo cases
    python bench/bench_infer.py --inputs ct_sm ct_full   # also the full 112-slice CT
    python bench/bench_infer.py --inputs demo --cases 4 --repeats 2 --disable-tta

Every variant segments the same cases with the demo model, fold 0, the same step size and
mirroring (on unless --disable-tta), as a separate process, as a user runs it, so wall times
include start-up; `infer` variants also report preprocess / network / export from `--report`, and
start-up is the rest. Peak RSS is each process's own (``os.wait4``).

Variants: stock nnU-Net (the reference of every ratio); `infer -m` (the untouched model) on ONNX
Runtime fp32 and on `auto` (OpenVINO at its gated precision on this CPU), at the default batch
(`auto`: the mirror variants of a tile in one call), at batch 1, and with `--sequential` (no
overlap of the next case's preprocessing and the last one's export with the network), and with
`--sequential --stock-export` too (stock's scipy export: what `infer` did before either); `infer -b` with a Tucker
bundle (``--rank-factor``) on ONNX Runtime and on `auto`.

Before timing, every variant runs once untimed on one small demo case: that builds the cached
undecomposed bundle, compiles and gates the OpenVINO models (once per CPU kind, as a user's first
run does), and warms the file cache. Timed runs are interleaved round-robin over ``--repeats``
rounds (order rotated each round); the median per variant is reported. Each segmentation is
compared with stock's, class by class (Dice). The load average at start and end is recorded and the
run is labelled quiet only when the load started at <= 1 per core and other processes used <= 10 % of the
CPU while it ran.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tucker_export.benchmarks.paths import RESULTS, SHARED

BIN = Path(sys.executable).parent


def _run(cmd: list[str], env: dict[str, str]) -> tuple[float, int, str]:
    """Wall seconds, the process's own peak RSS in bytes, and what it printed."""
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as stdout_file, tempfile.TemporaryFile("w+") as stderr_file:
        process = subprocess.Popen(cmd, env=env, stdout=stdout_file, stderr=stderr_file, text=True)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
        stdout_file.seek(0)
        stderr_file.seek(0)
        stdout, stderr = stdout_file.read(), stderr_file.read()
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"command failed ({process.returncode}): {' '.join(cmd)}\n{stderr[-3000:]}")
    return seconds, int(usage.ru_maxrss) * 1024, stdout


# Stock nnU-Net in one process with its own clock: start-up (interpreter, imports, model load) is
# the process's wall time minus the time inside ``predict_from_files``, as `nnUNetv2_predict` calls it.
_STOCK_IN_PROCESS = """
import json, sys, time
import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
model_dir, folder, out, tta = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
predictor = nnUNetPredictor(tile_step_size=0.5, use_mirroring=tta, device=torch.device("cpu"), allow_tqdm=False)
predictor.initialize_from_trained_model_folder(model_dir, use_folds=(0,))
started = time.perf_counter()
predictor.predict_from_files(folder, out, save_probabilities=False, overwrite=True,
                             num_processes_preprocessing=3, num_processes_segmentation_export=3)
print(json.dumps({"cases_wall_s": time.perf_counter() - started}))
"""


def _report_path(out: Path) -> Path:
    """``out`` + ``.json`` (not ``with_suffix``: ``tucker0.3`` would lose its ``.3``)."""
    return out.parent / f"{out.name}.json"


def _stages(report_path: Path) -> dict[str, float]:
    cases = json.loads(report_path.read_text())["cases"]
    return {k: round(sum(c["seconds"].get(k, 0.0) for c in cases), 3) for k in ("check", "read", "preprocess", "network", "export")}


def _dice_per_class(reference_dir: Path, candidate_dir: Path) -> dict[str, float]:
    from tucker_export.validation.metrics import label_dice, read_label_map

    per_class: dict[int, list[float]] = {}
    for ref_path in sorted(reference_dir.glob("*.nii.gz")):
        ref = read_label_map(ref_path)
        cand = read_label_map(candidate_dir / ref_path.name)
        labels = sorted((set(np.unique(ref).tolist()) | set(np.unique(cand).tolist())) - {0})
        for label, score in label_dice(cand, ref, labels).items():
            per_class.setdefault(label, []).append(score)
    return {str(k): round(float(np.mean(v)), 4) for k, v in sorted(per_class.items())}


def _prepare_bundle(model, work: Path, rank_factor: float) -> Path:
    from tucker_export.exporter.ranks import RankPolicy
    from tucker_export.pipeline import prepare_bundle

    prepared = prepare_bundle(model.model_dir, work / "bundle-tucker", policy=RankPolicy(mode="relative", factor=rank_factor),
                              folds=[0], precisions=("fp32",))
    return prepared.bundle.path


def _input_sets(model, work: Path, names: list[str], n_cases: int) -> dict[str, Path]:
    sources = {"ct_sm": SHARED / "example_ct_sm.nii.gz", "ct_full": SHARED / "example_ct.nii.gz",
               "ct_sm_x3": SHARED / "example_ct_sm.nii.gz"}
    sets = {}
    for name in names:
        folder = work / f"input-{name}"
        if name == "ct_sm_x3" and sources[name].is_file():  # several cases: what overlapping the stages is for
            folder.mkdir()
            for index in range(3):
                shutil.copy(sources[name], folder / f"ct_sm_copy{index}_0000.nii.gz")
        elif name == "demo":
            folder.mkdir()
            for path in sorted(model.test_images_dir.glob("*_0000.nii.gz"))[:n_cases]:
                shutil.copy(path, folder / path.name)
        elif sources[name].is_file():
            folder.mkdir()
            shutil.copy(sources[name], folder / f"{sources[name].name[:-7]}_0000.nii.gz")
        else:
            print(f"skipping {name}: {sources[name]} not found", flush=True)
            continue
        sets[name] = folder
    return sets


@dataclass(frozen=True)
class Variants:
    """The variants under test and how each one's command line is completed for an input folder."""

    argv: dict[str, list[str]]
    disable_tta: bool

    def command(self, name: str, folder: Path, out: Path) -> list[str]:
        if name == "stock in-process":
            return [*self.argv[name], str(folder), str(out), "0" if self.disable_tta else "1"]
        if name.startswith("stock"):
            return [*self.argv[name], "-i", str(folder), "-o", str(out)]
        tta_ours = ["--disable-tta"] if self.disable_tta else []
        return [str(BIN / "tucker-export"), "-q", "infer", "-i", str(folder), "-o", str(out), *self.argv[name], "-f", "0",
                "--report", str(_report_path(out)), "--overwrite", *tta_ours]


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", nargs="+", choices=["ct_sm", "ct_full", "ct_sm_x3", "demo"], default=None,
                        help="input sets [default: ct_sm where ../shared has it, else demo]; ct_sm_x3 is three "
                             "copies of the crop as three cases")
    parser.add_argument("--variants", nargs="+", default=None,
                        help="only these variants (names as printed; stock is always included)")
    parser.add_argument("--cases", type=int, default=4, help="demo held-out cases in the demo input set")
    parser.add_argument("--repeats", type=int, default=1, help="timed rounds (interleaved); the median is reported")
    parser.add_argument("--rank-factor", type=float, default=0.3)
    parser.add_argument("--disable-tta", action="store_true", help="every variant without mirroring")
    parser.add_argument("--out", type=Path, default=RESULTS / "infer.json")
    return parser.parse_args()


def _variants(model, tucker: Path, args: argparse.Namespace) -> Variants:
    tta_stock = ["--disable_tta"] if args.disable_tta else []
    variants: dict[str, list[str]] = {
        "stock nnUNetv2_predict": [str(BIN / "nnUNetv2_predict"), "-d", model.dataset_name, "-tr", model.trainer_name,
                                   "-p", model.plans_name, "-c", model.configuration, "-f", "0", "-device", "cpu",
                                   "--disable_progress_bar", *tta_stock],
        "infer -m ort fp32": ["-m", str(model.model_dir), "--backend", "ort", "--precision", "fp32"],
        "infer -m auto": ["-m", str(model.model_dir)],
        "infer -m auto b1": ["-m", str(model.model_dir), "--batch-size", "1"],
        "infer -m auto sequential": ["-m", str(model.model_dir), "--sequential"],
        "infer -m auto sequential stock-export": ["-m", str(model.model_dir), "--sequential", "--stock-export"],
        f"infer -b tucker{args.rank_factor} ort fp32": ["-b", str(tucker), "--backend", "ort", "--precision", "fp32"],
        f"infer -b tucker{args.rank_factor} auto": ["-b", str(tucker)],
        "stock in-process": [sys.executable, "-c", _STOCK_IN_PROCESS, str(model.model_dir)],
    }

    if args.variants:
        unknown = sorted(set(args.variants) - set(variants))
        if unknown:
            raise SystemExit(f"unknown variants {unknown}; choose from {sorted(variants)}")
        variants = {k: v for k, v in variants.items() if k.startswith("stock") or k in args.variants}
    return Variants(argv=variants, disable_tta=args.disable_tta)


def _run_row(name: str, seconds: float, peak: int, stdout: str, out: Path) -> dict[str, object]:
    row: dict[str, object] = {"wall_s": round(seconds, 2), "peak_rss_mb": round(peak / 1e6)}
    if name == "stock in-process":
        cases_wall = json.loads(stdout.strip().splitlines()[-1])["cases_wall_s"]
        row["cases_wall_s"] = round(cases_wall, 2)
        row["startup_and_rest_s"] = round(seconds - cases_wall, 2)
    if not name.startswith("stock"):
        stages = _stages(_report_path(out))
        row.update(stages)
        cases_wall = json.loads(_report_path(out).read_text()).get("cases_wall_s") or sum(stages.values())
        row["cases_wall_s"] = round(cases_wall, 2)
        row["startup_and_rest_s"] = round(seconds - cases_wall, 2)
        # the share of the cases' wall time in which the network was not running
        row["outside_network_share"] = round(1 - stages["network"] / cases_wall, 3) if cases_wall else None
    return row


def _time_set(variants: Variants, set_name: str, folder: Path, work: Path, env: dict[str, str],
              repeats: int) -> dict[str, list[dict[str, float]]]:
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in variants.argv}
    order = list(variants.argv)
    for round_index in range(repeats):
        rotated = order[round_index % len(order):] + order[:round_index % len(order)]
        for name in rotated:
            out = work / f"out-{set_name}" / name.replace(" ", "_")
            seconds, peak, stdout = _run(variants.command(name, folder, out), env)
            runs[name].append(_run_row(name, seconds, peak, stdout, out))  # type: ignore[arg-type]
            print(f"[{set_name}] round {round_index + 1} {name}: {seconds:.1f} s", flush=True)
    return runs


def _median_table(runs: dict[str, list[dict[str, float]]], set_name: str, work: Path) -> dict[str, dict]:
    stock_out = work / f"out-{set_name}" / "stock_nnUNetv2_predict"
    stock_wall = float(np.median([r["wall_s"] for r in runs["stock nnUNetv2_predict"]]))
    table = {}
    for name, rows in runs.items():
        median = {k: float(np.median([r[k] for r in rows])) for k in rows[0]}
        median["speedup_vs_stock"] = round(stock_wall / median["wall_s"], 2)
        if not name.startswith("stock"):
            dice = _dice_per_class(stock_out, work / f"out-{set_name}" / name.replace(" ", "_"))
            median["dice_vs_stock_min"] = min(dice.values()) if dice else None
            median["dice_vs_stock"] = dice  # type: ignore[assignment]
            backend = json.loads(_report_path(work / f"out-{set_name}" / name.replace(" ", "_")).read_text())
            median["engine"] = f"{backend.get('backend')} {backend.get('precision')}"  # type: ignore[assignment]
        table[name] = {"median": median, "runs": rows}
    return table


def _print_tables(results: dict[str, object], disable_tta: bool, repeats: int) -> None:
    print()
    for set_name, table in results["sets"].items():  # type: ignore[union-attr]
        print(f"== {set_name} ({'no TTA' if disable_tta else 'mirroring TTA'}, fold 0, median of {repeats}) ==")
        print(f"{'variant':<30}{'engine':>15}{'wall s':>8}{'vs stock':>10}{'min Dice':>10}{'RSS MB':>8}   "
              "read / preprocess / network / export / start-up s")
        for name, entry in table.items():
            m = entry["median"]
            split = (" / ".join(f"{m[k]:.1f}" for k in ("read", "preprocess", "network", "export", "startup_and_rest_s"))
                     if "network" in m else (f"in predict_from_files {m['cases_wall_s']:.1f}, start-up "
                                             f"{m['startup_and_rest_s']:.1f}" if "cases_wall_s" in m else "-"))
            dice = f"{m['dice_vs_stock_min']:.3f}" if m.get("dice_vs_stock_min") is not None else "-"
            print(f"{name:<30}{m.get('engine', 'nnU-Net torch'):>15}{m['wall_s']:>8.1f}{m['speedup_vs_stock']:>9.2f}x"
                  f"{dice:>10}{m['peak_rss_mb']:>8.0f}   {split}")


def main() -> int:
    from tucker_export.validation.machine import MachineWatch, environment, write_benchmark_json

    args = _parse_args()
    names = args.inputs or (["ct_sm"] if (SHARED / "example_ct_sm.nii.gz").is_file() else ["demo"])

    from tucker_export.demo import ensure_demo_model

    watch = MachineWatch()
    model = ensure_demo_model()
    work = Path(tempfile.mkdtemp(prefix="bench-infer-"))
    tucker = _prepare_bundle(model, work, args.rank_factor)
    inputs = _input_sets(model, work, names, args.cases)
    warm = work / "input-warmup"
    warm.mkdir()
    shutil.copy(sorted(model.test_images_dir.glob("*_0000.nii.gz"))[0], warm)

    env = dict(os.environ, nnUNet_results=str(model.results_dir), nnUNet_extTrainer=str(model.trainer_search_path),
               nnUNet_raw=str(work), nnUNet_preprocessed=str(work))
    variants = _variants(model, tucker, args)

    print("warm-up (untimed): one demo case per variant", flush=True)
    for name in variants.argv:
        _run(variants.command(name, warm, work / "out-warmup" / name.replace(" ", "_")), env)

    results: dict[str, object] = {
        "settings": {"rank_factor": args.rank_factor, "folds": [0], "tta": not args.disable_tta,
                     "repeats": args.repeats, "inputs": list(inputs)},
        "environment": environment(),
        "sets": {},
    }
    for set_name, folder in inputs.items():
        runs = _time_set(variants, set_name, folder, work, env, args.repeats)
        results["sets"][set_name] = _median_table(runs, set_name, work)  # type: ignore[index]
        write_benchmark_json(args.out, results, watch)  # after each set: a stopped run keeps what it measured

    _print_tables(results, args.disable_tta, args.repeats)
    print("\n" + write_benchmark_json(args.out, results, watch))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
