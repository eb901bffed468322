"""Decompose a trained nnU-Net model into a deployment bundle (``tucker-export decompose``).

``decompose_network`` factorizes the convolutions of one in-memory network under a rank policy
and returns the manifest's layer entries; ``decompose_model`` does it for every fold of an nnU-Net
model folder and writes the bundle (manifest, plans.json, dataset.json, safetensors weights per
fold) through ``staged_bundle_dir``, so a failure or Ctrl-C leaves any previous bundle untouched.
``format_summary`` renders the per-stage (and, verbose, per-layer) table the CLI prints.

Layer entry of ``manifest["folds"][fold]["layers"]`` (one per convolution, in module order)::

    {"name": "encoder.stages.1.0.convs.0.conv",      canonical name (first in named_modules())
     "aliases": ["encoder.stages.1.0.convs.0.all_modules.0", "decoder.encoder..."],
     "stage": "encoder.1", "op": "Conv3d",
     "in_channels": 32, "out_channels": 64, "kernel_size": [3, 3, 3], "stride": [2, 2, 2],
     "action": "factorized" | "kept", "reason": null | "why it was kept",
     "ranks": [out_rank, in_rank] | null,
     "params_before": ..., "params_after": ..., "macs_before": ..., "macs_after": ...,
     "relative_error": ||W - W_hat||_F / ||W||_F (0.0 when kept)}

MACs are counted by running the network at the configuration's patch size (batch 1, see
``tucker_export.exporter.counting``); a layer nnU-Net does not run at inference counts 0.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd
from tqdm.auto import tqdm

from tucker_export._text import human as _human
from tucker_export._text import table as _table
from tucker_export.bundle import Bundle, fold_key, model_checksum, new_bundle, staged_bundle_dir
from tucker_export.errors import BackendUnavailableError, ConfigurationError
from tucker_export.exporter.counting import NetworkCount, count_network, module_params
from tucker_export.exporter.ranks import LayerCost, LayerSpectrum, RankPolicy, allocate_budget, layer_ranks
from tucker_export.exporter.tucker import (
    ModeSpectra,
    canonical_kernel,
    deduplicated_state_dict,
    factorized_conv,
    find_convs,
    is_transposed,
    mode_spectra,
    module_aliases,
    replace_module,
    tucker2,
    unsupported_reason,
)
from tucker_export.runtimes import torch_threads

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SkipRules:
    """Layers left as they are whatever the rank policy says (the defaults are the issue's rules).

    ``first_conv_max_in_channels``: the first executed conv is kept when it reads at most this
    many channels (a 1-channel CT input leaves nothing to compress; 0 disables the rule).
    ``segmentation_heads``: 1x1 convs in ``seg_layers`` or producing the network output.
    ``no_gain``: layers whose factorized MACs would not be lower than the original's.
    """

    first_conv_max_in_channels: int = 2
    segmentation_heads: bool = True
    no_gain: bool = True


@dataclass
class DecompositionResult:
    """A decomposed network (modified in place), its manifest layer entries and totals."""

    network: nn.Module
    layers: list[dict[str, Any]]
    totals: dict[str, Any]
    count_before: NetworkCount = field(repr=False)
    count_after: NetworkCount = field(repr=False)
    seconds: float = 0.0


def stage_of(name: str) -> str:
    """The nnU-Net stage a module belongs to, for the per-stage summary (``encoder.2``, ``decoder.0``...)."""
    match = re.match(r"^(?:decoder\.)?encoder\.(stem|stages\.(\d+))", name)
    if match:
        return "encoder.stem" if match.group(1) == "stem" else f"encoder.{match.group(2)}"
    match = re.match(r"^decoder\.(stages|transpconvs)\.(\d+)", name)
    if match:
        return f"decoder.{match.group(2)}"
    if re.match(r"^decoder\.seg_layers\.", name):
        return "decoder.seg"
    parts = name.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else name


def _is_pointwise(conv: _ConvNd) -> bool:
    return all(k == 1 for k in conv.kernel_size)


def _layer_cost(name: str, conv: _ConvNd, count_in: int, count_out: int, metric: str) -> LayerCost:
    """Cost model of factorizing ``conv`` (see ``LayerCost``); voxel counts come from the counted pass."""
    kernel = math.prod(conv.kernel_size)
    c_in, c_out = conv.in_channels, conv.out_channels
    if metric == "params":
        a_in, a_out, a_core, original = c_in, c_out, kernel, c_in * c_out * kernel
    elif is_transposed(conv):  # the core scatters from each input voxel
        a_in, a_out, a_core, original = c_in * count_in, c_out * count_out, kernel * count_in, c_in * c_out * kernel * count_in
    else:
        a_in, a_out, a_core, original = c_in * count_in, c_out * count_out, kernel * count_out, c_in * c_out * kernel * count_out
    return LayerCost(
        name=name, out_channels=c_out, in_channels=c_in, a_in=a_in, a_out=a_out, a_core=a_core,
        original=original, singular_values_out=np.empty(0), singular_values_in=np.empty(0),
    )


def decompose_network(
    network: nn.Module,
    input_shape: Sequence[int],
    policy: RankPolicy,
    *,
    skip: SkipRules = SkipRules(),
    hooi_iterations: int = 0,
    device: str | torch.device = "cpu",
    threads: int | None = 1,
    progress: bool = False,
    description: str = "",
) -> DecompositionResult:
    """Factorize ``network``'s convolutions in place under ``policy``; returns the layer entries.

    ``input_shape`` is (channels, *spatial) of one patch: parameters and MACs are counted by
    running the network at that shape, and the no-gain skip and the budget use those counts.
    Every convolution is visited once even when reachable under several names, and replaced in
    every parent that holds it. ``device`` is where the factorization math runs (the network's
    weights stay where they are).

    ``threads``: torch CPU threads while it runs (restored afterwards; ``None`` keeps torch's
    setting). The default is 1 because the matrices are small: on an idle 2-core machine two
    threads take ~0.9 s instead of ~1.2 s for a TotalSegmentator-size network, but when another
    process shares the cores, OpenMP's spin-waiting made two threads 3-10x slower (measured).
    """
    if threads is not None and threads < 1:
        raise ConfigurationError(f"threads must be >= 1 or None, got {threads}.")
    with torch_threads(threads if torch.device(device).type == "cpu" else None):
        return _decompose_network(network, input_shape, policy, skip=skip, hooi_iterations=hooi_iterations,
                                  device=device, progress=progress, description=description)


# A convolution the rank policy decides on: its index in the layer entries, canonical name, module.
_Candidate = tuple[int, str, _ConvNd]


class _PhaseClock:
    """Seconds spent in each phase of one decomposition (the manifest's ``seconds_per_phase``)."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self._last = self.started
        self.timings: dict[str, float] = {}

    def lap(self, phase: str) -> None:
        """Record the time since the previous lap (or the start) as ``phase``."""
        now = time.perf_counter()
        self.timings[phase] = round(now - self._last, 3)
        self._last = now


@dataclass
class _RankPlan:
    """The ranks chosen per candidate (``None``: keep it) and the cost models behind them."""

    chosen: dict[str, tuple[int, int] | None]
    mac_costs: dict[str, LayerCost]
    metric: str
    budget_info: dict[str, Any] | None = None


def _decompose_network(
    network: nn.Module,
    input_shape: Sequence[int],
    policy: RankPolicy,
    *,
    skip: SkipRules,
    hooi_iterations: int,
    device: str | torch.device,
    progress: bool,
    description: str,
) -> DecompositionResult:
    policy.validate()
    if hooi_iterations < 0:
        raise ConfigurationError(f"HOOI iterations must be >= 0, got {hooi_iterations}.", option="hooi_iterations")
    clock = _PhaseClock()
    before = count_network(network, input_shape)
    clock.lap("count_before")
    layers, candidates = _layer_entries(network, before, policy, skip)

    spectra = _candidate_spectra(candidates, device=device, progress=progress, description=description)
    clock.lap("spectra")
    plan = _choose_ranks(candidates, spectra, before, policy, skip)
    clock.lap("ranks")
    _factorize_candidates(
        network, layers, candidates, spectra, plan, skip=skip, hooi_iterations=hooi_iterations,
        device=device, progress=progress, description=description,
    )
    clock.lap("factorize")
    after = count_network(network, input_shape)
    clock.lap("count_after")

    totals = _network_totals(layers, before, after, plan)
    seconds = time.perf_counter() - clock.started
    totals["seconds"] = round(seconds, 3)
    totals["seconds_per_phase"] = clock.timings
    return DecompositionResult(network, layers, totals, before, after, seconds)


def _layer_entries(
    network: nn.Module, before: NetworkCount, policy: RankPolicy, skip: SkipRules,
) -> tuple[list[dict[str, Any]], list[_Candidate]]:
    """The manifest entry of every convolution (as kept, for now) and the candidates to factorize."""
    executed = before.executed_in_order()
    # The skip rules for the input conv and the segmentation head need the first and last conv *run*.
    first_name = executed[0].name if executed else None
    last_name = executed[-1].name if executed else None
    layers: list[dict[str, Any]] = []
    candidates: list[_Candidate] = []
    for name, conv in find_convs(network):
        entry = _kept_entry(network, name, conv, before)
        layers.append(entry)
        reason = _skip_reason(name, conv, before, policy, skip, first_name=first_name, last_name=last_name)
        if reason is not None:
            entry["reason"] = reason
            if reason.startswith("groups="):
                logger.info("Keeping %s: %s.", name, reason)
            continue
        candidates.append((len(layers) - 1, name, conv))
    return layers, candidates


def _kept_entry(network: nn.Module, name: str, conv: _ConvNd, before: NetworkCount) -> dict[str, Any]:
    """The manifest entry of ``conv`` left as it is; factorizing it later updates the entry."""
    count = before.convs[name]
    return {
        "name": name,
        "aliases": [a for a in module_aliases(network, conv) if a != name],
        "stage": stage_of(name),
        "op": type(conv).__name__,
        "in_channels": conv.in_channels,
        "out_channels": conv.out_channels,
        "kernel_size": list(conv.kernel_size),
        "stride": list(conv.stride),
        "action": "kept",
        "reason": None,
        "ranks": None,
        "params_before": count.params,
        "params_after": count.params,
        "macs_before": count.macs,
        "macs_after": count.macs,
        "relative_error": 0.0,
    }


def _skip_reason(
    name: str, conv: _ConvNd, before: NetworkCount, policy: RankPolicy, skip: SkipRules, *,
    first_name: str | None, last_name: str | None,
) -> str | None:
    """Why ``conv`` is kept whatever its ranks would be, or ``None`` when the rank policy decides."""
    reason = unsupported_reason(conv)
    if reason is None and policy.mode == "none":
        reason = "rank mode none"
    if reason is None and skip.segmentation_heads and _is_pointwise(conv) and (
        "seg_layers" in name.split(".") or name == last_name
    ):
        reason = "segmentation head (1x1)"
    if reason is None and name == first_name and conv.in_channels <= skip.first_conv_max_in_channels:
        reason = f"first conv with {conv.in_channels} input channel{'s' if conv.in_channels > 1 else ''}"
    if reason is None and before.convs[name].calls == 0:
        reason = "not run at inference (e.g. a deep-supervision head)"
    return reason


def _candidate_spectra(
    candidates: Sequence[_Candidate], *, device: str | torch.device, progress: bool, description: str,
) -> dict[str, ModeSpectra]:
    """Spectra of every candidate, computed once: the rank policies and the factorization share them."""
    spectra: dict[str, ModeSpectra] = {}
    iterator = tqdm(candidates, desc=f"{description}analysing", unit="layer", disable=not progress, leave=False)
    for _, name, conv in iterator:
        spectra[name] = mode_spectra(canonical_kernel(conv), device=device)
    return spectra


def _choose_ranks(
    candidates: Sequence[_Candidate], spectra: Mapping[str, ModeSpectra], before: NetworkCount,
    policy: RankPolicy, skip: SkipRules,
) -> _RankPlan:
    """Ranks per candidate: from the network-wide budget, or layer by layer from the policy."""
    metric = policy.budget_metric if policy.mode == "budget" else "macs"
    # The MAC cost model is needed whatever the metric: the no-gain skip compares MACs.
    mac_costs = {
        name: _layer_cost(name, conv, before.convs[name].input_voxels, before.convs[name].output_voxels, "macs")
        for _, name, conv in candidates
    }
    plan = _RankPlan(chosen={}, mac_costs=mac_costs, metric=metric)
    if policy.mode == "budget":
        _plan_budget_ranks(plan, candidates, spectra, before, policy, skip)
    else:
        for _, name, conv in candidates:
            plan.chosen[name] = layer_ranks(policy, _layer_spectrum(conv, spectra[name]))
    return plan


def _plan_budget_ranks(
    plan: _RankPlan, candidates: Sequence[_Candidate], spectra: Mapping[str, ModeSpectra], before: NetworkCount,
    policy: RankPolicy, skip: SkipRules,
) -> None:
    """Fill ``plan`` with the ranks that meet ``policy.budget_target`` of the whole network's cost."""
    metric, mac_costs = plan.metric, plan.mac_costs
    costs = mac_costs if metric == "macs" else {
        name: _layer_cost(name, conv, 0, 0, "params") for _, name, conv in candidates
    }
    layer_costs = []
    for _, name, _ in candidates:
        s = spectra[name]
        macs = mac_costs[name]
        layer_costs.append(
            LayerCost(**{**asdict(costs[name]),
                         "singular_values_out": s.singular_values_out.cpu().numpy(),
                         "singular_values_in": s.singular_values_in.cpu().numpy(),
                         "also_saves": (macs.a_in, macs.a_out, macs.a_core, macs.original)
                         if metric == "params" and skip.no_gain else None})
        )
    total = before.conv_params if metric == "params" else before.macs
    # Layers that are never factorized (skips) cost what they cost; biases stay in every layer.
    fixed = total - sum(c.original for c in layer_costs)
    target = policy.budget_target * total
    result = allocate_budget(layer_costs, target, fixed_cost=fixed, round_to=policy.round_to, rank_min=policy.rank_min)
    plan.chosen = dict(result.ranks)
    plan.budget_info = {"metric": metric, "target_fraction": policy.budget_target,
                        "planned_fraction": result.achieved / result.original if result.original else 1.0}


def _layer_spectrum(conv: _ConvNd, spectra: ModeSpectra) -> LayerSpectrum:
    """What a per-layer rank policy needs of ``conv``: its shape and both modes' singular values."""
    return LayerSpectrum(
        out_channels=conv.out_channels, in_channels=conv.in_channels,
        singular_values_out=spectra.singular_values_out.cpu().numpy(),
        singular_values_in=spectra.singular_values_in.cpu().numpy(),
        unfolding_shape_out=spectra.unfolding_shapes[0], unfolding_shape_in=spectra.unfolding_shapes[1],
    )


def _factorize_candidates(
    network: nn.Module, layers: list[dict[str, Any]], candidates: Sequence[_Candidate],
    spectra: dict[str, ModeSpectra], plan: _RankPlan, *, skip: SkipRules, hooi_iterations: int,
    device: str | torch.device, progress: bool, description: str,
) -> None:
    """Replace every candidate that has ranks (and saves MACs) by its factorized conv; update its entry."""
    iterator = tqdm(candidates, desc=f"{description}factorizing", unit="layer", disable=not progress, leave=False)
    for index, name, conv in iterator:
        entry = layers[index]
        ranks = plan.chosen.get(name)
        if ranks is None:
            entry["reason"] = "budget allocation keeps it (no saving worth its error)"
            continue
        if skip.no_gain:
            cost = plan.mac_costs[name]
            planned = cost.cost(*ranks)
            if planned >= cost.original:
                entry["reason"] = (
                    f"no MAC saving at ranks {list(ranks)} ({planned:.3g} >= {cost.original:.3g} MACs)"
                )
                continue
        factors = tucker2(canonical_kernel(conv), ranks, spectra=spectra[name], hooi_iterations=hooi_iterations, device=device)
        module = factorized_conv(conv, factors)
        replace_module(network, conv, module)
        entry.update(action="factorized", ranks=list(factors.ranks), relative_error=factors.relative_error,
                     params_after=module_params(module))
        del spectra[name]  # free it now: the spectra of a large network add up


def _network_totals(
    layers: list[dict[str, Any]], before: NetworkCount, after: NetworkCount, plan: _RankPlan,
) -> dict[str, Any]:
    """The fold's totals (without the timings); fills in each factorized entry's MACs after."""
    for entry in layers:
        if entry["action"] == "factorized":
            # A factorized conv is a sequence of convs now: its MACs are those of the modules under its name.
            entry["macs_after"] = sum(c.macs for c in after.under(entry["name"]))
    factorized = sum(entry["action"] == "factorized" for entry in layers)
    totals: dict[str, Any] = {
        "input_shape": list(before.input_shape),
        "layers": len(layers),
        "factorized": factorized,
        "kept": len(layers) - factorized,
        "params_before": before.params,
        "params_after": after.params,
        "conv_params_before": before.conv_params,
        "conv_params_after": sum(e["params_after"] for e in layers),
        "macs_before": before.macs,
        "macs_after": after.macs,
        "params_ratio": after.params / before.params if before.params else 1.0,
        "macs_ratio": after.macs / before.macs if before.macs else 1.0,
        "max_relative_error": max((e["relative_error"] for e in layers), default=0.0),
    }
    if plan.budget_info is not None:
        budget_info = plan.budget_info
        achieved = (totals["conv_params_after"] / totals["conv_params_before"] if plan.metric == "params"
                    else totals["macs_ratio"])
        budget_info["achieved_fraction"] = achieved
        totals["budget"] = budget_info
    return totals


def decompose_model(
    model_dir: str | Path,
    output: str | Path,
    *,
    folds: Sequence[int | str] | None = None,
    policy: RankPolicy | None = None,
    configuration: str | None = None,
    checkpoint_name: str | None = None,
    skip: SkipRules = SkipRules(),
    overwrite: bool = False,
    device: str = "cpu",
    hooi_iterations: int = 0,
    threads: int | None = 1,
    trust_checkpoint: bool = False,
    progress: bool = True,
) -> Bundle:
    """Decompose every requested fold of an nnU-Net v2 model folder into a new bundle at ``output``.

    ``folds=None`` takes every fold with a checkpoint. ``policy`` defaults to ``RankPolicy()``
    (relative, factor 0.3, ranks rounded to multiples of 8). ``device`` ("cpu", "cuda",
    "cuda:1") is where the factorization math runs, ``threads`` how many CPU threads it uses
    (see ``decompose_network``). The bundle holds bundle.json, the source
    plans.json and dataset.json, and ``weights/fold_<f>.safetensors`` (each tensor once; the
    loader restores nnU-Net's aliased keys). It is built in a staging folder and replaces
    ``output`` only when complete; an existing non-empty ``output`` needs ``overwrite=True``.
    Returns the loaded ``Bundle``.
    """
    from safetensors.torch import save_file

    from tucker_export.nnunet.loading import DEFAULT_CHECKPOINT, load_trained_model

    policy = (policy or RankPolicy()).validate()
    if hooi_iterations < 0:
        raise ConfigurationError(f"HOOI iterations must be >= 0, got {hooi_iterations}.", option="hooi_iterations")
    torch_device = _check_device(device)
    checkpoint_name = checkpoint_name or DEFAULT_CHECKPOINT
    model_dir = Path(model_dir)
    output = Path(output)
    with staged_bundle_dir(output, overwrite=overwrite) as staging:
        loaded = load_trained_model(
            model_dir, folds, checkpoint_name=checkpoint_name, configuration=configuration,
            trust_checkpoint=trust_checkpoint,
        )
        spec = loaded.spec
        bundle = new_bundle(
            staging, spec,
            source_checksum=model_checksum(model_dir, list(loaded.checkpoint_paths.values())),
            checkpoint_name=checkpoint_name,
            source_folds=[fold_key(f) for f in loaded.folds],
            rank_policy=policy.to_manifest(),
            decomposition={
                "method": "tucker2-hosvd" if hooi_iterations == 0 else "tucker2-hooi",
                "hooi_iterations": hooi_iterations,
                "device": str(torch_device),
                "skip_rules": asdict(skip),
                "count_input_shape": [spec.num_input_channels, *spec.patch_size],
            },
        )
        for name in ("plans.json", "dataset.json"):
            shutil.copy2(model_dir / name, staging / name)
        (staging / "weights").mkdir()
        input_shape = (spec.num_input_channels, *spec.patch_size)
        for fold in loaded.folds:
            network = loaded.networks[fold]
            label = f"fold {fold}: " if len(loaded.folds) > 1 else ""
            result = decompose_network(
                network, input_shape, policy, skip=skip, hooi_iterations=hooi_iterations,
                device=torch_device, threads=threads, progress=progress, description=label,
            )
            relative = Path("weights") / f"fold_{fold}.safetensors"
            save_file(deduplicated_state_dict(network), str(staging / relative))
            bundle.set_fold(fold, weights_file=relative.as_posix(), layers=result.layers, totals=result.totals)
            logger.info(
                "Fold %s: %d of %d convolutions factorized in %.1f s; MACs x%.3f, parameters x%.3f.",
                fold, result.totals["factorized"], result.totals["layers"], result.seconds,
                result.totals["macs_ratio"], result.totals["params_ratio"],
            )
            loaded.networks[fold] = None  # free it before the next fold
        bundle.save()
    return Bundle.load(output)


def _check_device(device: str) -> torch.device:
    try:
        torch_device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigurationError(f"The device must be 'cpu' or 'cuda[:N]', got {device!r}.", option="device") from None
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailableError(
            f"Device {device} needs a CUDA GPU, and torch sees none here", option="device", use="cpu"
        )
    if torch_device.type not in ("cpu", "cuda"):
        raise ConfigurationError(f"The device must be 'cpu' or 'cuda[:N]', got {device!r}.", option="device")
    return torch_device


# ---- summary table -----------------------------------------------------------------------------


def _ratio(after: float, before: float) -> str:
    return f"{after / before:.3f}" if before else "-"


def format_summary(bundle: Bundle, *, verbose: bool = False) -> str:
    """The decomposition summary of every fold: per stage, per layer when ``verbose``, with totals."""
    policy = bundle.rank_policy
    policy_text = ", ".join(f"{k}={v}" for k, v in policy.items() if k != "mode" and v is not None)
    lines: list[str] = []
    for fold in bundle.fold_entries():
        layers, totals = bundle.fold_layers(fold), bundle.fold_totals(fold)
        shape = "x".join(str(s) for s in totals.get("input_shape", []))
        lines.append(
            f"Fold {fold}: rank mode {policy.get('mode')}"
            + (f" ({policy_text})" if policy_text else "")
            + f"; MACs counted at input {shape}"
        )
        stages: dict[str, list[dict[str, Any]]] = {}
        for layer in layers:
            stages.setdefault(layer["stage"], []).append(layer)
        header = ["stage", "factorized", "params", "-> after", "ratio", "MACs", "-> after", "ratio", "max rel.err"]
        rows = []
        for stage, members in stages.items():
            pb, pa = sum(m["params_before"] for m in members), sum(m["params_after"] for m in members)
            mb, ma = sum(m["macs_before"] for m in members), sum(m["macs_after"] for m in members)
            done = sum(m["action"] == "factorized" for m in members)
            rows.append([
                stage, f"{done}/{len(members)}", _human(pb), _human(pa), _ratio(pa, pb),
                _human(mb), _human(ma), _ratio(ma, mb), f"{max(m['relative_error'] for m in members):.4f}",
            ])
        pb, pa = totals["conv_params_before"], totals["conv_params_after"]
        mb, ma = totals["macs_before"], totals["macs_after"]
        rows.append([
            "total (convs)", f"{totals['factorized']}/{totals['layers']}", _human(pb), _human(pa), _ratio(pa, pb),
            _human(mb), _human(ma), _ratio(ma, mb), f"{totals['max_relative_error']:.4f}",
        ])
        lines.extend(_table(header, rows, "lrrrrrrrr"))
        lines.append(
            f"network parameters {_human(totals['params_before'])} -> {_human(totals['params_after'])} "
            f"(x{totals['params_ratio']:.3f}); conv MACs {_human(mb)} -> {_human(ma)} (x{totals['macs_ratio']:.3f})"
            + (f"; budget target {totals['budget']['target_fraction']} of {totals['budget']['metric']}, "
               f"achieved {totals['budget']['achieved_fraction']:.4f}" if "budget" in totals else "")
        )
        if verbose:
            header = ["layer", "op", "out,in", "action", "params", "-> after", "MACs", "-> after", "rel.err"]
            rows = []
            for layer in layers:
                action = (f"ranks {layer['ranks'][0]},{layer['ranks'][1]}" if layer["action"] == "factorized"
                          else f"kept: {layer['reason']}")
                rows.append([
                    layer["name"], layer["op"], f"{layer['out_channels']},{layer['in_channels']}", action,
                    _human(layer["params_before"]), _human(layer["params_after"]),
                    _human(layer["macs_before"]), _human(layer["macs_after"]), f"{layer['relative_error']:.4f}",
                ])
            lines.append("")
            lines.extend(_table(header, rows, "llllrrrrr"))
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
