"""Benchmark: decomposing a TotalSegmentator-size nnU-Net at rank factor 0.3.

    python bench/bench_decompose.py [--out bench/results/decompose.json] [--baseline subset|full|skip]
                                    [--extra-policies] [--verify-real-count]

The network is what nnU-Net builds for TotalSegmentator's 3d_fullres plans: PlainConvUNet,
6 stages, features 32-64-128-256-320-320, kernel 3, 2 convs per stage in encoder and decoder,
118 outputs, one input channel, built by nnU-Net's own ``get_network_from_plans`` (so weights are
nnU-Net's ``InitWeights_He`` initialisation; random weights are full rank, so only time and
counts mean something here, not reconstruction errors).

Measured:

- wall time of ``decompose_network`` (counting before and after, mode spectra, factorization,
  module replacement) at ``--rank-mode relative --rank-factor 0.3`` (default ``--round-to 8``);
  first run, median and minimum of ``--repeats`` runs on fresh copies (other processes sharing the
  two cores make single runs vary several-fold; the load average is recorded with the results);
- the baseline of tucker-cnn's method: ``tensorly.decomposition.partial_tucker`` (numpy backend,
  ``init='svd'``, default HOOI iterations and tolerance) per layer with the same ranks. With
  ``--baseline subset`` it runs layer by layer until ``--baseline-budget-s`` is used up and
  extrapolates the rest by each layer's measured cost per kernel element; the output says which;
- parameters and MACs before and after, counted by running the network at 1x128x128x128 with
  forward hooks on every convolution (on PyTorch's meta device: exact shapes, no arithmetic).
  ``--verify-real-count`` additionally runs the real network at 64^3 on the CPU and checks that
  the hook counts equal the meta pass at that size.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tucker_export.benchmarks.networks import ARCH_KWARGS, NUM_CLASSES, build_totalsegmentator_network

if TYPE_CHECKING:
    from tucker_export.exporter.ranks import RankPolicy

PATCH = (128, 128, 128)


def time_ours(network: torch.nn.Module, policy, repeats: int, threads: int | None = 1) -> tuple[list[float], object]:
    from tucker_export.exporter.decompose import decompose_network

    times, result = [], None
    for _ in range(repeats):
        net = copy.deepcopy(network)
        started = time.perf_counter()
        result = decompose_network(net, (1, *PATCH), policy, threads=threads)
        times.append(time.perf_counter() - started)
    return times, result


def time_tensorly_baseline(network: torch.nn.Module, layers: list[dict], mode: str, budget_s: float) -> dict:
    """tucker-cnn's factorization: tensorly partial_tucker with HOOI, numpy backend, per layer."""
    import tensorly as tl
    from tensorly.decomposition import partial_tucker

    from tucker_export.exporter.tucker import canonical_kernel

    todo = [e for e in layers if e["action"] == "factorized"]
    measured: list[tuple[dict, float, int]] = []
    spent = 0.0
    with tl.backend_context("numpy"):
        for entry in todo:
            if mode == "subset" and spent > budget_s:
                break
            kernel = canonical_kernel(network.get_submodule(entry["name"])).numpy()
            started = time.perf_counter()
            (_, _), errors = partial_tucker(kernel, rank=list(entry["ranks"]), modes=[0, 1], init="svd")
            seconds = time.perf_counter() - started
            spent += seconds
            measured.append((entry, seconds, len(errors)))
    per_element = sum(s for _, s, _ in measured) / sum(e["params_before"] for e, _, _ in measured)
    rest = [e for e in todo if e not in [m[0] for m in measured]]
    extrapolated = sum(e["params_before"] for e in rest) * per_element
    return {
        "method": "tensorly.decomposition.partial_tucker(init='svd', n_iter_max=100, tol=1e-4), numpy backend",
        "layers_measured": len(measured),
        "layers_total": len(todo),
        "measured_seconds": round(sum(s for _, s, _ in measured), 3),
        "extrapolated_seconds_for_the_rest": round(extrapolated, 3),
        "total_seconds": round(sum(s for _, s, _ in measured) + extrapolated, 3),
        "extrapolated": bool(rest),
        "hooi_iterations_run": [n for _, _, n in measured],
    }


def verify_real_count(network: torch.nn.Module) -> dict:
    from tucker_export.exporter.counting import count_network

    shape = (1, 64, 64, 64)
    started = time.perf_counter()
    real = count_network(network, shape, device="cpu")
    real_s = time.perf_counter() - started
    meta = count_network(network, shape)
    same = all(real.convs[k].macs == meta.convs[k].macs for k in meta.convs)
    return {"input_shape": list(shape), "real_macs": real.macs, "meta_macs": meta.macs, "equal": same,
            "real_forward_seconds": round(real_s, 2)}


@dataclass(frozen=True)
class OurTimings:
    """What the printed summary and the report both need from the timed runs of ``decompose_network``."""

    times: list[float]
    two_threads: list[float]
    totals: dict
    load_at_start: tuple[float, float, float]


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results/decompose.json"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline", choices=("subset", "full", "skip"), default="subset")
    parser.add_argument("--baseline-budget-s", type=float, default=60.0)
    parser.add_argument("--extra-policies", action="store_true", help="Also time energy, vbmf and budget modes.")
    parser.add_argument("--verify-real-count", action="store_true")
    return parser.parse_args(argv)


