"""A Triton Inference Server model repository from a bundle: one model per fold and precision.

Triton serves the network, one batch of patch-sized tiles per request; the sliding window,
preprocessing and resampling stay with the client (as in `infer`). Layout::

    REPO/<name>_fold_<f>_<precision>/config.pbtxt
    REPO/<name>_fold_<f>_<precision>/1/model.onnx                    (--backend onnx)
    REPO/<name>_fold_<f>_<precision>_trt/1/model.<gpu-kind>.plan     (--backend tensorrt, one per GPU kind)

Every decision (names, dtypes, dims, batch limits, instance groups, which plan serves which GPU)
is made here as a plain dict in ``ModelConfig``'s JSON form. It is turned into ``config.pbtxt``
through Triton's own protobuf schema (``tritonclient``'s ``model_config_pb2``), and each written
file is parsed back with ``text_format`` and compared, so a config Triton would reject is never
left in the repository.

TensorRT plans are picked by Triton per compute capability (``cc_model_filenames``); each plan is
labelled with its engine key in the model's ``parameters``. A plan runs only under the TensorRT
version it was built with, so the server's TensorRT must match the version recorded there.
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tucker_export._io import sha256_file, staged_folder, write_text_atomic
from tucker_export.bundle import Bundle, export_command, onnx_key
from tucker_export.engines.keys import ENGINES_SECTION, check_engine_file, rebuild_command
from tucker_export.errors import BundleError, ConfigurationError, EngineError

logger = logging.getLogger("tucker_export")

BACKENDS = ("onnx", "tensorrt")
CONFIG_NAME = "config.pbtxt"
VERSION_DIR = "1"

# ONNX TensorProto element types -> Triton DataType names.
_ONNX_TO_TRITON = {1: "TYPE_FP32", 10: "TYPE_FP16", 16: "TYPE_BF16", 11: "TYPE_FP64", 6: "TYPE_INT32",
                   7: "TYPE_INT64", 2: "TYPE_UINT8", 3: "TYPE_INT8", 9: "TYPE_BOOL"}
_MANIFEST_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16"}


@dataclass(frozen=True)
class TensorSpec:
    """One network input or output as Triton describes it: dims exclude the batch axis when batched."""

    name: str
    data_type: str
    dims: tuple[int, ...]

    def to_config(self) -> dict[str, Any]:
        return {"name": self.name, "data_type": self.data_type, "dims": list(self.dims)}


@dataclass(frozen=True)
class TritonOptions:
    """What the user chooses; everything else comes from the bundle."""

    backend: str = "onnx"
    precisions: tuple[str, ...] = ("fp32",)
    folds: tuple[str, ...] | None = None
    gpus: tuple[int, ...] | None = (0,)  # None: CPU instances (onnx only)
    cpu_instances: int = 1
    name: str | None = None
    queue_delay_us: int = 2000
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigurationError(f"Unknown Triton backend {self.backend!r}; choose one of {', '.join(BACKENDS)}.")
        if self.backend == "tensorrt" and self.gpus is None:
            raise ConfigurationError("TensorRT plans run on GPUs only; give the serving GPUs (e.g. 0,1) instead of none.")
        if self.cpu_instances < 1 or self.queue_delay_us < 0:
            raise ConfigurationError(
                f"CPU instances must be >= 1 and the queue delay >= 0 (got {self.cpu_instances} and {self.queue_delay_us})."
            )


@dataclass
class TritonModel:
    name: str
    backend: str
    fold: str
    precision: str
    max_batch_size: int
    files: list[str]
    instance_groups: list[dict[str, Any]]
    engine_keys: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class TritonExport:
    repository: Path
    models: list[TritonModel]

    def to_dict(self) -> dict[str, Any]:
        return {"repository": str(self.repository), "models": [m.to_dict() for m in self.models]}

    def summary(self) -> str:
        lines = [f"Triton model repository {self.repository}: {len(self.models)} model(s), configs checked against "
                 "Triton's ModelConfig schema."]
        for model in self.models:
            where = ", ".join(_describe_group(g) for g in model.instance_groups)
            plans = f"; plans for {', '.join(model.engine_keys)}" if model.engine_keys else ""
            lines.append(f"  {model.name}: {model.backend}, max_batch_size {model.max_batch_size}, {where}{plans}")
        return "\n".join(lines)


def _describe_group(group: dict[str, Any]) -> str:
    if group["kind"] == "KIND_CPU":
        return f"{group['count']} CPU instance(s)"
    return f"GPU {','.join(str(g) for g in group['gpus'])}"


# ---- plain decisions ----------------------------------------------------------------------------


def parse_gpu_list(text: str) -> tuple[int, ...] | None:
    """``"0,1"`` -> (0, 1); ``"none"`` or ``"cpu"`` -> None (CPU instances)."""
    if text.strip().lower() in ("none", "cpu"):
        return None
    parts = [p for p in text.replace(",", " ").split() if p]
    if not parts or not all(p.isdigit() for p in parts):
        raise ConfigurationError(f"GPU list {text!r} is not GPU numbers like 0,1 or 'none'.")
    return tuple(dict.fromkeys(int(p) for p in parts))


def model_name(prefix: str, fold: Any, precision: str, backend: str) -> str:
    """Triton model names are folder names: keep letters, digits, '_', '-' and '.'."""
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", prefix).strip("_.") or "tucker"
    return f"{base}_fold_{fold}_{precision}" + ("_trt" if backend == "tensorrt" else "")


def tensor_specs(io: dict[str, list[dict[str, Any]]]) -> tuple[bool, list[TensorSpec], list[TensorSpec]]:
    """(batched, inputs, outputs) from ONNX graph I/O ``{"inputs": [...], "outputs": [...]}``.

    Each entry is ``{"name", "elem_type", "shape"}`` with ``None`` for a symbolic dim. The model
    is batched when every tensor's first dim is symbolic; then Triton's dims leave it out.
    """
    tensors = io["inputs"] + io["outputs"]
    if not io["inputs"] or not io["outputs"]:
        raise BundleError("The ONNX graph has no inputs or no outputs; re-export it.")
    batched = all(t["shape"] and t["shape"][0] is None for t in tensors)
    specs = []
    for tensor in tensors:
        dims = list(tensor["shape"][1:] if batched else tensor["shape"])
        if any(d is None for d in dims):
            raise BundleError(f"ONNX tensor {tensor['name']!r} has a symbolic dim besides the batch axis "
                              f"({tensor['shape']}); Triton needs the patch dims fixed.")
        data_type = _ONNX_TO_TRITON.get(tensor["elem_type"])
        if data_type is None:
            raise BundleError(f"ONNX tensor {tensor['name']!r} has element type {tensor['elem_type']}, which Triton "
                              "configs here do not map.")
        specs.append(TensorSpec(tensor["name"], data_type, tuple(int(d) for d in dims)))
    return batched, specs[: len(io["inputs"])], specs[len(io["inputs"]):]


def check_against_manifest(entry: dict[str, Any], inputs: list[TensorSpec], outputs: list[TensorSpec],
                           batched: bool, onnx_file: Path, command: str) -> None:
    """The ONNX file's first input and output must be the ones the bundle recorded (name, dtype, dims)."""
    problems = []
    for role, spec in (("input", inputs[0]), ("output", outputs[0])):
        recorded = entry.get(role, {})
        shape = recorded.get("shape", [])
        dims = tuple(int(d) for d in (shape[1:] if batched else shape) if not isinstance(d, str))
        dtype = _MANIFEST_DTYPES.get(recorded.get("dtype", ""), recorded.get("dtype"))
        observed = (spec.name, spec.data_type, spec.dims)
        if (recorded.get("name"), dtype, dims) != observed:
            problems.append(f"{role} {observed} vs recorded {(recorded.get('name'), dtype, dims)}")
    if problems:
        raise BundleError(f"ONNX file {onnx_file} does not match the bundle ({'; '.join(problems)}); re-export it "
                          f"with `{command}`.")


