"""Rank policies: how many channels each factorized convolution keeps in its core.

Every policy gives per layer ``(out_rank, in_rank)`` (the manifest's order). Modes:

- ``relative``: ``ceil(C * factor)`` per channel mode, tucker-cnn compatible (with ``round_to=1``).
- ``fixed``: the same rank, ``rank_min``, for every layer (tucker-cnn's ``fixed`` mode uses
  ``rank_min`` as the rank too), capped at the channel count.
- ``energy``: per mode the smallest rank whose leading singular values of the mode unfolding keep
  the fraction ``energy`` of its squared Frobenius norm.
- ``vbmf``: per mode the rank that empirical variational Bayesian matrix factorization (EVBMF)
  estimates for the mode unfolding (Nakajima et al. 2013; used for Tucker ranks by Kim et al. 2016).
- ``budget``: one global target, the fraction of the original convolution MACs (or parameters)
  that remains; ranks are allocated across layers by reconstruction error increase per MAC saved.
- ``none``: nothing is factorized (a bundle of the original model).

After the policy, every rank is floored at ``rank_min`` (when given), rounded up to a multiple
of ``round_to`` (tensor-core friendly; default 8) and capped at the channel count.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from tucker_export.errors import RankPolicyError

RANK_MODES: tuple[str, ...] = ("relative", "fixed", "energy", "vbmf", "budget", "none")
BUDGET_TOLERANCE = 0.02  # the budget is met within 2 % of the target


def check_rank_mode(mode: str) -> str:
    """``mode`` if it is a rank mode, else a RankPolicyError suggesting the closest one."""
    if mode in RANK_MODES:
        return mode
    close = difflib.get_close_matches(str(mode).lower(), RANK_MODES, n=1, cutoff=0.0)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise RankPolicyError(f"Unknown rank mode {mode!r} (valid: {', '.join(RANK_MODES)}){hint}")


def _check_fraction(name: str, option: str, value: float | None) -> None:
    if value is None:
        return
    if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 < value <= 1):
        raise RankPolicyError(f"{name} must lie in (0, 1], got {value}.", option=option)


@dataclass(frozen=True)
class RankPolicy:
    """The rank policy and its parameters, as recorded in the bundle manifest (``rank_policy``).

    ``factor`` is used by ``relative``; ``rank_min`` is the fixed rank of ``fixed`` and a floor
    for every other mode; ``energy`` by ``energy``; ``budget_macs`` or ``budget_params`` (the
    fraction of the original convolution MACs/parameters that remains) by ``budget``.
    """

    mode: str = "relative"
    factor: float | None = 0.3
    rank_min: int | None = None
    energy: float | None = 0.9
    budget_macs: float | None = None
    budget_params: float | None = None
    round_to: int = 8

    def validate(self) -> RankPolicy:
        """Raise ``RankPolicyError`` naming the rule and the value when a parameter is unusable."""
        check_rank_mode(self.mode)
        _check_fraction("The rank factor", "factor", self.factor)
        _check_fraction("The energy fraction", "energy", self.energy)
        _check_fraction("The MAC budget", "budget_macs", self.budget_macs)
        _check_fraction("The parameter budget", "budget_params", self.budget_params)
        if isinstance(self.round_to, bool) or not isinstance(self.round_to, int) or self.round_to < 1:
            raise RankPolicyError(f"The rank rounding must be an integer >= 1, got {self.round_to}.", option="round_to")
        if self.rank_min is not None and (isinstance(self.rank_min, bool) or not isinstance(self.rank_min, int) or self.rank_min < 1):
            raise RankPolicyError(f"The minimum rank must be an integer >= 1, got {self.rank_min}.", option="rank_min")
        if self.mode == "relative" and self.factor is None:
            raise RankPolicyError("Rank mode 'relative' needs a rank factor in (0, 1], got none.", option="factor")
        if self.mode == "energy" and self.energy is None:
            raise RankPolicyError("Rank mode 'energy' needs an energy fraction in (0, 1], got none.", option="energy")
        if self.mode == "fixed" and self.rank_min is None:
            raise RankPolicyError("Rank mode 'fixed' needs the rank as the minimum rank, got none.", option="rank_min")
        if self.mode == "budget":
            given = [b for b in (self.budget_macs, self.budget_params) if b is not None]
            if len(given) != 1:
                raise RankPolicyError(
                    f"Rank mode 'budget' needs exactly one of a MAC budget or a parameter budget, got {len(given)}.",
                    option="budget_macs",
                )
        return self

    @property
    def budget_metric(self) -> str:
        return "params" if self.budget_params is not None else "macs"

    @property
    def budget_target(self) -> float | None:
        return self.budget_params if self.budget_params is not None else self.budget_macs

    def to_manifest(self) -> dict[str, Any]:
        """The parameters that matter for ``mode`` (others are dropped so the manifest says what was used)."""
        used = {"mode": self.mode, "round_to": self.round_to, "rank_min": self.rank_min}
        if self.mode == "relative":
            used["factor"] = self.factor
        elif self.mode == "energy":
            used["energy"] = self.energy
        elif self.mode == "budget":
            used["budget_metric"] = self.budget_metric
            used["budget_target"] = self.budget_target
        elif self.mode == "none":
            used = {"mode": "none"}
        return used

    @classmethod
    def from_manifest(cls, entry: dict[str, Any]) -> RankPolicy:
        fields = set(asdict(cls()))
        kwargs = {k: v for k, v in entry.items() if k in fields}
        if entry.get("mode") == "budget":
            key = "budget_params" if entry.get("budget_metric") == "params" else "budget_macs"
            kwargs[key] = entry.get("budget_target")
        return cls(**kwargs)


# ---- single-layer rules ------------------------------------------------------------------------


def finalize_rank(rank: int, channels: int, *, round_to: int = 8, rank_min: int | None = None) -> int:
    """Floor at ``rank_min``, round up to a multiple of ``round_to``, cap at ``channels`` (and >= 1)."""
    rank = max(int(rank), 1)
    if rank_min is not None:
        rank = max(rank, rank_min)
    rank = -(-rank // round_to) * round_to
    return min(rank, channels)


def relative_rank(channels: int, factor: float) -> int:
    """tucker-cnn's relative rank: ``ceil(channels * factor)``."""
    # the small slack keeps 0.3 * 10 = 3.0000000000000004 from becoming 4
    return max(1, math.ceil(channels * factor - 1e-9))