def _build_report(policy: RankPolicy, ours: OurTimings) -> dict:
    times, two_threads, totals = ours.times, ours.two_threads, ours.totals
    return {
        "network": {"class": "PlainConvUNet", **{k: v for k, v in ARCH_KWARGS.items() if k in (
            "n_stages", "features_per_stage", "n_conv_per_stage", "n_conv_per_stage_decoder")},
            "num_classes": NUM_CLASSES, "input_shape": [1, *PATCH], "init": "nnU-Net InitWeights_He(1e-2)"},
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "load_average_at_start": [round(x, 2) for x in ours.load_at_start]},
        "policy": policy.to_manifest(),
        "decompose_seconds": {"first": round(times[0], 3), "median": round(statistics.median(times), 3),
                              "min": round(min(times), 3),
                              "all": [round(t, 3) for t in times], "threads": 1,
                              "with_2_threads": {"median": round(statistics.median(two_threads), 3),
                                                 "min": round(min(two_threads), 3),
                                                 "all": [round(t, 3) for t in two_threads]}},
        "seconds_per_phase_last_run": totals["seconds_per_phase"],
        "layers": {"total": totals["layers"], "factorized": totals["factorized"], "kept": totals["kept"]},
        "params": {"before": totals["params_before"], "after": totals["params_after"],
                   "ratio": totals["params_ratio"]},
        "conv_params": {"before": totals["conv_params_before"], "after": totals["conv_params_after"],
                        "ratio": totals["conv_params_after"] / totals["conv_params_before"]},
        "macs": {"before": totals["macs_before"], "after": totals["macs_after"], "ratio": totals["macs_ratio"],
                 "counted": "forward hooks on every conv, meta device, batch 1 at 1x128^3"},
    }


def _time_extra_policies(network: torch.nn.Module) -> dict:
    from tucker_export.exporter.ranks import RankPolicy

    extra = {}
    for name, other in {
        "energy 0.9": RankPolicy(mode="energy", energy=0.9),
        "vbmf": RankPolicy(mode="vbmf"),
        "budget macs 0.3": RankPolicy(mode="budget", budget_macs=0.3),
    }.items():
        other_times, other_result = time_ours(network, other, 1)
        extra[name] = {"seconds": round(other_times[0], 3), "macs_ratio": other_result.totals["macs_ratio"],
                       "params_ratio": other_result.totals["params_ratio"],
                       "factorized": other_result.totals["factorized"]}
    return extra


def _print_summary(report: dict, ours: OurTimings) -> None:
    times, two_threads, totals = ours.times, ours.two_threads, ours.totals
    g = 1e9
    print(f"TotalSegmentator-size PlainConvUNet ({totals['layers']} convs, {totals['factorized']} factorized), "
          f"rank factor 0.3, round-to 8, "
          f"load average at start {ours.load_at_start[0]:.2f} on {os.cpu_count()} CPUs")
    print(f"  decomposition wall time: first {times[0]:.2f} s (includes one-off lazy imports), "
          f"median of {len(times)} {statistics.median(times):.2f} s, min {min(times):.2f} s (target <= 10 s); "
          f"1 torch thread (the default)")
    print(f"  with 2 torch threads: median {statistics.median(two_threads):.2f} s, min {min(two_threads):.2f} s "
          f"(all: {', '.join(f'{t:.2f}' for t in two_threads)})")
    print("  phases of the last run: " + ", ".join(f"{k} {v:.2f} s" for k, v in totals["seconds_per_phase"].items()))
    if "tensorly_hooi_baseline" in report:
        base = report["tensorly_hooi_baseline"]
        label = (f"measured on {base['layers_measured']} of {base['layers_total']} layers "
                 f"({base['measured_seconds']:.1f} s), rest EXTRAPOLATED by kernel size" if base["extrapolated"]
                 else f"measured on all {base['layers_total']} layers")
        print(f"  tensorly partial_tucker HOOI baseline: {base['total_seconds']:.1f} s ({label})")
    print(f"  {'':14}{'before':>14}{'after':>14}{'ratio':>8}")
    print(f"  {'parameters':14}{totals['params_before'] / 1e6:>13.2f}M{totals['params_after'] / 1e6:>13.2f}M"
          f"{totals['params_ratio']:>8.3f}")
    print(f"  {'MACs @128^3':14}{totals['macs_before'] / g:>13.1f}G{totals['macs_after'] / g:>13.1f}G"
          f"{totals['macs_ratio']:>8.3f}")
    for name, entry in report.get("extra_policies", {}).items():
        print(f"  {name}: {entry['seconds']:.2f} s, MACs x{entry['macs_ratio']:.3f}, params x{entry['params_ratio']:.3f}")
    if "real_count_check" in report:
        check = report["real_count_check"]
        print(f"  real CPU forward at 64^3 counts {check['real_macs'] / g:.2f} GMACs, meta pass "
              f"{check['meta_macs'] / g:.2f} GMACs: {'equal' if check['equal'] else 'DIFFERENT'}")


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)

    from tucker_export.exporter.ranks import RankPolicy
    from tucker_export.validation.machine import MachineWatch, write_benchmark_json

    watch = MachineWatch()
    load_at_start = os.getloadavg()
    network = build_totalsegmentator_network()
    policy = RankPolicy(mode="relative", factor=0.3)
    times, result = time_ours(network, policy, args.repeats)
    two_threads, _ = time_ours(network, policy, args.repeats, threads=2)
    ours = OurTimings(times=times, two_threads=two_threads, totals=result.totals, load_at_start=load_at_start)
    report = _build_report(policy, ours)
    if args.baseline != "skip":
        report["tensorly_hooi_baseline"] = time_tensorly_baseline(network, result.layers, args.baseline,
                                                                  args.baseline_budget_s)
    if args.extra_policies:
        report["extra_policies"] = _time_extra_policies(network)
    if args.verify_real_count:
        report["real_count_check"] = verify_real_count(network)

    _print_summary(report, ours)
    print("  " + write_benchmark_json(args.out, report, watch))
    return 0 if math.isfinite(times[0]) else 1


if __name__ == "__main__":
    sys.exit(main())
