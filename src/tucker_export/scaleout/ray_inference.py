"""`tucker-export infer --ray`: the cases of a folder segmented by Ray actors, one device each.

Each actor (``CaseWorker``) owns one device: a GPU Ray assigned to it, or ``cpus_per_worker`` CPU
cores. It detects that device's kind itself and opens its engines through the same selection as
single-process `infer` (``open_fold_engines``): a TensorRT engine only where its key matches the
worker's GPU kind, an OpenVINO model only where it matches the worker's CPU kind, else ONNX Runtime
or PyTorch. Each worker reads, checks, preprocesses, runs and exports its cases itself
(``case_pipeline.run_cases``), so the driver only hands out case names and collects results.

The guarantees of single-process `infer` hold: outputs are written atomically, a rerun skips
finished cases (before any worker starts), a failed case is reported while the others finish. A
worker that dies (its process killed, the node lost) has its case handed to another worker, at most
``max_retries`` times per case; a replacement worker is started in its place, and the dead
worker's temporary files for that case are removed.

Every path (bundle, scans, output folder) must be visible at the same path on every node: a local
run shares this machine's disk; a cluster needs a shared filesystem.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tucker_export.case_pipeline import CaseResult, output_path, partial_outputs, run_cases
from tucker_export.errors import BundleError, ConfigurationError, TuckerExportError
from tucker_export.nnunet.cases import Case

logger = logging.getLogger(__name__)

DEFAULT_MAX_RETRIES = 2
# Ray's own object store holds only case names and results here; its default (30 % of RAM) is
# reserved from /dev/shm for nothing.
LOCAL_OBJECT_STORE_BYTES = 256 * 2**20


def import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigurationError(
            "--ray needs Ray, which is not installed; install it with `pip install 'tucker-export[ray]'`."
        ) from None
    return ray


@dataclass(frozen=True)
class WorkerSettings:
    """What every worker needs to segment a case exactly as single-process `infer` would."""

    bundle_path: str
    output_dir: str
    device_type: str  # "cpu" or "cuda": each worker's own device of that type
    threads: int | None
    backend: str = "auto"
    precision: str = "auto"
    folds: tuple[Any, ...] | None = None
    step_size: float = 0.5
    use_mirroring: bool = True
    batch_size: int | str = "auto"
    save_probabilities: bool = False
    overwrite: bool = False
    strict: bool = False
    fast_export: bool = True
    tile_source: str | None = None


def device_kind(device) -> str:
    """The key part engines are matched on: ``cpu:<CpuInfo.kind>`` or ``gpu:<GpuInfo.kind>``."""
    if device.type == "cuda":
        from tucker_export.engines.keys import cuda_devices

        gpus = {gpu.index: gpu for gpu in cuda_devices()}
        gpu = gpus.get(device.index or 0)
        return f"gpu:{gpu.kind}" if gpu is not None else f"gpu:unknown-{device}"
    from tucker_export.engines.cpu_keys import detect_cpu

    return f"cpu:{detect_cpu().kind}"


class CaseWorker:
    """A Ray actor: one device, its engines opened once, then one case per ``segment`` call."""

    def __init__(self, settings: WorkerSettings, name: str) -> None:
        from tucker_export.inference import parse_device

        self.settings = settings
        self.name = name
        # Ray sets CUDA_VISIBLE_DEVICES to the GPU it gave this actor, so that GPU is cuda:0 here.
        self.device = parse_device("cuda:0" if settings.device_type == "cuda" else "cpu")
        self.kind = device_kind(self.device)
        self._stack = contextlib.ExitStack()
        self._predictor = None
        self._spec = None

    def describe(self) -> dict[str, Any]:
        import socket

        return {"worker": self.name, "pid": os.getpid(), "host": socket.gethostname(), "device": self.kind,
                "threads": self.settings.threads}

    def open(self) -> dict[str, Any]:
        """Open this worker's engines (compiling a missing OpenVINO model for its CPU kind, as `infer` does)."""
        import torch

        from tucker_export.inference import make_predictor, open_fold_engines

        started = time.perf_counter()
        settings = self.settings
        if settings.threads:
            torch.set_num_threads(settings.threads)  # this actor's own process
        for label, path in (("bundle", settings.bundle_path), ("output folder", settings.output_dir)):
            if not Path(path).exists():
                raise BundleError(
                    f"Ray worker {self.name} on {self.describe()['host']} cannot see the {label} {path}; the bundle, "
                    f"scans and output folder must be at the same path on every node (a shared filesystem)."
                )
        engines = self._stack.enter_context(open_fold_engines(
            bundle_path=settings.bundle_path, model_dir=None, backend=settings.backend, precision=settings.precision,
            folds=list(settings.folds) if settings.folds else None, device=str(self.device),
            tile_source=settings.tile_source, threads=settings.threads,
        ))
        self._predictor = make_predictor(engines, step_size=settings.step_size, use_mirroring=settings.use_mirroring,
                                         batch_size=settings.batch_size, device=str(self.device), progress=False)
        self._spec = engines.spec
        return {**self.describe(), "backend": engines.backend, "reason": engines.reason,
                "precision": engines.precision, "batch_size": self._predictor.batch_size,
                "open_s": round(time.perf_counter() - started, 3)}

    def segment(self, case: Case) -> CaseResult:
        if self._predictor is None:
            raise ConfigurationError(f"Ray worker {self.name} was asked to segment before its engines were opened.")
        settings = self.settings
        (result,) = run_cases(
            [case], spec=self._spec, predict=self._predictor.predict_logits_from_preprocessed_data,
            output_dir=Path(settings.output_dir), overwrite=settings.overwrite,
            save_probabilities=settings.save_probabilities, strict=settings.strict, overlap=False,
            fast_export=settings.fast_export,
        )
        result.worker, result.device = self.name, self.kind
        return result

    def close(self) -> None:
        self._stack.close()


