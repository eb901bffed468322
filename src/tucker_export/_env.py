"""Installed package versions, read from their distribution metadata (no import of the package)."""

from __future__ import annotations

from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, version


def package_version(name: str, missing: str | None = "not installed") -> str | None:
    """The installed version of distribution ``name``, or ``missing`` when it is not installed."""
    try:
        return version(name)
    except PackageNotFoundError:
        return missing


def package_versions(names: Iterable[str], missing: str | None = "not installed") -> dict[str, str | None]:
    return {name: package_version(name, missing) for name in names}
