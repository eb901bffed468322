"""`infer --ray` (1 worker x 2 cores, 2 workers x 1 core) against serial `infer` on 8 demo cases.

The benchmark lives in ``tucker_export.benchmarks.ray_scaleout`` (its docstring: what it measures,
how, and its options); this file is the reproducible entry point the README's commands name.
"""

import sys

from tucker_export.benchmarks.ray_scaleout import main

if __name__ == "__main__":
    sys.exit(main())
