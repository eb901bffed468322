"""`validation.timing`: latency statistics, round-robin timing, count checks, peak memory.

No test compares timings (a shared CPU makes any "faster than" assertion flaky).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from tucker_export.errors import ConfigurationError
from tucker_export.validation.timing import PeakMemory, interleaved_latency, latency


def test_latency_statistics_of_a_callable() -> None:
    shapes: list[tuple[int, ...]] = []

    def network(batch: np.ndarray) -> np.ndarray:
        shapes.append(batch.shape)
        return batch * 2.0

    stats = latency(network, (2, 8, 8, 8), batch_sizes=(1, 3), warmup=2, repeats=5)
    assert sorted(stats) == [1, 3]
    assert shapes == [(1, 2, 8, 8, 8)] * 7 + [(3, 2, 8, 8, 8)] * 7  # warm-up + timed calls, per batch size
    for batch, s in stats.items():
        assert s.batch_size == batch and s.repeats == 5 and s.warmup == 2 and len(s.samples_s) == 5
        assert s.min_s <= s.p10_s <= s.median_s <= s.p90_s <= s.max_s
        assert s.iqr_s >= 0 and s.std_s >= 0
        assert s.per_patch_median_s == pytest.approx(s.median_s / batch)
        assert s.patches_per_s == pytest.approx(batch / s.median_s)
        json.dumps(s.to_dict(), allow_nan=False)


def test_interleaved_latency_times_every_target_each_round() -> None:
    calls: list[str] = []
    targets = {name: (lambda b, n=name: calls.append(n)) for name in ("a", "b", "c")}
    stats = interleaved_latency(targets, (1, 4, 4), batch_sizes=(1,), warmup=0, repeats=3)
    assert set(stats) == {"a", "b", "c"} and all(s[1].repeats == 3 for s in stats.values())
    # one call per target and round, the order rotating by one each round
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]


@pytest.mark.parametrize("kwargs, message", [
    ({"repeats": 0}, r"repeat count must be an integer >= 1, got 0 \(repeats\)"),
    ({"warmup": -1}, r"warm-up count must be an integer >= 0, got -1 \(warmup\)"),
    ({"batch_sizes": (0,)}, ">= 1"),
])
def test_latency_refuses_bad_counts(kwargs, message) -> None:
    with pytest.raises(ConfigurationError, match=message):
        latency(lambda b: b, (1, 4, 4), **kwargs)
    with pytest.raises(ConfigurationError, match="channels"):
        latency(lambda b: b, (4,))


def test_peak_memory_sees_an_allocation_inside_the_block() -> None:
    with PeakMemory() as probe:
        block = np.ones(64 * 2**20, dtype=np.uint8)  # 64 MiB, touched
        del block
    result = probe.result
    assert result["peak_rss_bytes"] > 0
    if result["rss_scope"].startswith("this measurement"):
        assert result["peak_rss_increase_bytes"] >= 48 * 2**20
