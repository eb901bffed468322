"""Typed errors: every failure a user can cause or fix is one of these.

Each message is one sentence that names the thing that is wrong and, where there is one, the fix.
The CLI prints the message and exits 1 without a traceback; library callers catch
``TuckerExportError`` (or a subclass) to handle them.
"""

from __future__ import annotations


class TuckerExportError(Exception):
    """Base class of all errors tucker-export raises for bad input or an unusable environment."""


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