def energy_rank(singular_values: Sequence[float] | np.ndarray, energy: float) -> int:
    """Smallest r whose leading ``r`` squared singular values hold at least ``energy`` of their sum."""
    s2 = np.sort(np.asarray(singular_values, dtype=np.float64))[::-1] ** 2
    total = s2.sum()
    if total <= 0:
        return 1
    kept = np.cumsum(s2) / total
    return int(min(np.searchsorted(kept, energy - 1e-12) + 1, len(s2)))


def rank_grid(channels: int, *, round_to: int = 8, rank_min: int | None = None) -> list[int]:
    """Every rank a policy can produce for ``channels`` (the candidates the budget search uses)."""
    return sorted({finalize_rank(r, channels, round_to=round_to, rank_min=rank_min) for r in range(1, channels + 1)})


# ---- EVBMF ---------------------------------------------------------------------------------------


def _evb_tau_bar(alpha: float) -> float:
    """The zero of Xi(tau; alpha) = Phi(tau) + Phi(tau / alpha), Phi(z) = ln(z + 1) / z - 1/2.

    Nakajima et al. define the EVB threshold through this tau-bar (about 2.5129 sqrt(alpha)); we
    solve it by bisection instead of using the approximation. Xi is decreasing in tau.
    """

    def phi(z: float) -> float:
        return math.log1p(z) / z - 0.5

    def xi(tau: float) -> float:
        return phi(tau) + phi(tau / alpha)

    low, high = 1e-9, 1.0
    while xi(high) > 0:
        high *= 2
    for _ in range(200):
        mid = 0.5 * (low + high)
        if xi(mid) > 0:
            low = mid
        else:
            high = mid
    return 0.5 * (low + high)


