"""Benchmark: label-free distillation fine-tuning on the demo model (rank factors 0.1 and 0.2), before vs after.

The benchmark lives in ``tucker_export.benchmarks.finetune`` (its docstring: what it measures, how,
and its options); this file is the reproducible entry point the README's commands name.
"""

import sys

from tucker_export.benchmarks.finetune import main

if __name__ == "__main__":
    sys.exit(main())
