"""The `tucker-export` command line: each command parses options and calls one library function.

Library errors (``TuckerExportError``) become one sentence on stderr and exit status 1; anything
else is a bug and keeps its traceback. Heavy imports happen inside the commands so that
``tucker-export --help`` is instant and works without optional dependencies.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from tucker_export import __version__
from tucker_export.errors import TuckerExportError

logger = logging.getLogger("tucker_export")


class _Group(click.Group):
    """Turns library errors into one clear sentence and exit 1, and Ctrl-C into exit 130."""

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except TuckerExportError as error:
            logger.debug("Traceback of the error below:", exc_info=True)
            click.secho(f"Error: {error}", err=True, fg="red")
            ctx.exit(1)
        except KeyboardInterrupt:
            click.secho("Interrupted; finished outputs are kept, unfinished ones were removed.", err=True)
            ctx.exit(130)


def configure_logging(verbosity: int) -> None:
    """-q: warnings only; default: info; -v: debug for tucker-export; -vv: debug for everything."""
    level = {-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s" if verbosity < 1 else "%(levelname)s %(name)s: %(message)s"))
    package_logger = logging.getLogger("tucker_export")
    package_logger.handlers[:] = [handler]
    package_logger.setLevel(level)
    package_logger.propagate = False
    if verbosity >= 2:
        logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", count=True, help="More output: -v per-layer/per-case detail, -vv debug of every library.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
@click.version_option(__version__, prog_name="tucker-export")
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet: bool) -> None:
    """Compress trained nnU-Net v2 models with Tucker decomposition and deploy them.

    \b
    Pipeline (each step reads and extends one bundle folder):
      decompose  nnU-Net model folder -> bundle (factorized weights, ranks, figures)
      export     bundle -> ONNX files per fold and precision (checked against PyTorch)
      build      bundle -> TensorRT engines for the GPUs of this machine
      infer      CT scans -> segmentations, nnU-Net compatible, through the fastest engine
      validate   logits parity and Dice of the engine against PyTorch
      bench      latency, memory, size; rank-factor sweeps

    Start with `tucker-export demo` (builds a small trained model and runs the pipeline on it)
    and `tucker-export doctor` (what this machine can run).
    """
    ctx.ensure_object(dict)
    ctx.obj["verbosity"] = -1 if quiet else verbose
    configure_logging(ctx.obj["verbosity"])


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of a table.")
def doctor(as_json: bool) -> None:
    """Show versions, CUDA devices and which inference backends are usable here (and why not)."""
    from tucker_export.doctor import collect_diagnostics, format_diagnostics

    diagnostics = collect_diagnostics()
    if as_json:
        click.echo(json.dumps(diagnostics.to_dict(), indent=2))
    else:
        click.echo(format_diagnostics(diagnostics))


@cli.command()
@click.option("--model-only", is_flag=True, help="Only build (or reuse) the demo model and print its folder as the last line.")
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where the demo model is built and cached [default: $TUCKER_EXPORT_CACHE or ~/.cache/tucker-export].",
)
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the demo pipeline writes its bundle and segmentations [default: inside the cache dir].")
@click.pass_context
def demo(ctx: click.Context, model_only: bool, cache_dir: Path | None, work_dir: Path | None) -> None:
    """Build a small trained nnU-Net model on synthetic CT phantoms and run the pipeline on it.

    The first run trains the model (a few minutes on 2 CPU cores); later runs reuse it from the
    cache. Without --model-only it then decomposes the model (rank factor 0.3), exports ONNX,
    segments the held-out phantoms with ONNX Runtime and reports Dice and speed.
    """
    from tucker_export.demo import ensure_demo_model

    show_progress = ctx.obj["verbosity"] >= 0
    model = ensure_demo_model(cache_dir, progress=show_progress)
    if model_only:
        click.echo(str(model.model_dir))
        return
    from tucker_export.demo_pipeline import format_demo_report, run_demo_pipeline

    report = run_demo_pipeline(model, work_dir=work_dir, progress=show_progress)
    click.echo(format_demo_report(report))


@cli.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("-f", "--folds", multiple=True, help="Folds to load (repeat or comma-separate) [default: every fold found].")
@click.option("--checkpoint-name", default="checkpoint_final.pth", show_default=True)
@click.option("--trust-checkpoint", is_flag=True,
              help="Load checkpoints with full pickle when safe loading refuses them (only for files you trust).")
def inspect(model_dir: Path, folds: tuple[str, ...], checkpoint_name: str, trust_checkpoint: bool) -> None:
    """Load an nnU-Net v2 trained model folder as tucker-export does and summarise it."""
    from tucker_export.nnunet.summary import format_model_summary, summarize_model

    click.echo(format_model_summary(summarize_model(
        model_dir, folds=_split_folds(folds), checkpoint_name=checkpoint_name, trust_checkpoint=trust_checkpoint
    )))


def _split_folds(folds: tuple[str, ...]) -> list[str] | None:
    """`-f 0 -f 1`, `-f 0,1` and `-f 0 1`-style lists all mean folds 0 and 1."""
    parts = [part for value in folds for part in value.replace(",", " ").split()]
    return parts or None


def _add_optional_commands() -> None:
    """Commands whose modules live in the subpackages; each module keeps its heavy imports inside."""
    return


_add_optional_commands()


def main() -> None:
    cli(prog_name="tucker-export")


if __name__ == "__main__":
    main()
