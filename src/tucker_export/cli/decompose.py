"""``tucker-export decompose``: the command; the work is ``decompose_model``.

The lead's CLI group adds it with ``cli.add_command(decompose_command, "decompose")``. Options
are validated here and in ``RankPolicy.validate`` so that bad values raise one-sentence
``RankPolicyError``/``BundleError`` messages (the group prints them and exits 1). ``--rank-mode``
is a plain string checked by ``check_rank_mode`` instead of ``click.Choice`` so that a typo gets
the closest valid mode suggested.
"""

from __future__ import annotations

from pathlib import Path

import click

from tucker_export.bundle import check_bundle_target
from tucker_export.cli.options import split_folds, verbosity
from tucker_export.errors import RankPolicyError


@click.command("decompose")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("-o", "--output", "output", type=click.Path(path_type=Path), required=True,
              help="Bundle folder to create (refused when it exists and is not empty, unless --overwrite).")
@click.option("-f", "--folds", multiple=True,
              help="Folds to decompose (repeat or comma-separate) [default: every fold with a checkpoint].")
@click.option("--rank-mode", default="relative", show_default=True,
              help="relative | fixed | energy | vbmf | budget | none.")
@click.option("--rank-factor", type=float, default=0.3, show_default=True,
              help="relative: rank = ceil(channels x F), F in (0, 1].")
@click.option("--rank-min", type=int, default=None,
              help="Floor of every rank; the rank itself in fixed mode.")
@click.option("--energy", type=float, default=0.9, show_default=True,
              help="energy: keep this fraction of the squared singular values of each mode, in (0, 1].")
@click.option("--budget-macs", type=float, default=None,
              help="budget: fraction of the original convolution MACs that remains, in (0, 1].")
@click.option("--budget-params", type=float, default=None,
              help="budget: fraction of the original convolution parameters that remains, in (0, 1].")
@click.option("--round-to", type=int, default=8, show_default=True,
              help="Round ranks up to a multiple of N (never above the channel count); 1 disables.")
@click.option("--hooi-iterations", type=int, default=0, show_default=True,
              help="HOOI iterations after the SVD initialisation (0: truncated HOSVD only).")
@click.option("--device", default="cpu", show_default=True, help="Where the factorization runs: cpu or cuda[:N].")
@click.option("--configuration", default=None, help="nnU-Net configuration [default: the checkpoint's].")
@click.option("--trust-checkpoint", is_flag=True,
              help="Load checkpoints with full pickle when safe loading refuses them (only for files you trust).")
@click.option("--overwrite", is_flag=True, help="Replace an existing bundle at -o.")
@click.pass_context
def decompose_command(
    ctx: click.Context,
    model_dir: Path,
    output: Path,
    folds: tuple[str, ...],
    rank_mode: str,
    rank_factor: float,
    rank_min: int | None,
    energy: float,
    budget_macs: float | None,
    budget_params: float | None,
    round_to: int,
    hooi_iterations: int,
    device: str,
    configuration: str | None,
    trust_checkpoint: bool,
    overwrite: bool,
) -> None:
    """Factorize the convolutions of an nnU-Net v2 model (Tucker-2) into a deployment bundle.

    \b
    Each 3x3x3 (or 2D, or transposed) conv becomes 1x1 -> core -> 1x1 with per-layer ranks from
    the rank mode; the first conv of a 1-2 channel input, the 1x1 segmentation heads and layers
    whose factorized MACs would not be lower are kept. Prints a per-stage summary (-v: per layer).
    """
    from tucker_export.exporter.decompose import decompose_model, format_summary
    from tucker_export.exporter.ranks import RankPolicy, check_rank_mode

    mode = check_rank_mode(rank_mode.strip())
    if budget_macs is not None and budget_params is not None:
        raise RankPolicyError(
            f"Give one budget, --budget-macs or --budget-params, not both (got {budget_macs} and {budget_params})."
        )
    if mode != "budget" and (budget_macs is not None or budget_params is not None):
        option = "--budget-macs" if budget_macs is not None else "--budget-params"
        raise RankPolicyError(f"{option} applies to --rank-mode budget only, got --rank-mode {mode}.")
    policy = RankPolicy(
        mode=mode,
        factor=rank_factor,
        rank_min=rank_min,
        energy=energy,
        budget_macs=budget_macs,
        budget_params=budget_params,
        round_to=round_to,
    ).validate()
    check_bundle_target(output, overwrite=overwrite)
    level = verbosity(ctx)
    bundle = decompose_model(
        model_dir,
        output,
        folds=split_folds(folds),
        policy=policy,
        configuration=configuration,
        overwrite=overwrite,
        device=device,
        hooi_iterations=hooi_iterations,
        trust_checkpoint=trust_checkpoint,
        progress=level >= 0,
    )
    click.echo(format_summary(bundle, verbose=level >= 1), nl=False)
    click.echo(f"Bundle written to {bundle.path}")
