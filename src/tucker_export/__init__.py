"""tucker-export: Tucker-compress trained nnU-Net v2 models and deploy them through ONNX Runtime and TensorRT.

The heavy pieces (torch, nnU-Net, ONNX, TensorRT) are imported by the submodules that need them, so
``import tucker_export`` stays cheap and works without optional dependencies.
"""

from tucker_export.errors import TuckerExportError

__version__ = "0.1.0"

__all__ = ["TuckerExportError", "__version__"]
