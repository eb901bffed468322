"""Typed errors: every failure a user can cause or fix is one of these.

Each message is one sentence that names the thing that is wrong and, where there is one, the fix.
The CLI prints the message and exits 1 without a traceback; library callers catch
``TuckerExportError`` (or a subclass) to handle them.

An error about one argument names it by its library name (``option``, e.g. ``precision``) and,
where one value would work, that value (``use``); the message itself states the rule and what was
given. ``str(error)`` adds the hint in Python terms (``use precision='fp32'``), the CLI in its
own flags (``use --precision fp32``): flag names live only in ``tucker_export.cli``.
"""

from __future__ import annotations

from collections.abc import Callable


class TuckerExportError(Exception):
    """Base class of all errors tucker-export raises for bad input or an unusable environment."""

    def __init__(self, message: str, *, option: str | None = None, use: str | bool | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.option = option
        self.use = use

    def __str__(self) -> str:
        return self.describe(lambda option: option, python=True)

    def describe(self, name_of: Callable[[str], str], *, python: bool = False) -> str:
        """The message with the hint about ``option``, named by ``name_of`` (the CLI passes its flag names)."""
        if self.option is None:
            return self.message
        name = name_of(self.option)
        stem = self.message.rstrip(".")
        if self.use is None:
            return f"{stem} ({name})."
        if self.use is True:  # a switch: the flag alone
            return f"{stem}; use {name}=True." if python else f"{stem}; use {name}."
        return f"{stem}; use {name}={self.use!r}." if python else f"{stem}; use {name} {self.use}."


class ModelFolderError(TuckerExportError):
    """The nnU-Net model folder is missing, incomplete or not nnU-Net's."""


class CheckpointError(TuckerExportError):
    """A checkpoint cannot be read safely or does not fit the network."""


class ConfigurationError(TuckerExportError):
    """The plans do not hold the requested configuration, or options contradict each other."""


class TrainerNotFoundError(TuckerExportError):
    """The trainer class named by a checkpoint cannot be found."""


class BundleError(TuckerExportError):
    """A deployment bundle is missing, corrupt, or does not match what is asked of it."""


class RankPolicyError(TuckerExportError):
    """A rank policy or its parameters are invalid."""


class ExportError(TuckerExportError):
    """ONNX export or its checks failed."""


class EngineError(TuckerExportError):
    """Building or loading an inference engine failed."""


class EngineMismatchError(EngineError):
    """An engine was built for another GPU, TensorRT version or ONNX file."""


class BackendUnavailableError(TuckerExportError):
    """The requested backend (TensorRT, CUDA, ...) is not usable on this machine."""


class InputImageError(TuckerExportError):
    """An input image or folder cannot be used (unreadable, wrong channels, wrong dimensionality)."""


class BrokenScanError(InputImageError):
    """A scan failed an integrity check: truncated, NaN voxels, missing slices, too large for memory, ..."""


class ValidationFailedError(TuckerExportError):
    """One or more validation thresholds failed; the message lists every failure."""


class DemoBuildError(TuckerExportError):
    """The built-in demo model could not be built."""
