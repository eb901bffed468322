"""Benchmark: the CPU engines side by side on the TotalSegmentator-size network, original vs Tucker.

    python bench/bench_cpu_engines.py [--patches 64 128] [--repeats 4 2] [--factor 0.3] [--threads N]
                                      [--out bench/results/cpu_engines.json]

In one run, on one machine, for each patch size (batch 1, one input channel), every row below is
timed for the original network and for its Tucker decomposition (relative rank factor
``--factor``, ranks rounded to 8):

- stock PyTorch fp32 (eager, ``inference_mode``): the reference of every ratio;
- PyTorch bf16 (``torch.autocast('cpu', torch.bfloat16)``);
- ONNX Runtime CPU fp32 (what ``infer --backend ort`` runs);
- OpenVINO CPU fp32, bf16 and int8 (what ``infer --backend openvino`` runs; int8 quantized by NNCF
  with the project's settings, calibrated on 16 seeded noise tiles).

Rows are timed *interleaved*: ``--repeats`` rounds in which every row, in an order rotated each
round, opens its engine, runs two untimed calls and two timed calls, and closes it again (one engine
open at a time: all of them at 128^3 exceed 24 GB), so load drift on a shared machine hits all rows
alike; the median per row is reported. Threads: ``--threads`` (default: physical cores) for every engine.

The weights are nnU-Net's He initialisation (random): accuracy means nothing here, only time.
Accuracy of bf16/int8 is gated on a trained model by ``tucker-export build --backend openvino``.
The load average at start and end is recorded and a run is labelled quiet only when the load started at <= 1 per core and other processes used <= 10 % of the
CPU while it ran.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from tucker_export.benchmarks.networks import build_totalsegmentator_network
from tucker_export.benchmarks.paths import RESULTS


def _onnx(network: torch.nn.Module, patch: tuple[int, ...], path: Path) -> Path:
    from tucker_export.exporter.onnx_export import export_torch_to_onnx

    model = export_torch_to_onnx(network, num_input_channels=1, patch_size=patch, trace_batch=1)
    path.write_bytes(model.SerializeToString())
    return path


Opener = Callable[[], tuple[Callable[[], object], Callable[[], None]]]


def _rows(original: torch.nn.Module, tucker: torch.nn.Module, patch: tuple[int, ...], work: Path,
          threads: int) -> dict[str, Opener]:
    """Per row, an opener returning (run, close): one engine is open at a time, so 128^3 fits in memory."""
    from tucker_export.engines import openvino_backend as ovb
    from tucker_export.engines.runners import OnnxRuntimeRunner
    from tucker_export.runtimes import torch_callable

    x = np.random.default_rng(0).standard_normal((1, 1, *patch), dtype=np.float32)
    xt = torch.from_numpy(x)
    calibration = [np.random.default_rng(i + 1).standard_normal((1, 1, *patch), dtype=np.float32) for i in range(16)]
    rows: dict[str, Opener] = {}
    for name, network in (("original", original), ("tucker", tucker)):
        def torch_fp32(net: torch.nn.Module = network) -> tuple[Callable[[], object], Callable[[], None]]:
            forward = torch_callable(net)
            return (lambda: forward(xt)), lambda: None

        def torch_bf16(net: torch.nn.Module = network) -> tuple[Callable[[], object], Callable[[], None]]:
            forward = torch_callable(net, autocast=torch.bfloat16)
            return (lambda: forward(xt)), lambda: None

        onnx_path = _onnx(network, patch, work / f"{name}-{patch[0]}.onnx")

        def ort_fp32(path: Path = onnx_path) -> tuple[Callable[[], object], Callable[[], None]]:
            runner = OnnxRuntimeRunner(path, intra_op_threads=threads).__enter__()
            return (lambda: runner.infer(x)), runner.close

        rows[f"{name} torch fp32"] = torch_fp32
        rows[f"{name} torch bf16"] = torch_bf16
        rows[f"{name} ort fp32"] = ort_fp32
        quantized = ovb.quantize_int8(ovb.read_onnx(onnx_path), calibration)  # once; compiled per round
        for precision in ("fp32", "bf16", "int8"):
            def openvino(precision: str = precision, path: Path = onnx_path, quantized=quantized):
                model = quantized if precision == "int8" else ovb.read_onnx(path)
                session = ovb.OpenVinoSession(ovb.compile_model(model, precision, threads, export=False).compiled)
                return (lambda: session.infer(x)), session.close

            rows[f"{name} openvino {precision}"] = openvino
    return rows


def _interleaved(rows: dict[str, Opener], repeats: int, calls: int = 2) -> dict[str, list[float]]:
    """``repeats`` rounds; in each, every row (order rotated) is opened, called twice untimed and ``calls``
    times timed, and closed."""
    import gc

    names = list(rows)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        order = names[round_index % len(names):] + names[:round_index % len(names)]
        for name in order:
            run, close = rows[name]()
            run()  # untimed: allocations, kernel selection, arenas growing
            run()
            for _ in range(calls):
                started = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - started)
            close()
            del run, close
            gc.collect()
        print(f"  round {round_index + 1}/{repeats} done", flush=True)
    return times


def main() -> int:
    from tucker_export.exporter.decompose import decompose_network
    from tucker_export.exporter.ranks import RankPolicy
    from tucker_export.runtimes import physical_cores
    from tucker_export.validation.machine import MachineWatch, environment, write_benchmark_json

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patches", type=int, nargs="+", default=[64, 128], help="cubic patch edges")
    parser.add_argument("--repeats", type=int, nargs="+", default=[4, 2], help="interleaved rounds per patch size")
    parser.add_argument("--factor", type=float, default=0.3, help="Tucker relative rank factor")
    parser.add_argument("--threads", type=int, default=None, help="threads of every engine [physical cores]")
    parser.add_argument("--out", type=Path, default=RESULTS / "cpu_engines.json")
    args = parser.parse_args()
    threads = args.threads or physical_cores()
    torch.set_num_threads(threads)
    repeats = (args.repeats + [args.repeats[-1]] * len(args.patches))[: len(args.patches)]
    watch = MachineWatch()

    original = build_totalsegmentator_network().eval()
    tucker = build_totalsegmentator_network().eval()
    decompose_network(tucker, (1, args.patches[0], args.patches[0], args.patches[0]),
                      RankPolicy(mode="relative", factor=args.factor, round_to=8))
    results: dict[str, object] = {
        "threads": threads, "factor": args.factor, "environment": environment(), "patches": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench-cpu-engines-") as tmp:
        for patch_edge, n in zip(args.patches, repeats):
            patch = (patch_edge,) * 3
            print(f"patch {patch_edge}^3: preparing engines (export, compile, quantize)", flush=True)
            rows = _rows(original, tucker, patch, Path(tmp), threads)
            times = _interleaved(rows, n)
            medians = {name: float(np.median(t)) for name, t in times.items()}
            stock = medians["original torch fp32"]
            table = {}
            for name, median in medians.items():
                source, engine = name.split(" ", 1)
                untouched = medians.get(f"original {engine}")
                table[name] = {
                    "median_s": round(median, 4), "times_s": [round(t, 4) for t in times[name]],
                    "speedup_vs_stock_pytorch_fp32": round(stock / median, 2),
                    "tucker_vs_original_same_engine": round(untouched / median, 2) if source == "tucker" else None,
                }
            results["patches"][str(patch_edge)] = {"rounds": n, "timed_calls_per_round": 2, "rows": table}  # type: ignore[index]
            print(f"\n== patch {patch_edge}^3, batch 1, {threads} thread(s), median of {2 * n} timed calls in {n} interleaved rounds ==")
            print(f"{'row':<26}{'median s':>10}{'vs stock':>10}{'Tucker gain':>13}")
            for name, row in table.items():
                gain = f"{row['tucker_vs_original_same_engine']:.2f}x" if row["tucker_vs_original_same_engine"] else ""
                print(f"{name:<26}{row['median_s']:>10.3f}{row['speedup_vs_stock_pytorch_fp32']:>9.2f}x{gain:>13}")
            write_benchmark_json(args.out, results, watch)  # after each patch size
    print("\n" + write_benchmark_json(args.out, results, watch))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
