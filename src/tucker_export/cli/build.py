"""`tucker-export build`: TensorRT engines for this machine's GPUs (``engines.build``) or OpenVINO
models for its CPU (``engines.cpu_build``)."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from tucker_export.cli.options import show_progress, split_list

logger = logging.getLogger("tucker_export")


def _tensorrt_usable() -> bool:
    from tucker_export.engines.build import require_tensorrt_and_cuda
    from tucker_export.errors import BackendUnavailableError

    try:
        require_tensorrt_and_cuda()
    except BackendUnavailableError:
        return False
    return True


@click.command("build")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--backend", type=click.Choice(["auto", "trt", "openvino"]), default="auto", show_default=True,
              help="trt: TensorRT engines per GPU kind; openvino: compiled CPU models for this CPU kind; auto: trt "
                   "where TensorRT and a GPU are present, else openvino.")
@click.option("-p", "--precision", "precisions", multiple=True,
              help="trt: fp32, fp16 [default: every precision exported]; openvino: fp32, bf16, int8 [default: bf16 "
                   "where the CPU has it, else fp32]. Repeat or comma-separate.")
@click.option("--gpus", default="all", show_default=True, help="trt: 'all' or device numbers, e.g. 0,1 (one engine per GPU kind).")
@click.option("--batch", "batch_profile", default=None, metavar="MIN:OPT:MAX",
              help="trt: batch range of the engines [default: 1:N:N with N the export's --max-batch].")
@click.option("--workspace", "workspace_gib", type=float, default=4.0, show_default=True, help="trt: builder workspace in GiB.")
@click.option("--calibration-dir", type=click.Path(path_type=Path), default=None,
              help="openvino: CT scans like the ones you will segment; int8 is calibrated on tiles of them, and "
                   "every precision is gated on held-out tiles of them (else on seeded noise tiles). Needed for int8.")
@click.option("--calibration-tiles", type=click.IntRange(min=1), default=200, show_default=True,
              help="openvino int8: patch-sized tiles drawn (seeded) from the calibration scans.")
@click.option("--gate-tiles", type=click.IntRange(min=1), default=8, show_default=True,
              help="openvino: tiles the accuracy gate compares against PyTorch.")
@click.option("--seed", type=int, default=0, show_default=True, help="openvino: seed of the tile positions.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="openvino: threads [default: the physical cores this process may use].")
@click.option("-f", "--folds", multiple=True, help="Folds to build (repeat or comma-separate) [default: all].")
@click.pass_context
def build_command(
    ctx: click.Context,
    bundle: Path,
    backend: str,
    precisions: tuple[str, ...],
    gpus: str,
    batch_profile: str | None,
    workspace_gib: float,
    calibration_dir: Path | None,
    calibration_tiles: int,
    gate_tiles: int,
    seed: int,
    threads: int | None,
    folds: tuple[str, ...],
) -> None:
    """Build BUNDLE's engines for this machine and record them in bundle.json.

    \b
    TensorRT: one engine per fold, precision and GPU kind, from the ONNX exports.
    OpenVINO: one compiled model per fold and precision for this CPU kind, from the fp32 ONNX
    export; each is run against PyTorch first and shipped only if it meets its bar (fp32: max
    |logit diff| <= 1e-3; bf16/int8: argmax agreement >= 99.5 % and Dice >= 0.99 per class).
    """
    from tucker_export.engines.keys import BatchProfile

    progress = show_progress(ctx)
    profile = BatchProfile.parse(batch_profile) if batch_profile else None  # bad syntax fails before any work
    if backend == "auto":
        # fp16 engines are TensorRT's: asking for them means TensorRT, and its absence is the error to show.
        wants_fp16 = "fp16" in [p.lower() for p in split_list(precisions)]
        backend = "trt" if wants_fp16 or _tensorrt_usable() else "openvino"
        logger.debug("Building %s (%s).", backend, "TensorRT and a CUDA GPU are present, or fp16 was asked for"
                    if backend == "trt" else "no TensorRT with a CUDA GPU here")
    if backend == "openvino":
        from tucker_export.engines.cpu_build import build_cpu_engines, format_cpu_build_table

        results = build_cpu_engines(
            bundle, split_list(precisions) or None, folds=split_list(folds) or None, calibration_dir=calibration_dir,
            calibration_tiles=calibration_tiles, gate_tiles=gate_tiles, seed=seed, threads=threads, progress=progress,
        )
        click.echo(format_cpu_build_table([r.record for r in results]))
        return

    from tucker_export.engines.build import build_engines, format_build_table

    records = build_engines(
        bundle,
        split_list(precisions) or None,
        gpus,
        profile,
        workspace_gib,
        folds=split_list(folds) or None,
        progress=progress,
    )
    click.echo(format_build_table(records))
