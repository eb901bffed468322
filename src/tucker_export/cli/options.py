"""What every command shares: list options, verbosity and progress, read one way."""

from __future__ import annotations

import click

from tucker_export.errors import TuckerExportError


def split_list(values: tuple[str, ...] | list[str]) -> list[str]:
    """`--precision fp32 --precision fp16`, `--precision fp32,fp16` and `-f "0 1"` all mean two values."""
    return [part for value in values for part in value.replace(",", " ").split()]


def split_folds(values: tuple[str, ...]) -> list[str] | None:
    """Folds from repeated or comma-separated `-f` options; None (every fold) when none was given."""
    return split_list(values) or None


def verbosity(ctx: click.Context) -> int:
    """The group's verbosity (`-v` count, -1 for `-q`); 0 when a command runs outside the group."""
    obj = ctx.find_root().obj
    return int(obj.get("verbosity", 0) or 0) if isinstance(obj, dict) else 0


def show_progress(ctx: click.Context) -> bool:
    """Progress bars unless `-q`."""
    return verbosity(ctx) >= 0


# Library argument names whose flag is not simply `--` + the name with dashes.
_FLAG_OF = {
    "workspace_gib": "--workspace",
    "batch_profile": "--batch",
    "rank_factors": "--sweep-rank-factor",
    "factor": "--rank-factor",
}


def flag_of(option: str) -> str:
    """The command-line flag of a library argument (``workspace_gib`` -> ``--workspace``)."""
    return _FLAG_OF.get(option, "--" + option.replace("_", "-"))


def describe_error(error: Exception) -> str:
    """A library error as the CLI says it: its hint names the flag, not the Python argument."""
    return error.describe(flag_of) if isinstance(error, TuckerExportError) else str(error)
