"""Small helpers shared by ``bench``, ``timing`` and ``sweep``: JSON-safe values, option checks, text tables."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tucker_export._text import table as _table  # noqa: F401  (bench and sweep_report import it from here)
from tucker_export.errors import ConfigurationError

DEFAULT_SEED = 0


def _json_safe(value: Any) -> Any:
    """Plain JSON types: numpy scalars to Python, NaN/Inf to None (JSON has no NaN), paths to str."""
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    return value


def parse_batch_sizes(value: str | Sequence[int]) -> tuple[int, ...]:
    """``"1,2,4"`` or ``[1, 2, 4]`` -> ``(1, 2, 4)``; duplicates dropped, order kept; each must be >= 1."""
    parts: list[Any] = value.replace(",", " ").split() if isinstance(value, str) else list(value)
    sizes: list[int] = []
    for part in parts:
        try:
            size = int(part)
        except (TypeError, ValueError):
            raise ConfigurationError(f"Batch size {part!r} is not an integer (e.g. 1,2,4).", option="batch_sizes") from None
        if size < 1:
            raise ConfigurationError(f"Batch sizes must be integers >= 1, got {part!r}.")
        if size not in sizes:
            sizes.append(size)
    if not sizes:
        raise ConfigurationError("At least one batch size is needed (e.g. 1,2,4).", option="batch_sizes")
    return tuple(sizes)


def _check_counts(warmup: int, repeats: int) -> None:
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ConfigurationError(f"The warm-up count must be an integer >= 0, got {warmup!r}.", option="warmup")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ConfigurationError(f"The repeat count must be an integer >= 1, got {repeats!r}.", option="repeats")
