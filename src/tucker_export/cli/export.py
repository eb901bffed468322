"""`tucker-export export`: ONNX files per fold and precision, checked against PyTorch (see ``onnx_export``)."""

from __future__ import annotations

from pathlib import Path

import click

from tucker_export.cli.options import show_progress, split_list


@click.command("export")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option(
    "-p", "--precision", "precisions", multiple=True, default=("fp32",), show_default=True,
    help="fp32, fp16 or both (repeat or comma-separate). fp16 = fp16 convolutions, fp32 InstanceNorm and I/O.",
)
@click.option("--opset", type=int, default=17, show_default=True, help="ONNX opset.")
@click.option("--max-batch", type=int, default=4, show_default=True,
              help="Largest batch the files are meant for; `build` makes it the default top of its batch profile.")
@click.option("-f", "--folds", multiple=True, help="Folds to export (repeat or comma-separate) [default: all in the bundle].")
@click.pass_context
def export_command(
    ctx: click.Context, bundle: Path, precisions: tuple[str, ...], opset: int, max_batch: int, folds: tuple[str, ...]
) -> None:
    """Export BUNDLE's networks to ONNX (one file per fold and precision) and check each in ONNX Runtime."""
    from tucker_export.exporter.onnx_export import export_bundle, format_export_table

    records = export_bundle(
        bundle,
        precisions=split_list(precisions),
        opset=opset,
        max_batch=max_batch,
        folds=split_list(folds) or None,
        progress=show_progress(ctx),
    )
    click.echo(format_export_table(records))