# ---- the driver -----------------------------------------------------------------------------------


@dataclass
class _Worker:
    name: str
    handle: Any
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Pool:
    """Live workers and how to start another; retries and replacements are counted here."""

    ray: Any
    actor_class: Any
    settings: WorkerSettings
    resources: dict[str, float]
    started: int = 0
    opened: list[dict[str, Any]] = field(default_factory=list)

    def start(self, count: int) -> list[_Worker]:
        """Start ``count`` workers and open their engines: the first of each device kind alone, since it
        may compile and record an engine in the bundle that the others of its kind then reuse."""
        workers = []
        for _ in range(count):
            name = f"worker-{self.started}"
            self.started += 1
            workers.append(_Worker(name, self.actor_class.options(**self.resources).remote(self.settings, name)))
        described = self._get([w.handle.describe.remote() for w in workers], workers)
        for worker, info in zip(workers, described):
            worker.info = info
        first_of_kind = {w.info["device"]: w for w in reversed(workers)}
        for worker in first_of_kind.values():
            worker.info = self._get([worker.handle.open.remote()], [worker])[0]
        rest = [w for w in workers if w not in first_of_kind.values()]
        for worker, info in zip(rest, self._get([w.handle.open.remote() for w in rest], rest)):
            worker.info = info
        self.opened.extend(w.info for w in workers)
        return workers

    def _get(self, refs: list, workers: list[_Worker]) -> list:
        try:
            return self.ray.get(refs)
        except self.ray.exceptions.RayTaskError as error:
            raise _library_error(error) from None
        except self.ray.exceptions.RayActorError as error:
            names = ", ".join(w.name for w in workers)
            raise TuckerExportError(f"Ray worker(s) {names} died while starting: {_first_line(error)}") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _library_error(error) -> BaseException:
    """A worker's own error (a ``TuckerExportError`` for a bad engine, bundle or setting), unwrapped."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, TuckerExportError):
        return cause
    return TuckerExportError(f"A Ray worker failed: {_first_line(cause or error)}")


@contextlib.contextmanager
def ray_session(address: str | None, *, num_cpus: int | None, num_gpus: int | None) -> Iterator[dict[str, Any]]:
    """Connect to the Ray cluster at ``address``, or start a local one (``None``/``"local"``).

    Yields what the report records: the address, the seconds Ray took to start or connect, the
    cluster's resources. A Ray started here is shut down on exit; one already running is left as is.
    """
    ray = import_ray()
    started = time.perf_counter()
    owned = not ray.is_initialized()
    local = address in (None, "", "local")
    if not local:
        _check_reachable(address)
    if owned:
        options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                   "logging_level": logging.WARNING}
        try:
            if local:
                ray.init(num_cpus=num_cpus, num_gpus=num_gpus, object_store_memory=LOCAL_OBJECT_STORE_BYTES, **options)
            else:
                ray.init(address=address, **options)
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise ConfigurationError(
                f"Could not reach the Ray cluster at {address!r} ({_first_line(error)}); start one with "
                f"`ray start --head` on its head node, or give --ray without an address for a local one."
            ) from None
    try:
        yield {"address": "local" if local else address, "started_here": owned,
               "start_s": round(time.perf_counter() - started, 3),
               "resources": {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU", "memory")}}
    finally:
        if owned:
            ray.shutdown()


def _check_reachable(address: str) -> None:
    """Fail in seconds on an address nothing listens at (Ray itself retries for minutes)."""
    import socket

    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=5):
            return
    except (OSError, ValueError) as error:
        raise ConfigurationError(
            f"Nothing answers at the Ray address {address!r} ({_first_line(error)}); give HOST:PORT of a running "
            f"cluster's head (`ray start --head` prints it), or --ray without an address for a local one."
        ) from None


def default_worker_count(resources: dict[str, float], *, device_type: str, cpus_per_worker: int) -> int:
    """One worker per GPU of the cluster, or as many ``cpus_per_worker``-core workers as its CPUs hold."""
    if device_type == "cuda":
        return max(1, int(resources.get("GPU", 0)))
    return max(1, int(resources.get("CPU", 1)) // max(1, cpus_per_worker))


def run_inference_on_ray(
    input_path: str | Path,
    output_dir: str | Path,
    *,
    bundle_path: str | Path | None = None,
    model_dir: str | Path | None = None,
    address: str | None = None,
    workers: int | None = None,
    cpus_per_worker: int = 1,
    max_retries: int = DEFAULT_MAX_RETRIES,
    backend: str = "auto",
    precision: str = "auto",
    folds: list | None = None,
    step_size: float = 0.5,
    use_mirroring: bool = True,
    batch_size: int | str = "auto",
    device: str = "cpu",
    save_probabilities: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    trust_checkpoint: bool = False,
    strict: bool = False,
    fast_export: bool = True,
    on_dispatch: Callable[[str, dict[str, Any]], None] | None = None,
):
    """Segment every case under ``input_path`` into ``output_dir`` on Ray workers; an ``InferenceReport``.

    ``address``: a Ray cluster (``auto``, ``ray://host:10001``, ...) or None for a local Ray on this
    machine with ``workers`` x ``cpus_per_worker`` CPUs. ``device="cuda"``: one GPU per worker.
    ``workers`` [default: one per GPU, or the CPUs // ``cpus_per_worker``]. ``on_dispatch(case,
    worker_info)`` is called each time a case is handed to a worker (for monitoring). The other
    options are `run_inference`'s.
    """
    from tucker_export.inference import InferenceReport
    from tucker_export.pipeline import undecomposed_bundle

    _check_options(workers, cpus_per_worker, max_retries, device)
    bundle = _resolve_bundle(bundle_path, model_dir, backend, precision, trust_checkpoint, undecomposed_bundle)
    input_path, output_dir = Path(input_path).resolve(), Path(output_dir).resolve()
    cases, results = _cases_to_do(bundle, input_path, output_dir, overwrite)
    selected_folds = bundle.resolve_folds(folds)
    if not cases:
        logger.info("Every case in %s is already segmented in %s; nothing to do (--overwrite redoes them).",
                    input_path, output_dir)
        return InferenceReport(results=[results[n] for n in results], backend="none", backend_reason="nothing to do",
                               precision=precision, folds=selected_folds, batch_size=0, overlap=False)
    output_dir.mkdir(parents=True, exist_ok=True)
    settings = WorkerSettings(
        bundle_path=str(bundle.path), output_dir=str(output_dir), device_type=device,
        threads=cpus_per_worker if device == "cpu" else None, backend=backend, precision=precision,
        folds=tuple(selected_folds), step_size=step_size, use_mirroring=use_mirroring, batch_size=batch_size,
        save_probabilities=save_probabilities, overwrite=overwrite, strict=strict, fast_export=fast_export,
        tile_source=str(input_path),
    )
    local_cpus = (workers or max(1, len(os.sched_getaffinity(0)) // cpus_per_worker)) * cpus_per_worker
    with ray_session(address, num_cpus=local_cpus if device == "cpu" else None, num_gpus=None) as session:
        ray = import_ray()
        count = min(len(cases), workers or default_worker_count(
            session["resources"], device_type=device, cpus_per_worker=cpus_per_worker))
        pool = _Pool(ray, ray.remote(CaseWorker), settings,
                     {"num_cpus": cpus_per_worker, "num_gpus": 1 if device == "cuda" else 0})
        started = time.perf_counter()
        live = pool.start(count)
        session["workers_start_s"] = round(time.perf_counter() - started, 3)
        logger.info("%d Ray worker(s) ready in %.1f s (Ray itself %.1f s): %s.", len(live), session["workers_start_s"],
                    session["start_s"], "; ".join(f"{w.name} {w.info['device']} {w.info['backend']}" for w in live))
        started = time.perf_counter()
        results.update(_dispatch(pool, live, cases, output_dir=output_dir, file_ending=bundle.spec.dataset_json["file_ending"],
                                 max_retries=max_retries, progress=progress, on_dispatch=on_dispatch))
        wall = time.perf_counter() - started
    return _report(InferenceReport, [results[name] for name in results], pool.opened, selected_folds, wall, session)


def _check_options(workers: int | None, cpus_per_worker: int, max_retries: int, device: str) -> None:
    if cpus_per_worker < 1 or (workers is not None and workers < 1) or max_retries < 0:
        raise ConfigurationError(
            f"Workers and CPUs per worker must be at least 1 and retries at least 0, got {workers}, "
            f"{cpus_per_worker} and {max_retries}."
        )
    if device not in ("cpu", "cuda"):
        raise ConfigurationError(f"With Ray, the device is 'cpu' or 'cuda' (one GPU per worker), got {device!r}.")


def _report(report_class: Any, results: list, opened: list[dict[str, Any]], folds: Any, wall: float,
            session: dict[str, Any]) -> Any:
    """The run's InferenceReport: the backends, precisions and reasons of every worker that opened."""
    reason = _joined(f"{o['worker']}: {o['reason']}" for o in opened[:1])
    if len(opened) > 1:
        reason += f" (and {len(opened) - 1} more worker(s))"
    return report_class(
        results=results, backend=_joined(o["backend"] for o in opened), backend_reason=reason,
        precision=_joined(o["precision"] for o in opened), folds=folds, batch_size=opened[0]["batch_size"],
        overlap=False, cases_wall_s=wall, workers=opened, ray=session,
    )


def _joined(values) -> str:
    return ", ".join(dict.fromkeys(values))


def _resolve_bundle(bundle_path, model_dir, backend, precision, trust_checkpoint, undecomposed_bundle):
    from tucker_export.bundle import Bundle
    from tucker_export.engines.selection import normalize_backend, onnx_precision

    if (bundle_path is None) == (model_dir is None):
        raise ConfigurationError("Give exactly one of a bundle (-b) or an nnU-Net model folder (-m).")
    if bundle_path is not None:
        return Bundle.load(Path(bundle_path).resolve())
    # Made once here, so that the workers find it rather than racing to make it.
    wants_onnx = normalize_backend(backend) != "torch"
    return undecomposed_bundle(Path(model_dir).resolve(), precision=onnx_precision(precision) if wants_onnx else None,
                               trust_checkpoint=trust_checkpoint)


def _cases_to_do(bundle, input_path: Path, output_dir: Path, overwrite: bool) -> tuple[list[Case], dict[str, CaseResult]]:
    """The cases still to segment, and a result slot per case in input order (finished ones: skipped)."""
    from tucker_export.nnunet.cases import discover_cases

    spec = bundle.spec
    file_ending = spec.dataset_json["file_ending"]
    cases = discover_cases(input_path, num_channels=spec.num_input_channels, file_ending=file_ending)
    results: dict[str, CaseResult] = {}
    todo = []
    for case in cases:
        target = output_path(output_dir, case.name, file_ending)
        results[case.name] = CaseResult(case.name, "skipped", target)  # replaced when it runs
        if overwrite or not target.exists():
            todo.append(case)
    return todo, results


def _dispatch(pool: _Pool, live: list[_Worker], cases: list[Case], *, output_dir: Path, file_ending: str,
              max_retries: int, progress: bool, on_dispatch) -> dict[str, CaseResult]:
    """Hand each case to the next idle worker until all are done; a dead worker's case goes back in line."""
    from tqdm import tqdm

    ray = pool.ray
    queue: deque[Case] = deque(cases)
    attempts: dict[str, int] = {}
    idle: deque[_Worker] = deque(live)
    running: dict[Any, tuple[_Worker, Case]] = {}
    results: dict[str, CaseResult] = {}
    bar = tqdm(total=len(cases), desc="cases", unit="case", disable=not progress)
    try:
        while queue or running:
            while idle and queue:
                worker, case = idle.popleft(), queue.popleft()
                running[worker.handle.segment.remote(case)] = (worker, case)
                if on_dispatch is not None:
                    on_dispatch(case.name, dict(worker.info))
            if not running:
                raise TuckerExportError("Every Ray worker died; cases left: " + ", ".join(c.name for c in queue) + ".")
            (ref,), _ = ray.wait(list(running), num_returns=1)
            worker, case = running.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayActorError as error:
                _clean_partials(output_dir, case.name)
                attempts[case.name] = attempts.get(case.name, 0) + 1
                logger.warning("Ray worker %s (%s) died during case %s: %s", worker.name, worker.info.get("device"),
                               case.name, _first_line(error))
                if attempts[case.name] > max_retries:
                    results[case.name] = CaseResult(
                        case.name, "failed", error=f"its worker died {attempts[case.name]} time(s) (the limit is "
                                                   f"{max_retries} retries); last: {_first_line(error)}")
                    bar.update(1)
                else:
                    queue.appendleft(case)
                if pool.started < len(live) + max_retries * len(cases):  # bounded: never an endless restart loop
                    idle.extend(pool.start(1))
                continue
            except ray.exceptions.RayTaskError as error:
                result = CaseResult(case.name, "failed", error=_first_line(getattr(error, "cause", None) or error),
                                    worker=worker.name, device=worker.info.get("device"))
            if result.status == "failed":
                logger.error("Case %s failed on %s: %s", case.name, worker.name, result.error)
            for warning in result.warnings:
                logger.warning("Case %s: %s.", case.name, warning)
            if attempts.get(case.name):
                result = replace(result, warnings=[*result.warnings, f"retried after {attempts[case.name]} worker death(s)"])
            results[case.name] = result
            idle.append(worker)
            bar.update(1)
    finally:
        bar.close()
        for worker, case in running.values():  # interrupted: stop the work, leave nothing half-written
            with contextlib.suppress(Exception):
                ray.kill(worker.handle)
            _clean_partials(output_dir, case.name)
    return results


def _clean_partials(output_dir: Path, case_name: str) -> None:
    for path in partial_outputs(output_dir, case_name):
        logger.debug("Removing %s, left by a worker that died mid-export.", path)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
