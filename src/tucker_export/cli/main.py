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
from tucker_export.cli.options import describe_error, show_progress, split_folds
from tucker_export.errors import TuckerExportError

logger = logging.getLogger("tucker_export")


def _set_verbosity_from_subcommand(ctx: click.Context, param: click.Parameter, value: object) -> None:
    """`tucker-export decompose ... -q` means the same as `tucker-export -q decompose ...`."""
    if not value:
        return
    root = ctx.find_root()
    root.ensure_object(dict)
    if param.name == "quiet":
        verbosity = -1
    else:
        verbosity = max(int(root.obj.get("verbosity", 0) or 0), 0) + int(value)  # type: ignore[call-overload]
    root.obj["verbosity"] = verbosity
    configure_logging(verbosity)


def _verbosity_options() -> list[click.Option]:
    return [
        click.Option(["-v", "--verbose"], count=True, expose_value=False, is_eager=True,
                     callback=_set_verbosity_from_subcommand, help="As `tucker-export -v`: more output."),
        click.Option(["-q", "--quiet"], is_flag=True, expose_value=False, is_eager=True,
                     callback=_set_verbosity_from_subcommand, help="As `tucker-export -q`: only warnings and errors."),
    ]


class _Group(click.Group):
    """Turns library errors into one clear sentence and exit 1, and Ctrl-C into exit 130.

    Every subcommand also takes -v/-q, since users type them at the end of the line as often as
    before the subcommand.
    """

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        taken = {opt for param in cmd.params for opt in getattr(param, "opts", [])}
        cmd.params.extend(option for option in _verbosity_options() if not taken & set(option.opts))
        super().add_command(cmd, name)

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except TuckerExportError as error:
            logger.debug("Traceback of the error below:", exc_info=True)
            click.secho(f"Error: {describe_error(error)}", err=True, fg="red")
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
      build      bundle -> TensorRT engines for this machine's GPUs, or OpenVINO models for its CPU
      check      CT scans -> what is wrong with each (truncated, NaN, missing slices, ...)
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
@click.option("--model-only", is_flag=True, help="Only find (or, with --retrain, rebuild) the model and print its folder as the last line.")
@click.option("--retrain", is_flag=True,
              help="Rebuild the model with its recipe from the OpenKBP data set (about an hour on 2 CPU cores) instead "
                   "of using the one that ships, then run the demo on it.")
@click.option("--data", "data_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="With --retrain: the OpenKBP data set [default: $TUCKER_EXPORT_OPENKBP or ../shared/data/openkbp].")
@click.option("--model-root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where --retrain writes the model, or which retrained model to run the demo on "
                   "[default: the shipped model; with --retrain, <cache>/demo-model-v<N>].")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the demo pipeline writes its bundle and segmentations [default: a folder in the cache]. "
                   "With --retrain, training's work folder is <cache>/retrain-v<N> (resumed after a stop).")
@click.pass_context
def demo(ctx: click.Context, model_only: bool, retrain: bool, data_dir: Path | None, model_root: Path | None,
         work_dir: Path | None) -> None:
    """Run the whole pipeline on the shipped nnU-Net model of real head-and-neck CT.

    The model (5 organs at risk, trained on the OpenKBP data set) and four held-out patients with their
    clinical contours ship with the package, so nothing is trained or downloaded. The demo decomposes
    the model, exports ONNX, picks and gates the CPU engine, segments the patients and prints Dice per
    structure against the contours for the original model, Tucker, and Tucker after label-free
    fine-tuning, with the speed of the engine `auto` picks against stock PyTorch.
    """
    from tucker_export.demo import ensure_demo_model

    progress = show_progress(ctx)
    if retrain:
        from tucker_export._io import user_cache_dir
        from tucker_export.demo.recipe import RECIPE_VERSION
        from tucker_export.demo.retrain import rebuild_demo_model

        model_root = model_root or user_cache_dir() / f"demo-model-v{RECIPE_VERSION}"
        rebuild_demo_model(model_root, data_dir=data_dir, progress=progress)
    model = ensure_demo_model(model_root)
    if model_only:
        click.echo(str(model.model_dir))
        return
    from tucker_export.demo_pipeline import format_demo_report, run_demo_pipeline

    report = run_demo_pipeline(model, work_dir=work_dir, progress=progress)
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
        model_dir, folds=split_folds(folds), checkpoint_name=checkpoint_name, trust_checkpoint=trust_checkpoint
    )))


