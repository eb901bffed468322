"""The fine-tuning benchmark's plot is drawn from its JSON rows alone."""

from __future__ import annotations

from tucker_export.benchmarks.finetune import plot


def test_plot_draws_before_and_after_per_factor(tmp_path):
    row = {"before": {"vs_original_mean": 0.96, "vs_original_min": 0.93},
           "after": {"vs_original_mean": 0.997, "vs_original_min": 0.993}}
    path = plot({"rows": {"0.1": row, "0.2": row}}, tmp_path / "finetune.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
