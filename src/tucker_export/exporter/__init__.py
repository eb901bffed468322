"""Tucker decomposition of nnU-Net networks (``decompose``) and their export.

Heavy modules (torch, tensorly, onnx) are imported by the submodules, not here.
"""