@cli.command()
@click.option("-i", "--input", "input_path", required=True, type=click.Path(path_type=Path),
              help="A folder of NIfTI images (nnU-Net's case_0000.nii.gz naming or plain case.nii.gz), one image "
                   "file, a DICOM series folder, or a folder of DICOM series folders.")
@click.option("-o", "--output", "output_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for the segmentations (one case.nii.gz per case, with its input's geometry); "
                   "required unless --check-only.")
@click.option("-b", "--bundle", "bundle_path", type=click.Path(path_type=Path), default=None,
              help="A bundle made by `tucker-export decompose`.")
@click.option("-m", "--model", "model_dir", type=click.Path(path_type=Path), default=None,
              help="An undecomposed nnU-Net trained model folder, run through the same path.")
@click.option("--backend", type=click.Choice(["auto", "trt", "ort", "openvino", "torch"]), default="auto", show_default=True,
              help="auto: on a GPU a matching TensorRT engine, else ONNX Runtime; on the CPU OpenVINO (with "
                   "--precision auto/bf16/int8), else ONNX Runtime; else PyTorch.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "fp16", "bf16", "int8"]), default="auto", show_default=True,
              help="auto: on the CPU the fastest OpenVINO precision that passed its accuracy gate (compiled and "
                   "gated on first use, bf16 where the CPU has it); fp32 elsewhere. bf16/int8 run on OpenVINO.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Engine threads [default: the physical cores this process may use].")
@click.option("-f", "--folds", multiple=True, help="Folds to ensemble [default: all in the bundle/model].")
@click.option("--step-size", type=float, default=0.5, show_default=True,
              help="Sliding-window step as a fraction of the patch size (nnU-Net's default 0.5).")
@click.option("--disable-tta", is_flag=True, help="No mirroring test-time augmentation (about 8x faster in 3D).")
@click.option("--batch-size", default="auto", show_default=True,
              help="Tiles and mirror variants per engine call; auto: 1 for PyTorch (nnU-Net's numbers call for "
                   "call), else the mirror variants of a tile in one call (up to 2M patch voxels per call).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--save-probabilities", is_flag=True, help="Also write nnU-Net's .npz probabilities and .pkl properties.")
@click.option("--overwrite", is_flag=True, help="Redo cases whose segmentation already exists (default: skip them).")
@click.option("--trust-checkpoint", is_flag=True, help="With -m: allow full-pickle checkpoint loading.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write per-case status and timings (check, preprocess, network, export) as JSON.")
@click.option("--strict", is_flag=True, help="Also refuse what is otherwise a warning (a non-CT DICOM series for a CT model).")
@click.option("--check-only", is_flag=True, help="Only run the input checks (as `tucker-export check`); segment nothing.")
@click.option("--sequential", is_flag=True,
              help="Run each case's stages one after the other (default: the next case is read and preprocessed, "
                   "and the previous one exported, while the network runs; at most one case ahead).")
@click.option("--stock-export", is_flag=True,
              help="Export with stock nnU-Net's all-classes scipy resampling instead of the chunked PyTorch one "
                   "(same interpolation; bit-identical to stock, slower and far larger in memory on big scans).")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
              help="Run the cases on Ray workers (pip install 'tucker-export[ray]'): --ray alone starts a local Ray "
                   "on this machine; --ray ADDRESS (auto, ray://head:10001) joins a cluster, whose nodes must see "
                   "the bundle, scans and output folder at the same paths.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="With --ray: how many workers [default: one per GPU with --device cuda, else the CPUs // "
                   "--cpus-per-worker].")
@click.option("--cpus-per-worker", type=click.IntRange(min=1), default=1, show_default=True,
              help="With --ray on the CPU: cores (and engine threads) per worker.")
