"""`tucker-export bench`: one bundle's latency, memory and sizes, or a rank-factor sweep (see ``bench``).

Two forms, told apart by ``--sweep-rank-factor`` (or ``--demo``)::

    tucker-export bench BUNDLE [--backend torch,ort,openvino] [--precision fp32,bf16] [--batch-sizes 1,2,4]
                               [-i IMAGES] [--json FILE]
    tucker-export bench --sweep-rank-factor 0.9,0.7,0.5 -m MODEL_DIR -i IMAGES [--labels DIR] --out-dir DIR
    tucker-export bench --demo --out-dir DIR          (the demo model and its held-out cases)

Options that belong to one form are refused in the other with one sentence.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click

from tucker_export.cli.options import show_progress, split_list
from tucker_export.errors import ConfigurationError

logger = logging.getLogger(__name__)


def _refuse(given: dict[str, object], form: str) -> None:
    """One sentence naming the options that do not belong to ``form``."""
    wrong = [name for name, value in given.items() if value not in (None, False, ())]
    if wrong:
        raise ConfigurationError(f"{' and '.join(wrong)} only appl{'ies' if len(wrong) == 1 else 'y'} {form}.")


@click.command("bench")
@click.argument("bundle", required=False, type=click.Path(path_type=Path))
@click.option("--backend", "backends", multiple=True,
              help="torch, ort, openvino, trt (repeat or comma-separate) [default: torch and ort for a bundle; ort for a sweep]. "
                   "A backend that cannot run here is skipped and the reason reported.")
@click.option("-p", "--precision", "precisions", multiple=True,
              help="fp32, fp16, bf16, int8 (repeat or comma-separate; one for a sweep) [default: fp32]. bf16/int8 are "
                   "OpenVINO's; pairs a backend cannot run are skipped with the reason.")
@click.option("--batch-sizes", default=None,
              help="Batch sizes of the model-only latency, e.g. 1,2,4 [default: 1,2,4 for a bundle; 1 for a sweep].")
@click.option("--repeats", type=click.IntRange(min=1), default=10, show_default=True,
              help="Timed calls per batch size (the median and spread are reported).")
@click.option("--warmup", type=click.IntRange(min=0), default=2, show_default=True, help="Untimed calls first.")
@click.option("-i", "--input", "input_path", type=click.Path(path_type=Path), default=None,
              help="Images (same forms as `infer -i`): a bundle is also timed end to end per case; a sweep "
                   "segments them at every rank factor.")
@click.option("--tta/--disable-tta", "tta", default=None,
              help="Mirroring test-time augmentation in the segmentation runs [default: on for a bundle, as `infer`; "
                   "off for a sweep, whose rows it would slow down alike].")
@click.option("--step-size", type=float, default=0.5, show_default=True, help="Sliding-window step (fraction of the patch).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("-f", "--folds", multiple=True, help="Folds [default: all in the bundle/model].")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Bundle form: write the report as JSON to this file ('-' prints JSON instead of the tables).")
@click.option("--sweep-rank-factor", "sweep", default=None,
              help="Sweep: comma-separated rank factors, e.g. 0.9,0.7,0.5,0.3,0.2,0.1 (the original is always the baseline row).")
@click.option("-m", "--model", "model_dir", type=click.Path(path_type=Path), default=None,
              help="Sweep: the nnU-Net trained model folder.")
@click.option("--labels", "labels_dir", type=click.Path(path_type=Path), default=None,
              help="Sweep: ground-truth label maps <case>.nii.gz; adds Dice against the truth.")
@click.option("--demo", is_flag=True,
              help="Sweep the shipped real-CT demo model on its four held-out patients and their contours; "
                   "factors default to 0.9,0.7,0.5,0.3,0.2,0.1.")
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Sweep: where NAME.json and NAME.png go.")
@click.option("--name", default="sweep", show_default=True, help="Sweep: file name stem of the outputs.")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Sweep: keep the bundles and segmentations here [default: a temporary folder, removed].")
@click.option("--round-to", type=click.IntRange(min=1), default=8, show_default=True,
              help="Sweep: ranks rounded up to a multiple of this (1 = tucker-cnn's plain ceil).")
@click.option("--case-repeats", type=click.IntRange(min=1), default=None,
              help="Sweep: segment every case this many times per factor and keep the median seconds [default: 1].")
@click.option("--sequential", is_flag=True,
              help="Sweep: time one network at a time (one session open) instead of interleaving the rows.")
@click.pass_context
def bench_command(
    ctx: click.Context, bundle: Path | None, backends: tuple[str, ...], precisions: tuple[str, ...],
    batch_sizes: str | None, repeats: int, warmup: int, input_path: Path | None, tta: bool | None, step_size: float,
    device: str, folds: tuple[str, ...], json_path: Path | None, sweep: str | None, model_dir: Path | None,
    labels_dir: Path | None, demo: bool, out_dir: Path | None, name: str, work_dir: Path | None, round_to: int,
    case_repeats: int | None, sequential: bool,
) -> None:
    """Latency per backend, precision and batch size, memory, sizes and MACs of BUNDLE; or a rank-factor sweep.

    \b
    tucker-export bench BUNDLE [-i IMAGES] [--json FILE]
    tucker-export bench --sweep-rank-factor 0.9,0.7,0.5 -m MODEL -i IMAGES [--labels DIR] --out-dir DIR
    tucker-export bench --demo --out-dir DIR

    The sweep decomposes the model at each factor, times it, segments the images, and writes a table
    of MACs, parameters, latency and Dice vs the original per structure as JSON and a PNG plot.
    """
    from tucker_export.validation.bench_common import parse_batch_sizes
    from tucker_export.validation.sweep import parse_rank_factors

    progress = show_progress(ctx)
    is_sweep = sweep is not None or demo
    _check_form(bundle, is_sweep)
    sizes = parse_batch_sizes(batch_sizes) if batch_sizes is not None else None

    if not is_sweep:
        _refuse({"-m/--model": model_dir, "--labels": labels_dir, "--out-dir": out_dir,
                 "--work-dir": work_dir, "--sequential": sequential, "--case-repeats": case_repeats,
                 "--name": name if name != "sweep" else None, "--round-to": round_to if round_to != 8 else None},
                "to a sweep (--sweep-rank-factor)")
        _bench_one(bundle, backends=split_list(backends) or ["torch", "ort"], precisions=split_list(precisions) or ["fp32"],
                   batch_sizes=sizes or (1, 2, 4), repeats=repeats, warmup=warmup, input_path=input_path,
                   tta=True if tta is None else tta, step_size=step_size, device=device, folds=split_list(folds),
                   json_path=json_path, progress=progress)
        return

    _refuse({"--json": json_path}, "to one bundle (the sweep writes OUT_DIR/NAME.json)")
    _bench_sweep(parse_rank_factors(sweep) if sweep is not None else None, backends=split_list(backends) or ["ort"],
                 precisions=split_list(precisions) or ["fp32"], batch_sizes=sizes or (1,), repeats=repeats,
                 warmup=warmup, input_path=input_path, tta=bool(tta), step_size=step_size, device=device,
                 folds=split_list(folds) or None, model_dir=model_dir, labels_dir=labels_dir, demo=demo,
                 out_dir=out_dir, name=name, work_dir=work_dir, round_to=round_to, case_repeats=case_repeats or 1,
                 sequential=sequential, progress=progress)


def _check_form(bundle: Path | None, is_sweep: bool) -> None:
    """Exactly one of the two forms: a BUNDLE, or a sweep."""
    if bundle is not None and is_sweep:
        raise ConfigurationError(
            f"Give either BUNDLE ({bundle}) to bench one bundle or --sweep-rank-factor/--demo for a sweep, not both."
        )
    if bundle is None and not is_sweep:
        raise ConfigurationError("Give a BUNDLE to bench, or --sweep-rank-factor with -m MODEL_DIR (or --demo) for a sweep.")


def _bench_sweep(
    factors: tuple[float, ...] | None, *, backends: list[str], precisions: list[str], batch_sizes: tuple[int, ...],
    repeats: int, warmup: int, input_path: Path | None, tta: bool, step_size: float, device: str,
    folds: list[str] | None, model_dir: Path | None, labels_dir: Path | None, demo: bool, out_dir: Path | None,
    name: str, work_dir: Path | None, round_to: int, case_repeats: int, sequential: bool, progress: bool,
) -> None:
    if len(backends) != 1:
        raise ConfigurationError(f"A sweep compares one backend, got {', '.join(backends)}.")
    if len(precisions) != 1:
        raise ConfigurationError(f"A sweep runs one precision, got {', '.join(precisions)}.")
    if out_dir is None:
        raise ConfigurationError("A sweep needs --out-dir DIR for its JSON and PNG.")
    model_dir, input_path, labels_dir, title_model = _sweep_sources(
        demo, model_dir=model_dir, input_path=input_path, labels_dir=labels_dir, progress=progress
    )
    from tucker_export.validation.sweep import SWEEP_FACTORS, sweep_rank_factors, work_folder
    from tucker_export.validation.sweep_report import format_sweep_table, write_sweep_outputs

    with work_folder(work_dir) as folder:
        report = sweep_rank_factors(
            model_dir, factors or SWEEP_FACTORS, work_dir=folder, images_dir=input_path, labels_dir=labels_dir,
            backend=backends[0], precision=precisions[0], folds=folds,
            use_mirroring=tta, step_size=step_size, device=device, batch_sizes=batch_sizes, warmup=warmup,
            repeats=repeats, interleave=not sequential, round_to=round_to, case_repeats=case_repeats,
            progress=progress,
        )
    title = None
    if title_model is not None:
        s = report.settings
        title = (f"Tucker rank-factor sweep, {title_model}\n{s['backend']} {s['precision']} on {s['device']}, "
                 f"TTA {s['tta']}, {len(report.cases)} held-out case(s); point labels = rank factor")
        report.settings["title"] = title
    json_file, png_file = write_sweep_outputs(report, out_dir, name, title=title)
    click.echo(format_sweep_table(report))
    click.echo(f"\nwrote {json_file} and {png_file}")


def _sweep_sources(
    demo: bool, *, model_dir: Path | None, input_path: Path | None, labels_dir: Path | None, progress: bool
) -> tuple[Path, Path, Path | None, str | None]:
    """The sweep's model, images and labels, and for the demo the model's name in the plot title."""
    if demo:
        _refuse({"-m/--model": model_dir, "-i/--input": input_path, "--labels": labels_dir},
                "without --demo (the demo brings its own model, images and labels)")
        from tucker_export.demo import ensure_demo_model

        model = ensure_demo_model()
        title_model = f"demo model ({model.dataset_name}, folds {', '.join(map(str, model.folds))})"
        return model.model_dir, model.test_images_dir, model.test_labels_dir, title_model
    if model_dir is None:
        raise ConfigurationError("A sweep needs the original model: -m MODEL_DIR (or --demo).")
    if input_path is None:
        raise ConfigurationError("A sweep needs images to segment and compare: -i IMAGES (or --demo).")
    return model_dir, input_path, labels_dir, None


def _bench_one(bundle: Path, *, backends: list[str], precisions: list[str], batch_sizes: tuple[int, ...], repeats: int,
               warmup: int, input_path: Path | None, tta: bool, step_size: float, device: str, folds: list[str],
               json_path: Path | None, progress: bool) -> None:
    from tucker_export.validation.bench import bench_bundle, format_bench_report

    report = bench_bundle(
        bundle, backends=backends, precisions=precisions, batch_sizes=batch_sizes, warmup=warmup, repeats=repeats,
        input_dir=input_path, folds=folds or None, device=device, use_mirroring=tta, step_size=step_size,
        progress=progress,
    )
    if json_path is not None and str(json_path) == "-":
        click.echo(json.dumps(report.to_dict(), indent=2))
        return
    click.echo(format_bench_report(report))
    if json_path is not None:
        report.write_json(json_path)
        click.echo(f"\nwrote {json_path}")
