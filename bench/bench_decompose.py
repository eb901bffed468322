"""Benchmark: decomposing a TotalSegmentator-size nnU-Net at rank factor 0.3.

The benchmark lives in ``tucker_export.benchmarks.decompose`` (its docstring: what it measures, how,
and its options); this file is the reproducible entry point the README's commands name.
"""

import sys

from tucker_export.benchmarks.decompose import main

if __name__ == "__main__":
    sys.exit(main())