@click.option("--max-retries", type=click.IntRange(min=0), default=2, show_default=True,
              help="With --ray: how often a case whose worker died is handed to another worker.")
@click.pass_context
def infer(ctx: click.Context, input_path: Path, output_dir: Path, bundle_path: Path | None, model_dir: Path | None,
          backend: str, precision: str, folds: tuple[str, ...], step_size: float, disable_tta: bool,
          batch_size: str, device: str, save_probabilities: bool, overwrite: bool, trust_checkpoint: bool,
          report_path: Path | None, threads: int | None, strict: bool, check_only: bool, sequential: bool,
          stock_export: bool, ray_address: str | None, workers: int | None, cpus_per_worker: int,
          max_retries: int) -> None:
    """Segment CT scans with a bundle (or a plain nnU-Net model), nnU-Net compatible.

    Preprocessing, sliding window, mirroring, fold ensembling and export are nnU-Net's own; only the
    network call goes through the chosen engine. Finished cases are skipped on a rerun. Each case is
    checked before it is segmented (see `tucker-export check`): a broken or unreadable scan is
    reported, nothing is written for it, the others finish, and the command exits with status 1.
    """
    from tucker_export.errors import TuckerExportError

    if check_only:
        _run_checks(ctx, input_path, bundle_path, model_dir, strict, report_path)
        return
    if output_dir is None:
        raise click.UsageError("Missing option '-o' / '--output' (the folder for the segmentations).")
    common = dict(
        bundle_path=bundle_path, model_dir=model_dir, backend=backend,
        precision=precision, folds=split_folds(folds), step_size=step_size, use_mirroring=not disable_tta,
        batch_size=batch_size, device=device, save_probabilities=save_probabilities, overwrite=overwrite,
        progress=show_progress(ctx), trust_checkpoint=trust_checkpoint, strict=strict,
        fast_export=not stock_export,
    )
    if ray_address is not None:
        if threads is not None or sequential:
            raise click.UsageError("With --ray, engine threads are --cpus-per-worker and cases run one per worker; "
                                   "drop --threads/--sequential.")
        from tucker_export.scaleout.ray_inference import run_inference_on_ray

        report = run_inference_on_ray(input_path, output_dir, address=ray_address, workers=workers,
                                      cpus_per_worker=cpus_per_worker, max_retries=max_retries, **common)
    else:
        if workers is not None:
            raise click.UsageError("--workers needs --ray (a local Ray on this machine, or a cluster's address).")
        from tucker_export.inference import run_inference

        report = run_inference(input_path, output_dir, threads=threads, overlap=not sequential, **common)
    click.echo(report.summary())
    if report_path is not None:
        from tucker_export._io import write_json_atomic

        write_json_atomic(report_path, report.to_dict())
    if report.failed:
        raise TuckerExportError(f"{len(report.failed)} of {len(report.results)} case(s) failed (listed above).")


@cli.command()
@click.option("-i", "--input", "input_path", required=True, type=click.Path(path_type=Path),
              help="Scans to check (same forms as `infer -i`).")
@click.option("-b", "--bundle", "bundle_path", type=click.Path(path_type=Path), default=None,
              help="Also check what this bundle's model needs (channels, dimensionality, memory, modality).")
@click.option("-m", "--model", "model_dir", type=click.Path(path_type=Path), default=None,
              help="As -b, for an nnU-Net trained model folder.")
@click.option("--strict", is_flag=True, help="Count warnings (a non-CT series for a CT model) as failures.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the findings per case as JSON.")
@click.pass_context
def check(ctx: click.Context, input_path: Path, bundle_path: Path | None, model_dir: Path | None, strict: bool,
          report_path: Path | None) -> None:
    """Check scans before segmenting them, as `infer` does, and list what is wrong with each.

    \b
    Per file: a gzip stream cut short or failing its CRC, fewer voxels than the header promises,
    NaN/Inf voxels, a zero or negative spacing, a non-orthonormal direction matrix.
    Per DICOM series: missing slices (a step over 1.5x the median), repeated positions, mixed
    orientation or thickness, several series in one folder, a non-CT modality for a CT model.
    With -b/-m: channel count, dimensionality, and whether the case fits in this machine's memory.
    Exits 1 when any case cannot be segmented.
    """
    _run_checks(ctx, input_path, bundle_path, model_dir, strict, report_path)


