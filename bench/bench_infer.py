"""End-to-end benchmark: stock `nnUNetv2_predict` vs `tucker-export infer` variants, as command-line processes.

The benchmark lives in ``tucker_export.benchmarks.real_ct`` (its docstring: what it measures, how,
and its options); this file is the reproducible entry point the README's commands name.
"""

import sys

from tucker_export.benchmarks.real_ct import main

if __name__ == "__main__":
    sys.exit(main())
