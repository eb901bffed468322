"""What the input integrity checks cost: check time against `infer`'s time on the real CT.

    python bench/bench_checks.py                 # example_ct_sm and example_ct from ../shared
    python bench/bench_checks.py --repeats 5

For each CT file: the checks alone (``check_case`` on the file, then the NaN scan of the voxels,
as `infer` runs them), median of ``--repeats``; nnU-Net's own read of the same file for scale; and
one `tucker-export infer -m DEMO_MODEL -f 0` process with mirroring, whose ``--report`` gives the
check's share of the case's time (check / (check + preprocess + network + export)) and of the
process's wall time. Writes JSON with the machine block and the load verdict.
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

import numpy as np

from tucker_export.benchmarks.paths import RESULTS, SHARED

BIN = Path(sys.executable).parent


def _median_seconds(action, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def main() -> int:
    from tucker_export.demo import ensure_demo_model
    from tucker_export.integrity.checks import ModelNeeds, check_case
    from tucker_export.integrity.volume import nonfinite_problems
    from tucker_export.nnunet.cases import discover_cases
    from tucker_export.validation.machine import MachineWatch, write_benchmark_json

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS / "checks.json")
    args = parser.parse_args()
    sources = [p for p in (SHARED / "example_ct_sm.nii.gz", SHARED / "example_ct.nii.gz") if p.is_file()]
    if not sources:
        raise SystemExit(f"the real CT is not at {SHARED}; this benchmark needs it")

    watch = MachineWatch()
    model = ensure_demo_model()
    from tucker_export.nnunet.loading import load_model_spec

    spec = load_model_spec(model.model_dir)
    needs = ModelNeeds.from_spec(spec)
    reader = spec.plans_manager.image_reader_writer_class()
    work = Path(tempfile.mkdtemp(prefix="bench-checks-"))
    rows = {}
    for source in sources:
        folder = work / source.name[:-7]
        folder.mkdir()
        shutil.copy(source, folder / source.name)
        (case,) = discover_cases(folder, num_channels=1)
        data, _ = reader.read_images([str(case.files[0])])
        checks_s = _median_seconds(lambda case=case: check_case(case, needs), args.repeats) + _median_seconds(
            lambda data=data, case=case: nonfinite_problems(data, case.files), args.repeats)
        read_s = _median_seconds(lambda case=case: reader.read_images([str(case.files[0])]), args.repeats)
        report_path = work / f"{folder.name}.json"
        started = time.perf_counter()
        subprocess.run([str(BIN / "tucker-export"), "-q", "infer", "-i", str(folder), "-o", str(work / f"out-{folder.name}"),
                        "-m", str(model.model_dir), "-f", "0", "--report", str(report_path)], check=True,
                       env=dict(os.environ))
        wall = time.perf_counter() - started
        seconds = json.loads(report_path.read_text())["cases"][0]["seconds"]
        case_total = sum(seconds.values())
        rows[source.name] = {
            "size_bytes": source.stat().st_size,
            "checks_alone_s": round(checks_s, 4),
            "nnunet_read_s": round(read_s, 4),
            "infer_stages_s": {k: round(v, 3) for k, v in seconds.items()},
            "infer_wall_s": round(wall, 2),
            "check_share_of_case": round(seconds["check"] / case_total, 4),
            "check_share_of_wall": round(seconds["check"] / wall, 4),
        }
        print(f"{source.name}: checks {checks_s * 1000:.0f} ms alone (nnU-Net's read {read_s * 1000:.0f} ms); in infer "
              f"{seconds['check'] * 1000:.0f} ms of a {case_total:.1f} s case ({100 * rows[source.name]['check_share_of_case']:.2f} %)"
              f", {wall:.1f} s wall", flush=True)
    results = {"engine": "infer -m DEMO -f 0 (auto, mirroring on)", "files": rows}
    print(write_benchmark_json(args.out, results, watch))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
