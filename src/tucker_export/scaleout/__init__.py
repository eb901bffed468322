"""Past one process: `infer` over Ray workers (``ray_inference``), a Triton model repository (``triton``).

Both are optional: Ray and tritonclient are imported only when these are used (``pip install
tucker-export[ray]`` / ``[triton]``).
"""
