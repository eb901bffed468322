"""`tucker-export build`: TensorRT engines for this machine's GPUs (see ``engines.build``)."""

from __future__ import annotations

from pathlib import Path

import click


def _split(values: tuple[str, ...]) -> list[str]:
    return [part for value in values for part in value.replace(",", " ").split()]


@click.command("build")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("-p", "--precision", "precisions", multiple=True,
              help="fp32, fp16 or both (repeat or comma-separate) [default: every precision exported].")
@click.option("--gpus", default="all", show_default=True, help="'all' or device numbers, e.g. 0,1 (one engine per GPU kind).")
@click.option("--batch", "batch_profile", default=None, metavar="MIN:OPT:MAX",
              help="Batch range of the engines [default: 1:N:N with N the export's --max-batch].")
@click.option("--workspace", "workspace_gib", type=float, default=4.0, show_default=True, help="Builder workspace in GiB.")
@click.option("-f", "--folds", multiple=True, help="Folds to build (repeat or comma-separate) [default: all].")
@click.pass_context
def build_command(
    ctx: click.Context,
    bundle: Path,
    precisions: tuple[str, ...],
    gpus: str,
    batch_profile: str | None,
    workspace_gib: float,
    folds: tuple[str, ...],
) -> None:
    """Build TensorRT engines for BUNDLE's ONNX files on this machine's GPUs and record them in bundle.json."""
    from tucker_export.engines.build import build_engines, format_build_table
    from tucker_export.engines.keys import BatchProfile

    profile = BatchProfile.parse(batch_profile) if batch_profile else None  # bad syntax fails before any work
    obj = ctx.find_root().obj or {}
    records = build_engines(
        bundle,
        _split(precisions) or None,
        gpus,
        profile,
        workspace_gib,
        folds=_split(folds) or None,
        progress=obj.get("verbosity", 0) >= 0,
    )
    click.echo(format_build_table(records))
