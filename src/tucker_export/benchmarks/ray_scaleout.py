"""`infer --ray` against serial `infer` on 8 demo cases: what scale-out costs and buys on one machine.

    python bench/bench_ray.py                  # 8 phantom cases, 3 rounds, bench/results/ray_scaleout.json
    python bench/bench_ray.py --cases 8 --rounds 3 --backend ort --precision fp32

Three ways of running the same `tucker-export infer` command on the same bundle (the demo model,
Tucker rank factor 0.3, both folds, ONNX Runtime fp32 unless told), each a fresh process as users
run it, interleaved round by round so load drifts hit all of them alike:

- serial: ``--threads 2`` (one process, both cores, reading and export overlapped with the network);
- ray 1x2: ``--ray --workers 1 --cpus-per-worker 2`` (a local Ray, one actor with both cores);
- ray 2x1: ``--ray --workers 2 --cpus-per-worker 1`` (two actors, one core each, a case each).

Per mode: the command's wall time (median over rounds), and from its ``--report`` the time spent on
cases, Ray's own start-up (``ray.init``) and the workers' start-up (actor processes importing
torch/nnU-Net and opening their engines). Ratios are serial wall / mode wall. All modes' outputs
are compared voxel for voxel with serial's. Writes JSON with the machine block and load verdict.
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
from pathlib import Path
from typing import Any

import numpy as np

from tucker_export.benchmarks.paths import RESULTS

BIN = Path(sys.executable).parent
MODES: dict[str, list[str]] = {
    "serial": ["--threads", "2"],
    "ray_1x2": ["--ray", "--workers", "1", "--cpus-per-worker", "2"],
    "ray_2x1": ["--ray", "--workers", "2", "--cpus-per-worker", "1"],
}


def _make_cases(folder: Path, count: int) -> None:
    from tucker_export.demo.phantom import generate_phantom, write_case

    folder.mkdir(parents=True)
    for index in range(count):
        write_case(generate_phantom(5000 + index, anisotropic=False), folder / f"bench_{index:03d}_0000.nii.gz")


def _make_bundle(work: Path, model_dir: Path) -> Path:
    from tucker_export.exporter.ranks import RankPolicy
    from tucker_export.pipeline import prepare_bundle

    return prepare_bundle(model_dir, work / "bundle", policy=RankPolicy(factor=0.3), precisions=("fp32",)).bundle.path


def _run_mode(mode: str, scans: Path, out: Path, bundle: Path, backend: str, precision: str) -> dict[str, Any]:
    report_path = out.with_suffix(".json")
    command = [str(BIN / "tucker-export"), "-q", "infer", "-i", str(scans), "-o", str(out), "-b", str(bundle),
               "--backend", backend, "--precision", precision, "--report", str(report_path), *MODES[mode]]
    started = time.perf_counter()
    subprocess.run(command, check=True, env=dict(os.environ), stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    report = json.loads(report_path.read_text())
    ray = report.get("ray") or {}
    return {"wall_s": round(wall, 2), "cases_wall_s": report.get("cases_wall_s"),
            "ray_start_s": ray.get("start_s"), "workers_start_s": ray.get("workers_start_s"),
            "done": sum(c["status"] == "done" for c in report["cases"]),
            "workers": sorted({c.get("worker") for c in report["cases"] if c.get("worker")})}


def _voxels(folder: Path) -> dict[str, np.ndarray]:
    from tucker_export.validation.metrics import read_label_map

    return {p.name: read_label_map(p) for p in sorted(folder.glob("*.nii.gz"))}


def main() -> int:
    from tucker_export.demo import ensure_demo_model
    from tucker_export.validation.machine import MachineWatch, write_benchmark_json

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backend", default="ort")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--out", type=Path, default=RESULTS / "ray_scaleout.json")
    args = parser.parse_args()

    model = ensure_demo_model()
    work = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    scans = work / "scans"
    _make_cases(scans, args.cases)
    bundle = _make_bundle(work, model.model_dir)
    watch = MachineWatch(count_descendants=True)  # set-up above is not part of the measurement
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    for round_index in range(args.rounds):
        for mode in MODES:
            out = work / f"out-{mode}-{round_index}"
            runs[mode].append(_run_mode(mode, scans, out, bundle, args.backend, args.precision))
            print(f"round {round_index + 1}/{args.rounds} {mode}: {runs[mode][-1]['wall_s']:.1f} s", flush=True)
    reference = _voxels(work / "out-serial-0")
    identical = {mode: all(np.array_equal(reference[name], voxels) for name, voxels in
                           _voxels(work / f"out-{mode}-0").items()) and len(reference) == args.cases for mode in MODES}

    def median(mode: str, field: str) -> float | None:
        values = [r[field] for r in runs[mode] if r[field] is not None]
        return round(float(np.median(values)), 2) if values else None

    summary = {mode: {field: median(mode, field) for field in ("wall_s", "cases_wall_s", "ray_start_s", "workers_start_s")}
               for mode in MODES}
    serial_wall = summary["serial"]["wall_s"]
    for mode, row in summary.items():
        row["speedup_vs_serial"] = round(serial_wall / row["wall_s"], 3) if row["wall_s"] else None
        row["outputs_identical_to_serial"] = identical[mode]
        print(f"{mode:8s} wall {row['wall_s']:6.1f} s ({row['speedup_vs_serial']:.2f}x serial), cases "
              f"{row['cases_wall_s']} s, Ray start {row['ray_start_s']} s, workers start {row['workers_start_s']} s, "
              f"outputs identical: {identical[mode]}", flush=True)
    results = {"cases": args.cases, "rounds": args.rounds, "backend": args.backend, "precision": args.precision,
               "bundle": "demo model, Tucker rank factor 0.3, folds 0 and 1", "modes": {m: " ".join(a) for m, a in MODES.items()},
               "summary": summary, "runs": runs,
               "load_rule_note": "Ray's daemons and actors are counted as the benchmark's own CPU (sampled from /proc)"}
    print(write_benchmark_json(args.out, results, watch))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