def evbmf_rank(
    singular_values: Sequence[float] | np.ndarray,
    shape: tuple[int, int],
    *,
    residual: float = 0.0,
) -> int:
    """The rank EVBMF estimates for an L x M matrix from its singular values (noise variance unknown).

    Follows the global analytic solution of Nakajima, Sugiyama, Babacan & Tomioka (JMLR 2013) with
    the noise variance estimated as in Nakajima et al. (JMLR 2015): with ``L <= M``,
    ``alpha = L / M`` and ``x_h = gamma_h^2 / (M sigma^2)``, the free energy (times 2/M, constants
    dropped) as a function of ``sigma^2`` is

        sum_h (x_h - ln x_h) - sum_{x_h > x_bar} (tau_h - ln(tau_h + 1) - alpha ln(tau_h / alpha + 1))
        + residual / (M sigma^2) + (L - H) ln sigma^2

    where ``x_bar = (1 + tau_bar)(1 + alpha / tau_bar)`` and ``tau_h`` solves
    ``tau^2 - (x_h - 1 - alpha) tau + alpha = 0`` (larger root). It is minimised over the interval
    the paper gives for ``sigma^2``; components with ``gamma_h > sqrt(M sigma^2 x_bar)`` survive.
    ``residual`` is the squared norm not covered by the given singular values (0 for a full SVD).
    """
    s = np.sort(np.asarray(singular_values, dtype=np.float64))[::-1]
    L, M = sorted(int(d) for d in shape)
    H = len(s)
    if H == 0 or s[0] <= 0:
        return 0
    alpha = L / M
    tau_bar = _evb_tau_bar(alpha)
    x_bar = (1 + tau_bar) * (1 + alpha / tau_bar)
    s2 = s**2

    def objective(sigma2: float) -> float:
        x = s2 / (M * sigma2)
        x = np.maximum(x, 1e-300)
        value = float(np.sum(x - np.log(x)))
        signal = x[x > x_bar]
        if signal.size:
            b = signal - (1 + alpha)
            tau = 0.5 * (b + np.sqrt(np.maximum(b * b - 4 * alpha, 0.0)))
            value -= float(np.sum(tau - np.log1p(tau) - alpha * np.log1p(tau / alpha)))
        return value + residual / (M * sigma2) + (L - H) * math.log(sigma2)

    # Bounds of the noise variance (Nakajima et al. 2015): everything noise at the top; at the bottom
    # at most H_bar = ceil(L / (1 + alpha)) - 1 components are signal.
    upper = (s2.sum() + residual) / (L * M)
    h_bar = int(min(math.ceil(L / (1 + alpha)) - 1, H - 1))
    tail = s2[h_bar:]
    lower = max(s2[h_bar] / (M * x_bar), tail.mean() / M if tail.size else 0.0)
    lower = min(max(lower, upper * 1e-12), upper)
    if lower >= upper:
        sigma2 = upper
    else:
        # Coarse scan in log space, then golden-section refinement around the best grid point:
        # the objective is smooth between the points where a component crosses the threshold,
        # and the scan keeps us out of local minima there.
        grid = np.geomspace(lower, upper, 256)
        values = [objective(g) for g in grid]
        best = int(np.argmin(values))
        a = math.log(grid[max(best - 1, 0)])
        b = math.log(grid[min(best + 1, len(grid) - 1)])
        ratio = (math.sqrt(5) - 1) / 2
        c, d = b - ratio * (b - a), a + ratio * (b - a)
        fc, fd = objective(math.exp(c)), objective(math.exp(d))
        for _ in range(80):
            if fc < fd:
                b, d, fd = d, c, fc
                c = b - ratio * (b - a)
                fc = objective(math.exp(c))
            else:
                a, c, fc = c, d, fd
                d = a + ratio * (b - a)
                fd = objective(math.exp(d))
        sigma2 = math.exp(0.5 * (a + b))
        if values[best] < min(fc, fd):
            sigma2 = float(grid[best])
    threshold = math.sqrt(M * sigma2 * x_bar)
    return int(np.sum(s > threshold))


