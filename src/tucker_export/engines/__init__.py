"""Inference engines over a bundle: PyTorch, ONNX Runtime and TensorRT behind one Runner interface.

- ``runners``: ``Runner`` (a context manager that owns its session; ``infer(batch) -> logits``)
  and ``TorchRunner``, ``OnnxRuntimeRunner``, ``TensorRTRunner``;
- ``keys``: engine keys, batch profiles, timing-cache paths, manifest records and the
  "does this engine fit this machine" check, all plain code;
- ``build``: ``build_engines`` (``tucker-export build``): the build plan in plain code, the build
  itself through ``tensorrt_backend``;
- ``tensorrt_backend``: the only module that imports ``tensorrt`` (lazily), for TensorRT 10.x and
  11.x;
- ``selection``: ``select_backend`` (``auto``: a matching TensorRT engine, else ONNX Runtime on
  the best provider, else PyTorch); ``doctor`` reports what is installed.

Nothing heavy is imported here: ``import tucker_export.engines`` works without tensorrt,
onnxruntime-gpu or a GPU.
"""

from __future__ import annotations

__all__ = ["build", "keys", "runners", "selection", "tensorrt_backend"]
