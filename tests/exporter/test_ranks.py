"""Rank policies keep their contracts: rounding, floors, energy, EVBMF, budget within 2 %, skips."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tucker_export.errors import RankPolicyError
from tucker_export.exporter.decompose import SkipRules, decompose_network
from tucker_export.exporter.ranks import (
    LayerCost,
    LayerSpectrum,
    RankPolicy,
    _evb_tau_bar,
    allocate_budget,
    check_rank_mode,
    energy_rank,
    evbmf_matrix_rank,
    finalize_rank,
    layer_ranks,
    rank_grid,
    relative_rank,
)

from ._nets import load_network, model_folder

# ---- rounding and floors -------------------------------------------------------------------------


@pytest.mark.parametrize("round_to", [1, 3, 8, 16])
@pytest.mark.parametrize("rank_min", [None, 1, 5, 100])
def test_finalize_rank_rounds_up_floors_and_never_exceeds_the_channels(round_to, rank_min):
    for channels in range(1, 70):
        for raw in range(0, channels + 3):
            rank = finalize_rank(raw, channels, round_to=round_to, rank_min=rank_min)
            assert 1 <= rank <= channels
            assert rank == channels or rank % round_to == 0
            assert rank >= min(max(raw, rank_min or 1), channels)
            assert rank - max(raw, rank_min or 1, 1) < round_to  # the smallest multiple, not more


def test_relative_rank_is_tucker_cnns_ceil():
    assert relative_rank(320, 0.3) == 96
    assert relative_rank(32, 0.3) == 10  # 9.6
    assert relative_rank(10, 0.3) == 3  # 3.0000000000000004 in floating point
    assert relative_rank(1, 0.01) == 1
    for channels in range(1, 400, 7):
        for factor in (0.1, 0.25, 1 / 3, 0.5, 1.0):
            assert relative_rank(channels, factor) == max(1, math.ceil(round(channels * factor, 9)))


def _spectrum(out_c=64, in_c=32, seed=0):
    rng = np.random.default_rng(seed)
    return LayerSpectrum(out_c, in_c, np.sort(rng.random(out_c))[::-1], np.sort(rng.random(in_c))[::-1],
                         (out_c, in_c * 27), (in_c, out_c * 27))


def test_relative_and_fixed_policies_with_rounding_and_floor():
    layer = _spectrum(64, 20)
    assert layer_ranks(RankPolicy(factor=0.3, round_to=1), layer) == (20, 6)  # tucker-cnn exactly
    assert layer_ranks(RankPolicy(factor=0.3, round_to=8), layer) == (24, 8)
    assert layer_ranks(RankPolicy(factor=0.3, round_to=8, rank_min=12), layer) == (24, 16)
    assert layer_ranks(RankPolicy(factor=0.9, round_to=8), layer) == (64, 20)  # capped at channels
    assert layer_ranks(RankPolicy(mode="fixed", rank_min=16, round_to=1), layer) == (16, 16)
    assert layer_ranks(RankPolicy(mode="fixed", rank_min=48, round_to=8), layer) == (48, 20)


def test_energy_rank_thresholds():
    s = [3.0, 2.0, 1.0]  # squared: 9, 4, 1 of 14
    assert energy_rank(s, 9 / 14) == 1
    assert energy_rank(s, 0.65) == 2
    assert energy_rank(s, 13 / 14) == 2
    assert energy_rank(s, 0.93) == 3
    assert energy_rank(s, 1.0) == 3
    rng = np.random.default_rng(0)
    for _ in range(50):
        values = np.sort(rng.random(40))[::-1]
        energy = float(rng.uniform(0.05, 1.0))
        r = energy_rank(values, energy)
        kept = np.cumsum(values**2) / np.sum(values**2)
        assert kept[r - 1] >= energy - 1e-12
        assert r == 1 or kept[r - 2] < energy


def test_energy_policy_applies_rounding_after_the_threshold():
    layer = _spectrum(64, 32)
    raw_out = energy_rank(layer.singular_values_out, 0.8)
    out_rank, _ = layer_ranks(RankPolicy(mode="energy", energy=0.8, round_to=8), layer)
    assert out_rank == min(64, -(-raw_out // 8) * 8)


# ---- EVBMF ---------------------------------------------------------------------------------------


def test_tau_bar_matches_the_papers_constant():
    tau = _evb_tau_bar(1.0)
    assert tau == pytest.approx(2.5129, abs=1e-4)
    assert math.log1p(tau) / tau == pytest.approx(0.5, abs=1e-12)
    for alpha in (0.05, 0.3, 0.7):  # the usual approximation 2.5129 sqrt(alpha) is close
        assert _evb_tau_bar(alpha) == pytest.approx(2.5129 * math.sqrt(alpha), rel=0.1)


@pytest.mark.parametrize(("shape", "rank", "seed"), [((64, 576), 10, 0), ((32, 864), 5, 1), ((120, 300), 20, 2),
                                                      ((300, 120), 7, 3)])
def test_evbmf_recovers_the_rank_of_low_rank_plus_noise(shape, rank, seed):
    rng = np.random.default_rng(seed)
    L, M = shape
    # unit-variance noise has singular values up to about sqrt(L) + sqrt(M); the signal's lie at 2-5x that
    edge = math.sqrt(L) + math.sqrt(M)
    u, _ = np.linalg.qr(rng.standard_normal((L, rank)))
    v, _ = np.linalg.qr(rng.standard_normal((M, rank)))
    signal = u @ np.diag(rng.uniform(2, 5, rank) * edge) @ v.T
    noisy = signal + rng.standard_normal(shape)
    assert evbmf_matrix_rank(noisy) == rank
    assert evbmf_matrix_rank(noisy.T) == rank


def test_evbmf_finds_no_signal_in_pure_noise():
    rng = np.random.default_rng(0)
    assert evbmf_matrix_rank(rng.standard_normal((64, 576))) <= 1


def test_vbmf_policy_uses_the_mode_unfoldings():
    rng = np.random.default_rng(0)
    out_c, in_c, k = 48, 40, 27
    core = rng.standard_normal((6, 9, k)) * 20
    w = np.einsum("ob,bak,ia->oik", rng.standard_normal((out_c, 6)), core, rng.standard_normal((in_c, 9)))
    w += rng.standard_normal(w.shape)
    from tucker_export.exporter.tucker import mode_spectra

    spectra = mode_spectra(torch.from_numpy(w))
    layer = LayerSpectrum(out_c, in_c, spectra.singular_values_out.numpy(), spectra.singular_values_in.numpy(),
                          spectra.unfolding_shapes[0], spectra.unfolding_shapes[1])
    assert layer_ranks(RankPolicy(mode="vbmf", round_to=1), layer) == (6, 9)
    assert layer_ranks(RankPolicy(mode="vbmf", round_to=8), layer) == (8, 16)


# ---- budget --------------------------------------------------------------------------------------


def _layers(n=12, seed=0):
    rng = np.random.default_rng(seed)
    layers = []
    for i in range(n):
        c_out, c_in = int(rng.choice([32, 64, 128, 256, 320])), int(rng.choice([32, 64, 128, 256, 320]))
        voxels = float(rng.choice([4096, 32768, 262144]))
        decay = rng.uniform(0.01, 0.2)
        layers.append(LayerCost(
            name=f"l{i}", out_channels=c_out, in_channels=c_in, a_in=c_in * voxels, a_out=c_out * voxels,
            a_core=27 * voxels, original=c_out * c_in * 27 * voxels,
            singular_values_out=np.exp(-decay * np.arange(c_out)), singular_values_in=np.exp(-decay * np.arange(c_in)),
        ))
    return layers


@pytest.mark.parametrize("fraction", [0.2, 0.35, 0.5, 0.8])
@pytest.mark.parametrize("round_to", [1, 8])
def test_budget_is_met_within_two_percent_on_the_rank_grid(fraction, round_to):
    layers = _layers()
    fixed = 1e8
    original = fixed + sum(layer.original for layer in layers)
    result = allocate_budget(layers, fraction * original, fixed_cost=fixed, round_to=round_to, rank_min=16)
    achieved = fixed + sum(
        layer.original if result.ranks[layer.name] is None else layer.cost(*result.ranks[layer.name]) for layer in layers
    )
    assert achieved == pytest.approx(result.achieved)
    assert abs(achieved / (fraction * original) - 1) <= 0.02
    for layer in layers:
        ranks = result.ranks[layer.name]
        if ranks is not None:
            assert ranks[0] in rank_grid(layer.out_channels, round_to=round_to, rank_min=16)
            assert ranks[1] in rank_grid(layer.in_channels, round_to=round_to, rank_min=16)
            assert layer.cost(*ranks) < layer.original


def test_budget_spends_more_error_for_smaller_budgets_and_prefers_cheap_errors():
    layers = _layers()
    original = sum(layer.original for layer in layers)

    def total_error(fraction):
        ranks = allocate_budget(layers, fraction * original).ranks
        return sum(0.0 if ranks[lay.name] is None else lay.error2(*ranks[lay.name]) for lay in layers)

    errors = [total_error(f) for f in (0.8, 0.5, 0.3)]
    assert errors[0] < errors[1] < errors[2]


def test_budget_below_the_reachable_minimum_is_refused():
    layers = _layers(3)
    with pytest.raises(RankPolicyError, match="below the smallest reachable"):
        allocate_budget(layers, 0.001 * sum(layer.original for layer in layers), fixed_cost=0.0)


def test_budget_on_a_network_meets_the_counted_macs_within_two_percent(tmp_path):
    model_dir = model_folder(tmp_path, "plain-3d", features=(16, 32, 64))
    for fraction in (0.4, 0.6):
        network, input_shape = load_network(model_dir)
        result = decompose_network(network, input_shape, RankPolicy(mode="budget", budget_macs=fraction, round_to=1))
        assert abs(result.totals["macs_after"] / (fraction * result.totals["macs_before"]) - 1) <= 0.02
        assert result.totals["budget"]["achieved_fraction"] == pytest.approx(result.totals["macs_ratio"])
    network, input_shape = load_network(model_dir)
    params = decompose_network(network, input_shape, RankPolicy(mode="budget", budget_params=0.5, round_to=1))
    conv_ratio = params.totals["conv_params_after"] / params.totals["conv_params_before"]
    assert abs(conv_ratio / 0.5 - 1) <= 0.02


# ---- skips ---------------------------------------------------------------------------------------


def test_default_skips_first_conv_seg_heads_and_no_gain_layers(tmp_path):
    network, input_shape = load_network(model_folder(tmp_path, "resenc-3d", features=(16, 32, 64)))
    result = decompose_network(network, input_shape, RankPolicy(factor=0.3))
    by_name = {e["name"]: e for e in result.layers}
    assert by_name["encoder.stem.convs.0.conv"]["reason"] == "first conv with 1 input channel"
    for name, entry in by_name.items():
        if ".seg_layers." in f".{name}.":
            assert entry["action"] == "kept" and entry["reason"] == "segmentation head (1x1)"
        if entry["action"] == "factorized":
            assert entry["macs_after"] < entry["macs_before"]
            assert entry["ranks"][0] % 8 == 0 or entry["ranks"][0] == entry["out_channels"]
    no_gain = [e for e in result.layers if (e["reason"] or "").startswith("no MAC saving")]
    assert no_gain, "the 1x1 projection skips of ResidualEncoderUNet do not gain at rank factor 0.3 with rounding"
    assert all(e["macs_after"] == e["macs_before"] for e in no_gain)


def test_first_conv_with_three_channels_is_not_skipped_for_being_first(tmp_path):
    model_dir = model_folder(tmp_path, "plain-3d", channels=3, features=(16, 32, 64))
    network, input_shape = load_network(model_dir)
    result = decompose_network(network, input_shape, RankPolicy(factor=0.5, round_to=1))
    assert not (result.layers[0]["reason"] or "").startswith("first conv")
    network, _ = load_network(model_dir)
    stricter = decompose_network(network, input_shape, RankPolicy(factor=0.5, round_to=1),
                                 skip=SkipRules(first_conv_max_in_channels=3))
    assert stricter.layers[0]["reason"] == "first conv with 3 input channels"


def test_a_full_rank_policy_keeps_everything_for_lack_of_gain(tmp_path):
    network, input_shape = load_network(model_folder(tmp_path, "plain-3d"))
    result = decompose_network(network, input_shape, RankPolicy(factor=1.0))
    assert result.totals["factorized"] == 0
    assert result.totals["macs_after"] == result.totals["macs_before"]


# ---- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"factor": 0.0}, r"rank factor .* \(0, 1\], got 0.0"),
    ({"factor": 1.5}, r"rank factor .* \(0, 1\], got 1.5"),
    ({"factor": float("nan")}, r"rank factor .* got nan"),
    ({"mode": "energy", "energy": 0.0}, r"energy fraction .* \(0, 1\], got 0.0"),
    ({"mode": "energy", "energy": 1.2}, r"energy fraction .* got 1.2"),
    ({"mode": "fixed"}, r"'fixed' needs the rank as the minimum rank, got none \(rank_min\)"),
    ({"mode": "budget"}, r"exactly one of a MAC budget or a parameter budget, got 0"),
    ({"mode": "budget", "budget_macs": 1.5}, r"MAC budget .* got 1.5"),
    ({"round_to": 0}, r"rank rounding must be an integer >= 1, got 0 \(round_to\)"),
    ({"rank_min": 0}, r"minimum rank must be an integer >= 1, got 0 \(rank_min\)"),
])
def test_invalid_policies_raise_one_sentence(kwargs, message):
    with pytest.raises(RankPolicyError, match=message):
        RankPolicy(**kwargs).validate()


@pytest.mark.parametrize(("typo", "suggestion"), [("vbfm", "vbmf"), ("relativ", "relative"), ("Budget", "budget"),
                                                  ("enrgy", "energy")])
def test_unknown_mode_suggests_the_closest(typo, suggestion):
    with pytest.raises(RankPolicyError, match=f"did you mean '{suggestion}'"):
        check_rank_mode(typo)


def test_policy_round_trips_through_the_manifest():
    for policy in (RankPolicy(), RankPolicy(mode="budget", budget_params=0.4, round_to=4, rank_min=8),
                   RankPolicy(mode="energy", energy=0.95), RankPolicy(mode="fixed", rank_min=16)):
        again = RankPolicy.from_manifest(policy.to_manifest())
        assert again.to_manifest() == policy.to_manifest()
