"""End-to-end inference benchmark: stock `nnUNetv2_predict` vs `tucker-export infer`, one run, one machine.

Every variant segments the same cases with the same settings (folds, step size, mirroring) and is
run as a command-line process, as a user runs it, so the wall times include start-up. `infer`
variants also report where the time goes (preprocessing, network, export) from `--report`.

Variants: stock nnU-Net; infer with the original model and with Tucker rank factor 0.3, each in
PyTorch and in ONNX Runtime, at batch 1 and 4. Ratios are speed-ups over stock.

    python bench/bench_infer.py                       # demo held-out cases + the real CT if present
    python bench/bench_infer.py --cases 3 --no-real-ct
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REAL_CT = REPO.parent / "shared" / "data" / "totalsegmentator-example" / "example_ct.nii.gz"
BIN = Path(sys.executable).parent


def _run(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    completed = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if completed.returncode != 0:
        raise SystemExit(f"command failed ({completed.returncode}): {' '.join(cmd)}\n{completed.stderr[-3000:]}")
    return seconds


def _stage_totals(report_path: Path) -> dict[str, float]:
    cases = json.loads(report_path.read_text())["cases"]
    return {k: round(sum(c["seconds"].get(k, 0.0) for c in cases), 3) for k in ("preprocess", "network", "export")}


def _prepare(model, work: Path, rank_factor: float) -> dict[str, Path]:
    """Bundles (original = rank mode none, and Tucker) exported to ONNX fp32, made before any timing."""
    from tucker_export.exporter.decompose import decompose_model
    from tucker_export.exporter.onnx_export import export_bundle
    from tucker_export.exporter.ranks import RankPolicy

    bundles = {}
    for name, policy in (("original", RankPolicy(mode="none")),
                         ("tucker", RankPolicy(mode="relative", factor=rank_factor))):
        bundle = decompose_model(model.model_dir, work / f"bundle-{name}", policy=policy, overwrite=True,
                                 progress=False, folds=[0])
        export_bundle(bundle, precisions=("fp32",), progress=False)
        bundles[name] = bundle.path
    return bundles


def _input_sets(model, work: Path, n_cases: int, real_ct: bool) -> dict[str, Path]:
    sets = {}
    if n_cases > 0:
        demo = work / "input-demo"
        demo.mkdir()
        for path in sorted(model.test_images_dir.glob("*_0000.nii.gz"))[:n_cases]:
            shutil.copy(path, demo / path.name)
        sets["demo"] = demo
    if real_ct and REAL_CT.is_file():
        real = work / "input-real-ct"
        real.mkdir()
        shutil.copy(REAL_CT, real / "example_ct_0000.nii.gz")
        sets["real_ct"] = real
    return sets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=4, help="demo held-out cases to segment")
    parser.add_argument("--no-real-ct", action="store_true", help="skip ../shared's example_ct.nii.gz")
    parser.add_argument("--no-demo", action="store_true", help="only the real CT")
    parser.add_argument("--rank-factor", type=float, default=0.3)
    parser.add_argument("--disable-tta", action="store_true", help="both sides without mirroring")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "infer.json")
    args = parser.parse_args()

    from tucker_export.demo import ensure_demo_model

    model = ensure_demo_model(progress=False)
    work = Path(tempfile.mkdtemp(prefix="bench-infer-"))
    bundles = _prepare(model, work, args.rank_factor)
    inputs = _input_sets(model, work, 0 if args.no_demo else args.cases, not args.no_real_ct)

    env = dict(os.environ, nnUNet_results=str(model.results_dir), nnUNet_extTrainer=str(model.trainer_search_path),
               nnUNet_raw=str(work), nnUNet_preprocessed=str(work))
    tta = ["--disable_tta"] if args.disable_tta else []
    our_tta = ["--disable-tta"] if args.disable_tta else []
    results: dict[str, dict] = {}
    for set_name, folder in inputs.items():
        rows: dict[str, dict] = {}
        out = work / f"out-{set_name}-stock"
        seconds = _run([str(BIN / "nnUNetv2_predict"), "-i", str(folder), "-o", str(out), "-d", model.dataset_name,
                        "-tr", model.trainer_name, "-p", model.plans_name, "-c", model.configuration, "-f", "0",
                        "-device", "cpu", *tta], env)
        rows["stock nnUNetv2_predict"] = {"seconds": round(seconds, 2)}
        print(f"[{set_name}] stock nnUNetv2_predict: {seconds:.1f} s", flush=True)
        variants = [
            ("infer original torch b1", ["-m", str(model.model_dir), "--backend", "torch"], 1),
            ("infer original ort b1", ["-b", str(bundles["original"]), "--backend", "ort"], 1),
            ("infer tucker torch b1", ["-b", str(bundles["tucker"]), "--backend", "torch"], 1),
            ("infer tucker ort b1", ["-b", str(bundles["tucker"]), "--backend", "ort"], 1),
            ("infer tucker ort b4", ["-b", str(bundles["tucker"]), "--backend", "ort"], 4),
            ("infer original ort b4", ["-b", str(bundles["original"]), "--backend", "ort"], 4),
        ]
        for name, source, batch in variants:
            out = work / f"out-{set_name}-{name.replace(' ', '-')}"
            report = out.with_suffix(".json")
            seconds = _run([str(BIN / "tucker-export"), "-q", "infer", "-i", str(folder), "-o", str(out), *source,
                            "-f", "0", "--batch-size", str(batch), "--report", str(report), *our_tta], env)
            rows[name] = {"seconds": round(seconds, 2), "stages": _stage_totals(report)}
            print(f"[{set_name}] {name}: {seconds:.1f} s {rows[name]['stages']}", flush=True)
        stock = rows["stock nnUNetv2_predict"]["seconds"]
        for row in rows.values():
            row["speedup_vs_stock"] = round(stock / row["seconds"], 2)
        results[set_name] = rows
        _write(args, results)  # after each input set, so a stopped run keeps what it measured

    print()
    for set_name, rows in results.items():
        print(f"== {set_name} ({'no TTA' if args.disable_tta else 'mirroring TTA'}, fold 0) ==")
        print(f"{'variant':<26}{'wall s':>9}{'vs stock':>10}   preprocess / network / export s")
        for name, row in rows.items():
            stages = row.get("stages")
            split = " / ".join(f"{stages[k]:.1f}" for k in ("preprocess", "network", "export")) if stages else "-"
            print(f"{name:<26}{row['seconds']:>9.1f}{row['speedup_vs_stock']:>9.2f}x   {split}")
    print(f"\nwrote {args.out}")
    shutil.rmtree(work, ignore_errors=True)


def _write(args: argparse.Namespace, results: dict) -> None:
    payload = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_average": os.getloadavg()},
        "settings": {"rank_factor": args.rank_factor, "folds": [0], "tta": not args.disable_tta,
                     "demo_cases": args.cases},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