def instance_groups(gpus: tuple[int, ...] | None, cpu_instances: int) -> list[dict[str, Any]]:
    """One instance group per serving GPU (so each GPU gets its own model instance), or CPU instances."""
    if gpus is None:
        return [{"name": "cpu", "kind": "KIND_CPU", "count": cpu_instances}]
    return [{"name": f"gpu{index}", "kind": "KIND_GPU", "count": 1, "gpus": [index]} for index in gpus]


def model_config(*, name: str, backend: str, max_batch_size: int, preferred_batch: int, inputs: list[TensorSpec],
                 outputs: list[TensorSpec], groups: list[dict[str, Any]], queue_delay_us: int,
                 parameters: dict[str, str], cc_model_filenames: dict[str, str] | None = None) -> dict[str, Any]:
    """``ModelConfig`` in protobuf's JSON form (field names as in model_config.proto)."""
    config: dict[str, Any] = {
        "name": name,
        "backend": "onnxruntime" if backend == "onnx" else "tensorrt",
        "max_batch_size": max_batch_size,
        "input": [spec.to_config() for spec in inputs],
        "output": [spec.to_config() for spec in outputs],
        "instance_group": groups,
        "parameters": {key: {"string_value": value} for key, value in sorted(parameters.items())},
    }
    if backend == "onnx":
        config["default_model_filename"] = "model.onnx"
    if cc_model_filenames:
        config["cc_model_filenames"] = dict(sorted(cc_model_filenames.items()))
    if max_batch_size > 0:
        config["dynamic_batching"] = {"preferred_batch_size": [min(preferred_batch, max_batch_size)],
                                      "max_queue_delay_microseconds": queue_delay_us}
    return config


