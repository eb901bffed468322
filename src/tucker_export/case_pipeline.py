"""Cases through check + preprocess -> network -> export, the slow ends overlapped with the network.

With a fast engine, nnU-Net's preprocessing (read, crop, resample; single-threaded) and export
(resample the logits back, argmax, write) become a large share of a case. ``run_cases`` prepares
the next case and exports the previous one in worker threads while the network runs the current
one. It is bounded: at most one case is prepared ahead and one export is in flight, so at most
three cases are in memory at once. Each stage is timed where it runs, so with overlap the stages
of a case add up to more than the wall time they took.

Outputs are written to a temporary name and renamed, so an interrupted run leaves no partial
file and a rerun skips the finished cases.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from tucker_export.errors import BrokenScanError, TuckerExportError
from tucker_export.nnunet.cases import Case
from tucker_export.nnunet.reading import PreparedCase, preprocess_case

if TYPE_CHECKING:
    from tucker_export.nnunet.loading import ModelSpec

logger = logging.getLogger(__name__)

Status = Literal["done", "skipped", "failed"]
STAGES = ("check", "read", "preprocess", "network", "export")
_CASE_ERRORS = (TuckerExportError, RuntimeError, OSError, ValueError)


@dataclass
class CaseResult:
    name: str
    status: Status
    output: Path | None = None
    error: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    peak_rss_bytes: int | None = None  # the process's high-water mark when the case was written
    worker: str | None = None  # which worker ran it, when the cases ran on several (``scaleout``)
    device: str | None = None  # and that worker's device kind


def output_path(output_dir: Path, case_name: str, file_ending: str) -> Path:
    return output_dir / f"{case_name}{file_ending}"


def _failure(case: Case, error: BaseException) -> CaseResult:
    if isinstance(error, BrokenScanError):
        logger.error("Case %s not segmented: %s.", case.name, error)
        return CaseResult(case.name, "failed", error=str(error))
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    logger.error("Case %s failed: %s", case.name, message)
    logger.debug("Traceback of case %s:", case.name, exc_info=error)
    return CaseResult(case.name, "failed", error=message)


def run_cases(
    cases: Sequence[Case],
    *,
    spec,
    predict: Callable[[torch.Tensor], torch.Tensor],
    output_dir: Path,
    overwrite: bool = False,
    save_probabilities: bool = False,
    strict: bool = False,
    overlap: bool = True,
    fast_export: bool = True,
    progress: Callable[[Iterable[Case]], Iterable[Case]] = lambda cases: cases,
) -> list[CaseResult]:
    """Segment ``cases`` into ``output_dir``, in order; a failed case is reported and the others go on.

    ``predict``: preprocessed data (channels first) -> logits, e.g. an ``EnginePredictor``'s
    ``predict_logits_from_preprocessed_data``. ``overlap=False`` runs every stage in this thread,
    one case after the other (for measuring what the overlap gains). ``fast_export``: the chunked
    PyTorch export (``nnunet.fast_export``) where it reproduces stock's, else stock's own.
    """
    from tucker_export.nnunet.fast_export import fast_export_unsupported

    stock_reason = "the stock export was asked for" if not fast_export else fast_export_unsupported(
        spec, save_probabilities=save_probabilities)
    if stock_reason:
        logger.debug("Exporting with stock nnU-Net: %s.", stock_reason)
    file_ending = spec.dataset_json["file_ending"]
    results: dict[str, CaseResult] = {}
    todo = _cases_to_do(cases, output_dir, file_ending, overwrite, results)
    stages = _CaseStages(spec, output_dir, file_ending, strict=strict, save_probabilities=save_probabilities,
                         stock_reason=stock_reason)
    _run_todo(todo, stages, predict, results, workers=1 if overlap else 0, progress=progress)
    return [results[case.name] for case in cases]


def _cases_to_do(
    cases: Sequence[Case], output_dir: Path, file_ending: str, overwrite: bool, results: dict[str, CaseResult]
) -> list[Case]:
    """The cases still to segment; those with an output already are recorded in ``results`` as skipped."""
    todo = []
    for case in cases:
        target = output_path(output_dir, case.name, file_ending)
        if target.exists() and not overwrite:
            logger.debug("%s: %s exists, skipped (overwrite redoes it).", case.name, target)
            results[case.name] = CaseResult(case.name, "skipped", target)
        else:
            todo.append(case)
    return todo


@dataclass(frozen=True)
class _CaseStages:
    """The two ends of a case that run in worker threads: preprocessing before the network, export after."""

    spec: ModelSpec
    output_dir: Path
    file_ending: str
    strict: bool
    save_probabilities: bool
    stock_reason: str | None  # why the export goes through stock nnU-Net; None for the fast export

    def prepare(self, case: Case) -> PreparedCase:
        return preprocess_case(case, self.spec, strict=self.strict, stock_export=bool(self.stock_reason))

    def export(self, case: Case, logits: torch.Tensor, prepared: PreparedCase) -> float:
        from nnunetv2.inference.export_prediction import export_prediction_from_logits

        from tucker_export.nnunet.fast_export import export_segmentation

        spec = self.spec
        started = time.perf_counter()

        def stock(truncated: str) -> None:
            export_prediction_from_logits(logits, prepared.properties, spec.configuration_manager, spec.plans_manager,
                                          spec.dataset_json, truncated, self.save_probabilities)

        def fast(truncated: str) -> None:
            export_segmentation(logits, prepared.properties, spec, truncated)

        export_atomically(
            stock if self.stock_reason else fast,
            output_path(self.output_dir, case.name, self.file_ending),
            self.file_ending,
            extra_suffixes=(".npz", ".pkl") if self.save_probabilities else (),
        )
        return time.perf_counter() - started


def _run_todo(
    todo: list[Case], stages: _CaseStages, predict: Callable[[torch.Tensor], torch.Tensor],
    results: dict[str, CaseResult], *, workers: int, progress: Callable[[Iterable[Case]], Iterable[Case]],
) -> None:
    """Run the network on each case in turn while the next is prepared and the previous exported."""
    with _pool(workers, "prepare") as prepare_pool, _pool(workers, "export") as export_pool:
        ahead: Future | None = prepare_pool.submit(stages.prepare, todo[0]) if todo else None
        in_flight: tuple[Case, Future, dict[str, float], list[str]] | None = None
        for index, case in enumerate(progress(todo)):
            current, ahead = ahead, (
                prepare_pool.submit(stages.prepare, todo[index + 1]) if index + 1 < len(todo) else None
            )
            try:
                ready: PreparedCase = current.result()
            except _CASE_ERRORS as error:
                results[case.name] = _failure(case, error)
                continue
            started = time.perf_counter()
            try:
                logits = predict(torch.from_numpy(ready.data)).cpu()
            except _CASE_ERRORS as error:
                results[case.name] = _failure(case, error)
                continue
            seconds = {**ready.seconds, "network": time.perf_counter() - started}
            if in_flight is not None:  # one export at a time: bounded memory
                _finish_export(in_flight, results, stages.output_dir, stages.file_ending)
            in_flight = (case, export_pool.submit(stages.export, case, logits, ready), seconds, ready.warnings)
            del logits, ready
        if in_flight is not None:
            _finish_export(in_flight, results, stages.output_dir, stages.file_ending)


def _finish_export(in_flight, results: dict[str, CaseResult], output_dir: Path, file_ending: str) -> None:
    case, future, seconds, warnings = in_flight
    try:
        seconds["export"] = future.result()
    except _CASE_ERRORS as error:
        results[case.name] = _failure(case, error)
        return
    logger.debug("%s: %s", case.name, ", ".join(f"{k} {seconds[k]:.2f} s" for k in STAGES))
    for warning in warnings:
        logger.warning("Case %s: %s.", case.name, warning)
    results[case.name] = CaseResult(case.name, "done", output_path(output_dir, case.name, file_ending),
                                    seconds=seconds, warnings=warnings, peak_rss_bytes=_process_peak_rss())


def _process_peak_rss() -> int | None:
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux


class _Inline:
    """A stand-in executor that runs the work at submit time (``overlap=False``)."""

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except _CASE_ERRORS as error:
            future.set_exception(error)
        return future


@contextlib.contextmanager
def _pool(workers: int, name: str):
    if workers == 0:
        yield _Inline()
        return
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"tucker-export-{name}")
    try:
        yield pool
    finally:
        # On Ctrl-C: nothing new starts, a running export finishes its atomic rename.
        pool.shutdown(wait=True, cancel_futures=True)


def partial_outputs(output_dir: Path, case_name: str) -> list[Path]:
    """Temporary files ``export_atomically`` left for ``case_name`` when its process was killed outright."""
    import re

    pattern = re.compile(rf"^\.{re.escape(case_name)}\.[A-Za-z0-9_]{{8}}\.")
    return sorted(p for p in output_dir.glob(f".{case_name}.*") if pattern.match(p.name))


def export_atomically(write, target: Path, file_ending: str, extra_suffixes: tuple[str, ...]) -> None:
    """Let nnU-Net write to a hidden temporary name, then rename; nothing partial survives a crash or Ctrl-C."""
    case_name = target.name[: -len(file_ending)]
    fd, tmp_name = tempfile.mkstemp(prefix=f".{case_name}.", suffix=".partial", dir=target.parent)
    os.close(fd)
    os.unlink(tmp_name)
    truncated = tmp_name[: -len(".partial")]
    written = [Path(truncated + file_ending), *(Path(truncated + s) for s in extra_suffixes)]
    try:
        write(truncated)
        for suffix in extra_suffixes:
            os.replace(truncated + suffix, target.parent / f"{case_name}{suffix}")
        os.replace(truncated + file_ending, target)
    finally:
        for path in written:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
