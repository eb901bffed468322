"""The `tucker-export` command line: ``main`` holds the group and most commands; ``decompose``,
``export``, ``build`` and ``bench`` their own, and ``options`` what they share. Flag names live only
in this package; the library below it raises errors that state the rule and the values."""

from tucker_export.cli.main import _Group, cli, configure_logging, main

__all__ = ["_Group", "cli", "configure_logging", "main"]