def plans_by_compute_capability(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Triton picks a plan by compute capability alone ("9.0"): two GPU kinds of one capability are ambiguous."""
    chosen: dict[str, dict[str, Any]] = {}
    for record in sorted(records, key=lambda r: r["gpu"]["kind"]):
        major, minor = record["gpu"]["compute_capability"]
        cc = f"{major}.{minor}"
        if cc in chosen:
            raise ConfigurationError(
                f"Triton chooses TensorRT plans by compute capability only, and engines for {chosen[cc]['gpu']['kind']} "
                f"and {record['gpu']['kind']} share {cc}; export one repository per GPU kind with --gpu-kind."
            )
        chosen[cc] = record
    versions = sorted({r["tensorrt"]["version"] for r in records})
    if len(versions) > 1:
        raise ConfigurationError(
            f"The engines were built with TensorRT {', '.join(versions)}, and one Triton server runs one TensorRT "
            "version; rebuild them with one version, or choose the GPU kinds with --gpu-kind."
        )
    return chosen


# ---- reading the bundle -------------------------------------------------------------------------


def read_onnx_io(path: Path) -> dict[str, list[dict[str, Any]]]:
    """Graph inputs (initializers excluded) and outputs with element type and dims; weights are not loaded."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # onnx raises DecodeError and others for a damaged file
        raise BundleError(f"ONNX file {path} cannot be read ({error}); re-export it.") from None
    initializers = {init.name for init in model.graph.initializer}

    def describe(value: Any) -> dict[str, Any]:
        tensor = value.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
        return {"name": value.name, "elem_type": tensor.elem_type, "shape": shape}

    return {"inputs": [describe(v) for v in model.graph.input if v.name not in initializers],
            "outputs": [describe(v) for v in model.graph.output]}


def _engine_records(bundle: Bundle, fold: Any, precision: str, onnx_sha256: str,
                    gpu_kinds: tuple[str, ...] | None) -> list[dict[str, Any]]:
    command = rebuild_command(bundle.path, precision)
    records = [r for r in bundle.engine_records(ENGINES_SECTION).values()
               if str(r.get("fold")) == str(fold) and r.get("precision") == precision]
    if gpu_kinds is not None:
        records = [r for r in records if r.get("gpu", {}).get("kind") in gpu_kinds]
    if not records:
        which = f" for GPU kind {', '.join(gpu_kinds)}" if gpu_kinds else ""
        raise EngineError(f"Bundle {bundle.path} has no TensorRT engine of fold {fold} {precision}{which}; build them "
                          f"on each serving GPU kind with `{command}`, or use --backend onnx.")
    stale = [r["gpu"]["kind"] for r in records if r.get("onnx", {}).get("sha256") != onnx_sha256]
    if stale:
        raise EngineError(f"The TensorRT engines of fold {fold} {precision} for {', '.join(stale)} were built from an "
                          f"older ONNX export; rebuild them with `{command}`.")
    return records


def _schema() -> tuple[Any, Any, Any]:
    try:
        from google.protobuf import json_format, text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        raise ConfigurationError(
            "export-triton checks every config against Triton's own schema, which needs tritonclient; install it "
            "with `pip install 'tucker-export[triton]'`."
        ) from None
    return model_config_pb2, json_format, text_format


def config_message(config: dict[str, Any]) -> Any:
    """``config`` as Triton's ``ModelConfig`` message, refused when Triton's schema does not accept it."""
    model_config_pb2, json_format, _ = _schema()
    try:
        return json_format.ParseDict(config, model_config_pb2.ModelConfig())
    except json_format.ParseError as error:
        raise ConfigurationError(f"The Triton config of {config.get('name')} breaks Triton's schema ({error}).") from None


def render_config(config: dict[str, Any]) -> str:
    """``config.pbtxt`` text of ``config``."""
    _, _, text_format = _schema()
    return text_format.MessageToString(config_message(config))


def parse_config(text: str) -> Any:
    """``config.pbtxt`` text parsed into Triton's ``ModelConfig`` message."""
    model_config_pb2, _, text_format = _schema()
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def _write_model(target: Path, config: dict[str, Any], files: dict[str, Path]) -> None:
    """Stage ``config.pbtxt`` and ``1/<files>``, check the written config parses to the same message, then swap in."""
    _, _, text_format = _schema()
    expected = config_message(config)
    text = text_format.MessageToString(expected)
    with staged_folder(target) as staging:
        write_text_atomic(staging / CONFIG_NAME, text)
        if parse_config((staging / CONFIG_NAME).read_text()) != expected:
            raise ConfigurationError(f"The written {CONFIG_NAME} of {config['name']} does not parse back to its config.")
        (staging / VERSION_DIR).mkdir()
        for name, source in files.items():
            shutil.copyfile(source, staging / VERSION_DIR / name)


# ---- the export ---------------------------------------------------------------------------------


def export_triton_repository(bundle_path: str | Path, repository: str | Path, options: TritonOptions | None = None,
                             *, gpu_kinds: tuple[str, ...] | None = None) -> TritonExport:
    """Write one Triton model per fold and precision of ``bundle_path`` into ``repository``.

    Every model is checked (ONNX file against the manifest, engines against the ONNX, config
    against Triton's schema) before any is written; each model folder is swapped in whole, and an
    existing one is replaced only with ``options.overwrite``.
    """
    options = options or TritonOptions()
    _schema()  # a missing tritonclient fails before any work
    bundle = Bundle.load(bundle_path)
    repository = Path(repository)
    if repository.exists() and not repository.is_dir():
        raise ConfigurationError(f"Triton repository path {repository} is a file; choose a folder for -o.")
    prefix = options.name or bundle.path.name
    planned: list[tuple[TritonModel, dict[str, Any], dict[str, Path]]] = []
    for fold in bundle.resolve_folds(options.folds):
        for precision in options.precisions:
            planned.append(_plan_model(bundle, fold, precision, prefix, options, gpu_kinds))
    existing = [m.name for m, _, _ in planned if (repository / m.name).exists()]
    if existing and not options.overwrite:
        raise ConfigurationError(
            f"Triton repository {repository} already has {', '.join(existing)}; replace them on purpose",
            option="overwrite", use=True,
        )
    for model, config, files in planned:
        _write_model(repository / model.name, config, files)
        logger.debug("Wrote Triton model %s", model.name)
    return TritonExport(repository=repository, models=[m for m, _, _ in planned])


def _plan_model(bundle: Bundle, fold: Any, precision: str, prefix: str, options: TritonOptions,
                gpu_kinds: tuple[str, ...] | None) -> tuple[TritonModel, dict[str, Any], dict[str, Path]]:
    entry = bundle.onnx_entry(fold, precision)  # missing or stale exports are refused here
    onnx_file = bundle.verify_file(entry["file"], entry["sha256"])
    batched, inputs, outputs = tensor_specs(read_onnx_io(onnx_file))
    check_against_manifest(entry, inputs, outputs, batched, onnx_file, export_command(bundle.path, precision))
    name = model_name(prefix, fold, precision, options.backend)
    parameters = {"tucker_export.bundle_source_checksum": str(bundle.source.get("checksum", "")),
                  "tucker_export.onnx_key": onnx_key(fold, precision), "tucker_export.onnx_sha256": entry["sha256"]}
    max_batch = preferred = int(entry.get("max_batch", 1))
    files: dict[str, Path] = {}
    cc_files: dict[str, str] = {}
    engine_keys: dict[str, str] = {}
    if options.backend == "onnx":
        files["model.onnx"] = onnx_file
    else:
        records = _engine_records(bundle, fold, precision, entry["sha256"], gpu_kinds)
        for cc, record in plans_by_compute_capability(records).items():
            plan = bundle.artifact_path(record["file"])
            if not plan.is_file():
                raise EngineError(f"Engine file {plan} is missing; rebuild it with `{rebuild_command(bundle.path, precision)}`.")
            check_engine_file(record, sha256_file(plan), bundle.path)
            filename = f"model.{record['gpu']['kind']}.plan"
            files[filename] = plan
            cc_files[cc] = filename
            engine_keys[record["gpu"]["kind"]] = record["key"]
            parameters[f"tucker_export.engine_key.{cc}"] = record["key"]
            parameters["tucker_export.tensorrt_version"] = record["tensorrt"]["version"]
        # One config serves every plan: the batch range all of them accept.
        max_batch = min(int(r["profile"]["max"]) for r in records)
        preferred = min(int(r["profile"]["opt"]) for r in records)
    max_batch_size = max_batch if batched else 0
    groups = instance_groups(options.gpus, options.cpu_instances)
    config = model_config(name=name, backend=options.backend, max_batch_size=max_batch_size, preferred_batch=preferred,
                          inputs=inputs, outputs=outputs, groups=groups, queue_delay_us=options.queue_delay_us,
                          parameters=parameters, cc_model_filenames=cc_files or None)
    model = TritonModel(name=name, backend=options.backend, fold=str(fold), precision=precision,
                        max_batch_size=max_batch_size, files=sorted(files), instance_groups=groups,
                        engine_keys=engine_keys)
    return model, config, files
