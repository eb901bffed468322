"""Benchmark: per-patch latency of stock PyTorch vs ONNX Runtime CPU, original vs Tucker (rank factor 0.3).

    python bench/bench_engines.py [--patches 64 128] [--repeats 5 2] [--threads N] [--factor 0.3]
                                  [--no-variants] [--out bench/results/engines.json]

Results: bench/results/engines.json (2 threads, both patch sizes, session variants) and
bench/results/engines_threads1.json (1 thread, 64^3); each file holds the machine block and the
load verdict (quiet only when the load started <= 1 per core and others used <= 10 % of the CPU).

The network is what nnU-Net builds for TotalSegmentator's 3d_fullres plans: PlainConvUNet, 6 stages,
features 32-64-128-256-320-320, kernel 3, 2 convs per stage, 118 outputs, one input channel,
built by nnU-Net's ``get_network_from_plans`` (nnU-Net's ``InitWeights_He`` initialisation). Random
weights make accuracy meaningless here; only time and MACs are measured.

In one run, on one machine, for each patch size (batch 1):

- stock PyTorch, original network (eager, ``inference_mode``), the reference;
- PyTorch, Tucker network (for information);
- ONNX Runtime CPU, original network;
- ONNX Runtime CPU, Tucker network (``decompose_network`` at ``--rank-mode relative --rank-factor 0.3``,
  ranks rounded to 8, the default skip rules);

each timed as ``--warmup`` runs then the median of ``--repeats`` runs. PyTorch threads and ONNX
Runtime intra-op threads are both ``--threads`` (default: physical cores). Each speed ratio is
printed beside the MACs ratio (original MACs / Tucker MACs), the limit a perfectly efficient
runtime would reach, so the distance to the limit shows.

``--variants`` (on by default) also times the Tucker network in ONNX Runtime at the first patch
size under other session settings (graph optimisation level, execution mode, thread count, a
saved pre-optimised model), so the chosen defaults are measured, not assumed.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from tucker_export.benchmarks.networks import build_totalsegmentator_network
from tucker_export.benchmarks.paths import RESULTS
from tucker_export.runtimes import torch_callable

if TYPE_CHECKING:
    from tucker_export.exporter.ranks import RankPolicy


def timed(run: Callable[[], object], warmup: int, repeats: int) -> dict[str, float | list[float]]:
    for _ in range(warmup):
        run()
    times, cpu = [], []
    for _ in range(repeats):
        started, started_cpu = time.perf_counter(), time.process_time()
        run()
        times.append(time.perf_counter() - started)
        cpu.append(time.process_time() - started_cpu)
    # CPU seconds (all threads of this process) are a cross-check on a shared machine: other
    # processes stretch wall time but not the work done here.
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "runs_s": [round(t, 4) for t in times],
        "median_cpu_s": statistics.median(cpu),
    }


def ort_session(path: Path, *, threads: int, level: str = "all", sequential: bool = True, optimized_out: Path | None = None):
    """A session opened the way ``infer --backend ort`` opens one (``runtimes.ort_session``), with one setting varied."""
    from tucker_export.runtimes import ort_session as open_session
    from tucker_export.runtimes import ort_session_options

    options = ort_session_options(
        graph_optimization=level, threads=threads, sequential=sequential,
        inter_op_threads=None if sequential else threads, optimized_model_path=optimized_out,
    )
    return open_session(path, options=options)


def export(network: torch.nn.Module, patch: tuple[int, ...], path: Path, *, fuse: bool = True) -> None:
    from tucker_export.exporter.onnx_export import export_torch_to_onnx

    # trace at batch 1: the batch axis is symbolic either way and tracing at 128^3 is expensive
    model = export_torch_to_onnx(network, num_input_channels=1, patch_size=patch, trace_batch=1, fuse=fuse)
    path.write_bytes(model.SerializeToString())


@dataclass(frozen=True)
class BenchSetup:
    """Settings every measurement of one run shares, so that they stay side by side."""

    threads: int
    warmup: int
    workdir: Path


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patches", type=int, nargs="+", default=[64, 128], help="cubic patch edges")
    parser.add_argument("--repeats", type=int, nargs="+", default=[5, 2], help="timed runs per patch size (one value each)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch and ORT intra-op threads [physical cores]")
    parser.add_argument("--factor", type=float, default=0.3)
    parser.add_argument("--no-variants", dest="variants", action="store_false")
    parser.add_argument("--variant-repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "engines.json")
    return parser.parse_args()


def _decompose_tucker(
    original: torch.nn.Module, factor: float, first_edge: int, threads: int
) -> tuple[torch.nn.Module, RankPolicy]:
    """The Tucker copy of ``original`` and its rank policy, decomposed at the first patch size."""
    from tucker_export.exporter.decompose import decompose_network
    from tucker_export.exporter.ranks import RankPolicy

    tucker = copy.deepcopy(original)
    policy = RankPolicy(mode="relative", factor=factor)
    first_patch = (first_edge,) * 3
    started = time.perf_counter()
    decomposition = decompose_network(tucker, (1, *first_patch), policy)
    decompose_s = time.perf_counter() - started
    tucker.eval()
    print(
        f"Tucker factor {factor}: {decomposition.totals['factorized']}/{decomposition.totals['layers']} convs "
        f"factorized in {decompose_s:.1f} s; {threads} thread(s); load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    return tucker, policy


def _results_header(policy: RankPolicy, threads: int, warmup: int) -> dict[str, object]:
    from tucker_export.validation.machine import environment

    return {
        "environment": environment(),
        "network": "PlainConvUNet 6 stages 32-64-128-256-320-320, kernel 3, 2 convs/stage, 118 classes, nnU-Net init",
        "rank_policy": policy.to_manifest(),
        "threads": threads,
        "machine": {"platform": platform.platform(), "processor": platform.processor() or "unknown", "cpus": os.cpu_count()},
        "versions": {"torch": torch.__version__, "onnxruntime": __import__("onnxruntime").__version__, "python": sys.version.split()[0]},
        "load_average_at_start": os.getloadavg()[0],
        "warmup": warmup,
        "patches": {},
    }


def _torch_run(net: torch.nn.Module, x: torch.Tensor) -> Callable[[], object]:
    forward = torch_callable(net)
    return lambda: forward(x)


def _measure_patch(original: torch.nn.Module, tucker: torch.nn.Module, edge: int, n: int, setup: BenchSetup) -> dict:
    """Both networks in both runtimes at one patch size; leaves ``tucker_{edge}.onnx`` in the workdir."""
    from tucker_export.exporter.counting import count_network

    patch = (edge,) * 3
    macs_original = count_network(original, (1, *patch)).macs
    macs_tucker = count_network(tucker, (1, *patch)).macs
    x_np = np.random.default_rng(0).standard_normal((1, 1, *patch), dtype=np.float32)
    x = torch.from_numpy(x_np)

    entry: dict[str, object] = {"macs_original": macs_original, "macs_tucker": macs_tucker, "repeats": n}
    print(f"\n{edge}^3: MACs {macs_original / 1e9:.1f} G -> {macs_tucker / 1e9:.1f} G", flush=True)
    entry["torch_original"] = timed(_torch_run(original, x), setup.warmup, n)
    print(f"  torch original     {entry['torch_original']['median_s']:.3f} s", flush=True)
    entry["torch_tucker"] = timed(_torch_run(tucker, x), setup.warmup, n)
    print(f"  torch tucker       {entry['torch_tucker']['median_s']:.3f} s", flush=True)
    for name, net in (("original", original), ("tucker", tucker)):
        path = setup.workdir / f"{name}_{edge}.onnx"
        export(net, patch, path)
        session = ort_session(path, threads=setup.threads)
        out = session.run(None, {"input": x_np})[0]
        reference = torch_callable(net)(x).numpy()
        entry[f"ort_{name}"] = timed(lambda s=session, x_np=x_np: s.run(None, {"input": x_np}), setup.warmup, n)
        entry[f"ort_{name}"]["max_abs_diff_vs_torch"] = float(np.abs(out - reference).max())
        print(f"  ORT {name:<14} {entry[f'ort_{name}']['median_s']:.3f} s", flush=True)
        del session
    base = entry["torch_original"]["median_s"]
    entry["speedup_vs_torch_original"] = {
        key: base / entry[key]["median_s"] for key in ("torch_tucker", "ort_original", "ort_tucker")
    }
    entry["macs_ratio"] = macs_original / macs_tucker
    entry["ort_tucker_vs_ort_original"] = entry["ort_original"]["median_s"] / entry["ort_tucker"]["median_s"]
    return entry


def _measure_variants(tucker: torch.nn.Module, edge: int, variant_repeats: int, setup: BenchSetup) -> dict:
    """ORT session settings for the Tucker network at ``edge``^3, reusing the model ``_measure_patch`` exported."""
    threads, workdir = setup.threads, setup.workdir
    patch = (edge,) * 3
    path = workdir / f"tucker_{edge}.onnx"
    x_np = np.random.default_rng(0).standard_normal((1, 1, *patch), dtype=np.float32)
    variants = {
        "default: all, sequential, physical cores": {"level": "all", "sequential": True, "threads": threads},
        "level basic": {"level": "basic", "sequential": True, "threads": threads},
        "level extended": {"level": "extended", "sequential": True, "threads": threads},
        "parallel execution": {"level": "all", "sequential": False, "threads": threads},
        "1 thread": {"level": "all", "sequential": True, "threads": 1},
    }
    unfused = workdir / f"tucker_{edge}.unfused.onnx"
    export(tucker, patch, unfused, fuse=False)
    measured = {}
    print(f"\nONNX Runtime session variants, Tucker network, {edge}^3, {variant_repeats} runs each:", flush=True)
    for label, options in {**variants, "export without concat folding": {"level": "all", "sequential": True, "threads": threads}}.items():
        source = unfused if label.startswith("export without") else path
        session = ort_session(source, **options)
        measured[label] = timed(lambda s=session: s.run(None, {"input": x_np}), setup.warmup, variant_repeats)
        print(f"  {label:<42} {measured[label]['median_s']:.3f} s", flush=True)
        del session
    optimized = workdir / f"tucker_{edge}.ort-optimized.onnx"
    started = time.perf_counter()
    ort_session(path, threads=threads, optimized_out=optimized)
    load_plain = time.perf_counter() - started
    started = time.perf_counter()
    session = ort_session(optimized, threads=threads, level="none")
    load_optimized = time.perf_counter() - started
    measured["saved ORT-optimised model (level none at load)"] = timed(
        lambda s=session: s.run(None, {"input": x_np}), setup.warmup, variant_repeats
    )
    measured["saved ORT-optimised model (level none at load)"]["session_load_s"] = load_optimized
    measured["default: all, sequential, physical cores"]["session_load_s"] = load_plain
    print(
        f"  {'saved ORT-optimised model':<42} {measured['saved ORT-optimised model (level none at load)']['median_s']:.3f} s "
        f"(session load {load_optimized:.2f} s vs {load_plain:.2f} s)",
        flush=True,
    )
    return {"patch": f"{edge}^3", **measured}


def _print_tables(results: dict[str, object], rows: list[tuple[int, dict]]) -> None:
    print(
        f"\nLoad average {results['load_average_at_start']:.2f} at start, {results['load_average_at_end']:.2f} at end "
        f"({os.cpu_count()} CPUs; above that, other processes competed for the cores)."
    )
    print("Per-patch latency, batch 1, one run on this machine (median wall time):")
    print(
        f"{'patch':>6} {'torch orig':>11} {'ORT orig':>9} {'ORT tucker':>11} | {'ORT orig x':>10} {'ORT tucker x':>12} "
        f"{'tucker/orig in ORT':>18} {'MACs ratio':>10}"
    )
    for edge, e in rows:
        s = e["speedup_vs_torch_original"]
        print(
            f"{edge:>4}^3 {e['torch_original']['median_s']:>10.3f}s {e['ort_original']['median_s']:>8.3f}s "
            f"{e['ort_tucker']['median_s']:>10.3f}s | {s['ort_original']:>9.2f}x {s['ort_tucker']:>11.2f}x "
            f"{e['ort_tucker_vs_ort_original']:>17.2f}x {e['macs_ratio']:>9.2f}x"
        )
    print(
        "(x: speed-up over stock PyTorch with the original network; the MACs ratio (original / Tucker) is the "
        "limit of 'tucker/orig in ORT' for a runtime equally efficient on both graphs)"
    )
    print("Same ratios from CPU seconds of this process (less sensitive to other processes):")
    for edge, e in rows:
        base = e["torch_original"]["median_cpu_s"]
        print(
            f"{edge:>4}^3 ORT orig {base / e['ort_original']['median_cpu_s']:.2f}x, ORT tucker "
            f"{base / e['ort_tucker']['median_cpu_s']:.2f}x, tucker/orig in ORT "
            f"{e['ort_original']['median_cpu_s'] / e['ort_tucker']['median_cpu_s']:.2f}x (MACs {e['macs_ratio']:.2f}x)"
        )


def main() -> int:
    from tucker_export.runtimes import physical_cores

    args = _parse_args()
    repeats = dict(zip(args.patches, args.repeats + [args.repeats[-1]] * len(args.patches)))
    threads = args.threads or physical_cores()
    torch.set_num_threads(threads)

    original = build_totalsegmentator_network()
    tucker, policy = _decompose_tucker(original, args.factor, args.patches[0], threads)

    from tucker_export.validation.machine import MachineWatch, write_benchmark_json

    watch = MachineWatch()
    results = _results_header(policy, threads, args.warmup)
    setup = BenchSetup(threads=threads, warmup=args.warmup, workdir=Path(tempfile.mkdtemp(prefix="bench-engines-")))
    rows = []
    for edge in args.patches:
        entry = _measure_patch(original, tucker, edge, repeats[edge], setup)
        results["patches"][f"{edge}^3"] = entry
        rows.append((edge, entry))

    if args.variants:
        results["ort_variants_tucker"] = _measure_variants(tucker, args.patches[0], args.variant_repeats, setup)

    results["load_average_at_end"] = os.getloadavg()[0]
    _print_tables(results, rows)
    print("\n" + write_benchmark_json(args.out, results, watch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