def _run_checks(ctx: click.Context, input_path: Path, bundle_path: Path | None, model_dir: Path | None,
                strict: bool, report_path: Path | None) -> None:
    from tucker_export.errors import BrokenScanError
    from tucker_export.inference import check_scans
    from tucker_export.integrity.checks import format_inputs_report

    report = check_scans(input_path, bundle_path=bundle_path, model_dir=model_dir, strict=strict,
                         progress=show_progress(ctx))
    click.echo(format_inputs_report(report))
    if report_path is not None:
        from tucker_export._io import write_json_atomic

        write_json_atomic(report_path, report.to_dict())
    if report.failed:
        raise BrokenScanError(f"{len(report.failed)} of {len(report.checks)} case(s) failed their checks (listed above).")


@cli.command()
@click.option("-b", "--bundle", "bundle_path", required=True, type=click.Path(path_type=Path), help="The bundle to validate.")
@click.option("-i", "--input", "input_path", required=True, type=click.Path(path_type=Path),
              help="Images to validate on (same forms as `infer -i`).")
@click.option("--labels", "labels_dir", type=click.Path(path_type=Path), default=None,
              help="Ground-truth label maps named <case>.nii.gz; adds Dice against the truth.")
@click.option("--only-contoured", is_flag=True,
              help="Score a structure against --labels only in cases whose label map contains it (clinical contours "
                   "leave out what a patient's plan did not need; such a structure is unknown, not background).")
@click.option("--backend", type=click.Choice(["auto", "trt", "ort", "openvino", "torch"]), default="auto", show_default=True,
              help="As `infer --backend`.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "fp16", "bf16", "int8"]), default="fp32",
              show_default=True, help="As `infer --precision` (auto: the precision `infer` would pick).")
@click.option("--against", type=click.Choice(["original", "decomposed"]), default="original", show_default=True,
              help="PyTorch reference: the original model (compression + engine error) or the decomposed "
                   "network (the engine's own error).")
@click.option("--reference-model", type=click.Path(path_type=Path), default=None,
              help="The original nnU-Net model folder, when it moved since `decompose`.")
@click.option("-f", "--folds", multiple=True, help="Folds [default: all in the bundle].")
@click.option("--min-dice", type=float, default=None, help="Fail when any class's Dice engine vs reference is below this.")
@click.option("--max-abs-logit", type=float, default=None, help="Fail when any fold's max abs logit difference exceeds this.")
@click.option("--nsd-tolerance", type=float, default=2.0, show_default=True, help="Surface Dice tolerance in mm.")
@click.option("--parity-tiles", type=click.IntRange(min=1), default=4, show_default=True,
              help="Sliding-window tiles per case and fold compared logit by logit.")
