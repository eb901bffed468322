"""Where the benchmarks find the checkout and the real CT, and where they write by default.

They are run from a checkout (`python bench/<name>.py` in the repository root): results go to
``bench/results/`` there, and the real CT is the workplace's ``../shared`` copy, which users' clones
do not have (the benchmarks that need it say so and stop).
"""

from __future__ import annotations

from pathlib import Path


def _find_checkout() -> Path:
    for folder in (Path.cwd(), *Path.cwd().parents):
        if (folder / "pyproject.toml").is_file() and (folder / "bench").is_dir():
            return folder
    return Path.cwd()


REPO = _find_checkout()
RESULTS = REPO / "bench" / "results"
SHARED = REPO.parent / "shared" / "data" / "totalsegmentator-example"
