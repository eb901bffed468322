"""Pre- and post-processing on a large scan, stock nnU-Net vs tucker-export, each stage in its own process.

The benchmark lives in ``tucker_export.benchmarks.prepost`` (its docstring: what it measures, how,
and its options); this file is the reproducible entry point the README's commands name.
"""

import sys

from tucker_export.benchmarks.prepost import main

if __name__ == "__main__":
    sys.exit(main())