@click.option("--disable-tta", is_flag=True, help="No mirroring (faster).")
@click.option("--step-size", type=float, default=0.5, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the full report (per fold, case and class) as JSON.")
@click.pass_context
def validate(ctx: click.Context, bundle_path: Path, input_path: Path, labels_dir: Path | None, backend: str,
             precision: str, against: str, reference_model: Path | None, folds: tuple[str, ...],
             min_dice: float | None, max_abs_logit: float | None, nsd_tolerance: float, parity_tiles: int,
             disable_tta: bool, step_size: float, batch_size: int, device: str, report_path: Path | None,
             only_contoured: bool) -> None:
    """Compare a bundle's engine with PyTorch: logits parity per fold, Dice/IoU/NSD per class.

    Exits 1 when a threshold fails, listing every failure.
    """
    from tucker_export.errors import ValidationFailedError
    from tucker_export.validation.validate import format_validation_report, validate_bundle

    report = validate_bundle(
        bundle_path, input_path, labels_dir=labels_dir, backend=backend, precision=precision, against=against,
        reference_model=reference_model, folds=split_folds(folds), min_dice=min_dice, max_abs_logit=max_abs_logit,
        report_path=report_path, step_size=step_size, use_mirroring=not disable_tta, batch_size=batch_size,
        device=device, nsd_tolerance_mm=nsd_tolerance, parity_tiles=parity_tiles,
        progress=show_progress(ctx), only_contoured=only_contoured,
    )
    from tucker_export.bundle import Bundle

    click.echo(format_validation_report(report, Bundle.load(bundle_path).spec.label_names))
    if report.failures:
        raise ValidationFailedError(f"{len(report.failures)} validation check(s) failed (listed above).")


@cli.command()
@click.argument("bundle_path", type=click.Path(path_type=Path))
@click.option("-i", "--input", "scans", required=True, type=click.Path(path_type=Path),
              help="Unlabeled scans of the deployment (same forms as `infer -i`); tiles are cut from them.")
@click.option("-o", "--output", "output", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write the fine-tuned bundle here [default: replace BUNDLE_PATH, only once everything succeeded].")
@click.option("--steps", type=click.IntRange(min=1), default=300, show_default=True, help="Optimizer steps per fold.")
@click.option("--lr", type=float, default=3e-4, show_default=True, help="Adam learning rate.")
@click.option("--batch-size", type=click.IntRange(min=1), default=2, show_default=True, help="Tiles per step.")
@click.option("--tiles", "train_tiles", type=click.IntRange(min=1), default=96, show_default=True,
              help="Training tiles cut from the scans (seeded).")
@click.option("--held-out-tiles", type=click.IntRange(min=1), default=16, show_default=True,
              help="Tiles that never train; the best step is chosen on them.")
@click.option("--eval-every", type=click.IntRange(min=1), default=25, show_default=True,
              help="Steps between held-out evaluations.")
@click.option("--max-minutes", type=float, default=None, help="Stop each fold after this many minutes.")
@click.option("--train-norms", is_flag=True, help="Also train the normalisation layers' scale and shift.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("-f", "--folds", multiple=True, help="Folds to fine-tune [default: all in the bundle].")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--teacher", "teacher_dir", type=click.Path(path_type=Path), default=None,
              help="The original nnU-Net model folder, when it moved since `decompose`.")
@click.option("--labels", "labels_dir", type=click.Path(path_type=Path), default=None,
              help="Optional label maps <case>.nii.gz: adds nnU-Net's Dice+CE loss to the distillation.")
@click.option("--overwrite", is_flag=True, help="Replace an existing -o folder.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the per-fold results and training history as JSON.")
@click.pass_context
def finetune(ctx: click.Context, bundle_path: Path, scans: Path, output: Path | None, steps: int, lr: float,
             batch_size: int, train_tiles: int, held_out_tiles: int, eval_every: int, max_minutes: float | None,
             train_norms: bool, seed: int, folds: tuple[str, ...], device: str, teacher_dir: Path | None,
             labels_dir: Path | None, overwrite: bool, report_path: Path | None) -> None:
    """Win back accuracy after decomposition: distil the original model into the bundle, without labels.

    The original network (the teacher) and the factorized one see the same tiles of your scans;
    only the Tucker factors and cores train, towards the teacher's soft outputs. The best step on
    held-out tiles is kept, and a bundle no step improves keeps its weights. Re-export the ONNX
    afterwards: exports of the old weights are refused.
    """
    from tucker_export._io import write_json_atomic
    from tucker_export.finetune import FinetuneSettings, finetune_bundle, format_finetune_report

    settings = FinetuneSettings(steps=steps, lr=lr, batch_size=batch_size, train_tiles=train_tiles,
                                held_out_tiles=held_out_tiles, eval_every=eval_every, seed=seed,
                                train_norms=train_norms, max_minutes=max_minutes, device=device)
    report = finetune_bundle(bundle_path, scans, output=output, folds=split_folds(folds), settings=settings,
                             teacher_dir=teacher_dir, labels_dir=labels_dir, overwrite=overwrite,
                             progress=show_progress(ctx))
    if report_path is not None:
        write_json_atomic(report_path, report.to_dict())
    click.echo(format_finetune_report(report))


@cli.command("export-triton")
@click.argument("bundle_path", metavar="BUNDLE", type=click.Path(path_type=Path))
@click.option("-o", "--output", "repository", required=True, type=click.Path(path_type=Path),
              help="Triton model repository folder (created; other models in it are left alone).")
@click.option("--backend", default="onnx", show_default=True,
              help="onnx: the ONNX export on Triton's onnxruntime backend; tensorrt: the bundle's TensorRT plans, "
                   "one per GPU kind that has an engine.")
@click.option("-p", "--precision", "precisions", multiple=True,
              help="ONNX precisions to serve, fp32 and/or fp16 (repeat or comma-separate) [default: fp32].")
@click.option("-f", "--folds", multiple=True, help="Folds to serve [default: all in the bundle]; one model each.")
@click.option("--gpus", default="0", show_default=True,
              help="Serving machine's GPU numbers, one instance group each (e.g. 0,1), or 'none' for CPU instances.")
@click.option("--cpu-instances", type=click.IntRange(min=1), default=1, show_default=True,
              help="Model instances with --gpus none.")
@click.option("--gpu-kind", "gpu_kinds", multiple=True,
              help="tensorrt: only plans of these GPU kinds (e.g. nvidia-h200-sm90) [default: every kind with an engine].")
@click.option("--name", default=None, help="Model name prefix [default: the bundle folder's name].")
@click.option("--queue-delay-us", type=click.IntRange(min=0), default=2000, show_default=True,
              help="Dynamic batching: how long Triton waits to fill a batch.")
@click.option("--overwrite", is_flag=True, help="Replace models of the same name already in the repository.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the models, files and engine keys as JSON.")
def export_triton(bundle_path: Path, repository: Path, backend: str, precisions: tuple[str, ...],
                  folds: tuple[str, ...], gpus: str, cpu_instances: int, gpu_kinds: tuple[str, ...], name: str | None,
                  queue_delay_us: int, overwrite: bool, report_path: Path | None) -> None:
    """Write a Triton Inference Server model repository that serves BUNDLE's network.

    One model per fold and precision (REPO/<name>_fold_<f>_<precision>/config.pbtxt and 1/model.onnx,
    or 1/model.<gpu-kind>.plan for TensorRT), with the bundle's input/output names, dtypes and patch
    dims, max_batch_size from its batch profile, dynamic batching and one instance group per GPU.
    Every config is checked against Triton's own ModelConfig schema before it is written. Triton
    serves patch-sized tiles; the sliding window stays with the client.
    """
    from tucker_export._io import write_json_atomic
    from tucker_export.scaleout.triton import TritonOptions, export_triton_repository, parse_gpu_list

    options = TritonOptions(backend=backend, precisions=tuple(split_folds(precisions) or ["fp32"]),
                            folds=tuple(split_folds(folds) or ()) or None, gpus=parse_gpu_list(gpus),
                            cpu_instances=cpu_instances, name=name, queue_delay_us=queue_delay_us, overwrite=overwrite)
    result = export_triton_repository(bundle_path, repository, options,
                                      gpu_kinds=tuple(split_folds(gpu_kinds) or ()) or None)
    if report_path is not None:
        write_json_atomic(report_path, result.to_dict())
    click.echo(result.summary())


def _add_subpackage_commands() -> None:
    """Commands that live beside their library code; each module keeps its heavy imports inside."""
    from tucker_export.cli.bench import bench_command
    from tucker_export.cli.build import build_command
    from tucker_export.cli.decompose import decompose_command
    from tucker_export.cli.export import export_command

    cli.add_command(decompose_command, "decompose")
    cli.add_command(export_command, "export")
    cli.add_command(build_command, "build")
    cli.add_command(bench_command, "bench")


_add_subpackage_commands()


def main() -> None:
    cli(prog_name="tucker-export")


if __name__ == "__main__":
    main()