def evbmf_matrix_rank(matrix: np.ndarray) -> int:
    """EVBMF rank of a matrix (convenience for tests and callers without precomputed spectra)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    return evbmf_rank(np.linalg.svd(matrix, compute_uv=False), matrix.shape)


# ---- per-layer policies ------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerSpectrum:
    """What the per-layer policies need about one convolution: channel counts and mode spectra."""

    out_channels: int
    in_channels: int
    singular_values_out: np.ndarray
    singular_values_in: np.ndarray
    unfolding_shape_out: tuple[int, int]
    unfolding_shape_in: tuple[int, int]


def layer_ranks(policy: RankPolicy, layer: LayerSpectrum) -> tuple[int, int]:
    """``(out_rank, in_rank)`` for one layer under a per-layer policy (not ``budget``/``none``)."""
    out_c, in_c = layer.out_channels, layer.in_channels
    if policy.mode == "relative":
        raw = (relative_rank(out_c, policy.factor), relative_rank(in_c, policy.factor))
    elif policy.mode == "fixed":
        raw = (policy.rank_min, policy.rank_min)
    elif policy.mode == "energy":
        raw = (energy_rank(layer.singular_values_out, policy.energy), energy_rank(layer.singular_values_in, policy.energy))
    elif policy.mode == "vbmf":
        raw = (
            evbmf_rank(layer.singular_values_out, layer.unfolding_shape_out),
            evbmf_rank(layer.singular_values_in, layer.unfolding_shape_in),
        )
    else:
        raise RankPolicyError(f"Rank mode {policy.mode!r} has no per-layer rule (it is decided network-wide).")
    return (
        finalize_rank(raw[0], out_c, round_to=policy.round_to, rank_min=policy.rank_min),
        finalize_rank(raw[1], in_c, round_to=policy.round_to, rank_min=policy.rank_min),
    )


# ---- budget allocation -------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerCost:
    """Cost model of one factorizable layer for the budget search.

    With ranks (r_out, r_in) the factorized layer costs ``a_in * r_in + a_out * r_out +
    a_core * r_in * r_out`` (MACs or parameters; the first 1x1, the last 1x1 and the core), the
    original costs ``original``. Its estimated squared relative error is the HOSVD bound
    ``(tail_out[r_out] + tail_in[r_in]) / ||W||^2`` from the discarded squared singular values.
    """

    name: str
    out_channels: int
    in_channels: int
    a_in: float
    a_out: float
    a_core: float
    original: float
    singular_values_out: np.ndarray
    singular_values_in: np.ndarray
    # (a_in, a_out, a_core, original) MACs when the budget counts parameters: options must still
    # save MACs, or the no-gain rule would keep the layer and miss the budget.
    also_saves: tuple[float, float, float, float] | None = None

    def cost(self, out_rank: int | np.ndarray, in_rank: int | np.ndarray) -> Any:
        return self.a_in * in_rank + self.a_out * out_rank + self.a_core * in_rank * out_rank

    def error2(self, out_rank: int | np.ndarray, in_rank: int | np.ndarray) -> Any:
        """HOSVD estimate of the squared relative reconstruction error."""
        tail_out = _tails(self.singular_values_out)
        tail_in = _tails(self.singular_values_in)
        total = float(np.sum(np.asarray(self.singular_values_out, dtype=np.float64) ** 2)) or 1.0
        return (tail_out[np.asarray(out_rank)] + tail_in[np.asarray(in_rank)]) / total


def _tails(singular_values: np.ndarray) -> np.ndarray:
    """tails[r] = sum of squared singular values beyond the first r (len = n + 1)."""
    s2 = np.sort(np.asarray(singular_values, dtype=np.float64))[::-1] ** 2
    return np.concatenate([np.cumsum(s2[::-1])[::-1], [0.0]])


@dataclass(frozen=True)
class BudgetResult:
    """Per layer ``(out_rank, in_rank)`` or ``None`` (kept), plus the achieved and target totals."""

    ranks: dict[str, tuple[int, int] | None]
    target: float
    achieved: float
    original: float


def _options(layer: LayerCost, round_to: int, rank_min: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pareto-optimal (cost, error, ranks) options of one layer, cost descending, starting with 'kept'."""
    outs = np.array(rank_grid(layer.out_channels, round_to=round_to, rank_min=rank_min))
    ins = np.array(rank_grid(layer.in_channels, round_to=round_to, rank_min=rank_min))
    ro, ri = np.meshgrid(outs, ins, indexing="ij")
    ro, ri = ro.ravel(), ri.ravel()
    cost = layer.cost(ro, ri).astype(np.float64)
    err = layer.error2(ro, ri).astype(np.float64)
    gain = cost < layer.original
    if layer.also_saves is not None:
        a_in, a_out, a_core, original = layer.also_saves
        gain &= a_in * ri + a_out * ro + a_core * ri * ro < original
    ro, ri, cost, err = ro[gain], ri[gain], cost[gain], err[gain]
    # Pareto front: sweep from the cheapest option up, keeping each option with less error than
    # every cheaper one; the result has cost strictly increasing and error strictly decreasing.
    order = np.lexsort((err, cost))
    sorted_err = err[order]
    cheaper_min = np.concatenate([[math.inf], np.minimum.accumulate(sorted_err)[:-1]])
    front = order[sorted_err < cheaper_min][::-1]
    option_cost = np.concatenate([[float(layer.original)], cost[front]])
    option_err = np.concatenate([[0.0], err[front]])
    option_ranks = np.concatenate([[[-1, -1]], np.stack([ro[front], ri[front]], axis=1).reshape(-1, 2)]).astype(int)
    return option_cost, option_err, option_ranks


