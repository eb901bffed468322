"""Parameters and MACs are counted by running the network; the meta pass equals a real one."""

from __future__ import annotations

import torch
from torch import nn

from tucker_export.exporter.counting import count_network
from tucker_export.exporter.decompose import decompose_network
from tucker_export.exporter.ranks import RankPolicy

from ._nets import load_network, model_folder


def test_macs_of_a_conv_and_a_transposed_conv_by_hand():
    network = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.ConvTranspose3d(4, 3, 2, stride=2), nn.Conv3d(3, 5, 1))
    counts = count_network(network, (2, 8, 8, 8))
    assert counts.convs["0"].macs == 8**3 * 4 * 2 * 27
    assert counts.convs["1"].macs == 8**3 * 4 * 3 * 8  # every input voxel scatters a 2x2x2 kernel
    assert counts.convs["2"].macs == 16**3 * 5 * 3
    assert counts.params == sum(p.numel() for p in network.parameters())
    assert [c.name for c in counts.executed_in_order()] == ["0", "1", "2"]


def test_unexecuted_convs_count_zero_and_grouped_convs_divide():
    class WithHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 8, 3, padding=1, groups=4)
            self.unused = nn.Conv2d(8, 8, 1)  # like a deep-supervision head at inference

        def forward(self, x):
            return self.conv(x)

    network = WithHead()
    counts = count_network(network, (4, 6, 6))
    assert counts.convs["conv"].macs == 36 * 8 * 1 * 9
    assert counts.convs["unused"].macs == 0 and counts.convs["unused"].calls == 0


def test_meta_count_equals_a_real_run_and_leaves_the_network_untouched(tmp_path):
    network, input_shape = load_network(model_folder(tmp_path, "resenc-3d-anisotropic"))
    before = {k: v.clone() for k, v in network.state_dict().items()}
    meta = count_network(network, input_shape)
    real = count_network(network, input_shape, device="cpu")
    assert {k: (v.macs, v.params, v.calls) for k, v in meta.convs.items()} == {
        k: (v.macs, v.params, v.calls) for k, v in real.convs.items()
    }
    assert all(p.device.type == "cpu" for p in network.parameters())
    assert all(torch.equal(before[k], v) for k, v in network.state_dict().items())
    assert network.encoder is network.decoder.encoder


def test_factorized_macs_match_the_cost_model(tmp_path):
    """What the budget and no-gain rule predict is what the factorized network really does."""
    network, input_shape = load_network(model_folder(tmp_path, "plain-3d-anisotropic"))
    result = decompose_network(network, input_shape, RankPolicy(factor=0.4, round_to=1))
    for entry in result.layers:
        if entry["action"] != "factorized":
            continue
        module = network.get_submodule(entry["name"])
        count = result.count_before.convs[entry["name"]]
        r_out, r_in = entry["ranks"]
        kernel = module.core.weight[0, 0].numel()
        core_voxels = count.input_voxels if entry["op"].startswith("ConvTranspose") else count.output_voxels
        expected = (entry["in_channels"] * r_in * count.input_voxels + r_in * r_out * kernel * core_voxels
                    + r_out * entry["out_channels"] * count.output_voxels)
        assert entry["macs_after"] == expected
        assert entry["params_after"] == sum(p.numel() for p in module.parameters())
    assert result.totals["macs_after"] == sum(e["macs_after"] for e in result.layers)
