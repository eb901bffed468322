"""Benchmark: the CPU engines side by side on the TotalSegmentator-size network, original vs Tucker.

The benchmark lives in ``tucker_export.benchmarks.cpu_engines`` (its docstring: what it measures, how,
and its options); this file is the reproducible entry point the README's commands name.
"""

import sys

from tucker_export.benchmarks.cpu_engines import main

if __name__ == "__main__":
    sys.exit(main())