def _lower_hull(cost: np.ndarray, err: np.ndarray) -> list[int]:
    """Indices of the convex minorant of error over cost, walking from 'kept' to the cheapest option."""
    hull: list[int] = []
    for index in range(len(cost)):
        while len(hull) >= 2:
            i, j = hull[-2], hull[-1]
            # slope (error per unit saved) must increase along the hull; drop j if it does not
            s_ij = (err[j] - err[i]) / (cost[i] - cost[j])
            s_ik = (err[index] - err[i]) / (cost[i] - cost[index])
            if s_ik <= s_ij:
                hull.pop()
            else:
                break
        hull.append(index)
    return hull


def allocate_budget(
    layers: Sequence[LayerCost],
    target: float,
    *,
    fixed_cost: float = 0.0,
    round_to: int = 8,
    rank_min: int | None = None,
    tolerance: float = BUDGET_TOLERANCE,
) -> BudgetResult:
    """Ranks for ``layers`` so that ``fixed_cost + sum(layer costs)`` is within ``tolerance`` of ``target``.

    Greedy on the convex hull of each layer's (cost, estimated error) options: repeatedly take
    the step, over all layers, with the smallest increase of estimated squared relative error
    per unit of cost saved, until the total is at or below the target. If the last step
    undershoots by more than the tolerance (coarse rank grids), the best single-layer change
    that lands within the tolerance is taken instead. ``fixed_cost`` is what layers that are
    never factorized cost.
    """
    original = fixed_cost + sum(layer.original for layer in layers)
    options = [_options(layer, round_to, rank_min) for layer in layers]
    minimum = fixed_cost + sum(float(cost.min()) for cost, _, _ in options)
    if target < minimum * (1 - tolerance):
        raise RankPolicyError(
            f"The budget of {target / original:.3f} of the original is below the smallest reachable "
            f"{minimum / original:.3f} with these skip rules, minimum rank and rank rounding; raise the budget."
        )
    state = [0] * len(layers)  # index into each layer's Pareto options; 0 = kept
    total = original
    if total <= target * (1 + tolerance):
        return BudgetResult({layer.name: None for layer in layers}, target, total, original)

    steps: list[tuple[float, int, int, int]] = []  # (slope, layer, from, to)
    for index, (cost, err, _) in enumerate(options):
        hull = _lower_hull(cost, err)
        for a, b in zip(hull, hull[1:]):
            steps.append(((err[b] - err[a]) / (cost[a] - cost[b]), index, a, b))
    steps.sort()
    previous_state, previous_total = list(state), total
    for _, index, a, b in steps:
        if total <= target:
            break
        previous_state, previous_total = list(state), total
        cost = options[index][0]
        total += cost[b] - cost[a]
        state[index] = b

    def errors(candidate: list[int]) -> float:
        return sum(options[i][1][s] for i, s in enumerate(candidate))

    if abs(total - target) > tolerance * target:
        # Coarse grid: search single-layer changes from the states around the crossing.
        best: tuple[float, list[int], float] | None = None
        for base, base_total in ((previous_state, previous_total), (state, total)):
            for index, (cost, _, _) in enumerate(options):
                new_totals = base_total - cost[base[index]] + cost
                ok = np.flatnonzero(np.abs(new_totals - target) <= tolerance * target)
                for option in ok:
                    candidate = list(base)
                    candidate[index] = int(option)
                    score = errors(candidate)
                    if best is None or score < best[0]:
                        best = (score, candidate, float(new_totals[option]))
        if best is None:
            raise RankPolicyError(
                f"The budget of {target / original:.3f} cannot be met within {tolerance:.0%} on the rank grid of "
                f"rounding {round_to} (closest: {total / original:.3f}); round to a smaller multiple.",
                option="round_to",
            )
        _, state, total = best

    ranks: dict[str, tuple[int, int] | None] = {}
    for layer, (_, _, option_ranks), s in zip(layers, options, state):
        ranks[layer.name] = None if s == 0 else (int(option_ranks[s][0]), int(option_ranks[s][1]))
    return BudgetResult(ranks, target, total, original)
