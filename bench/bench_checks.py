"""What the input integrity checks cost: check time against `infer`'s time on the real CT.

The benchmark lives in ``tucker_export.benchmarks.checks`` (its docstring: what it measures, how,
and its options); this file is the reproducible entry point the README's commands name.
"""

import sys

from tucker_export.benchmarks.checks import main

if __name__ == "__main__":
    sys.exit(main())
