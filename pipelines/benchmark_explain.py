"""Explanations benchmark: the faithfulness check and the cost of explain=true on a trained run.

    python pipelines/benchmark_explain.py --run RUN [--users 50] [--requests 20] [--out benchmarks]

All logic lives in benchmarks.explain; this only forwards the arguments.
"""

import sys

import _checkout  # noqa: F401  (this checkout's adrec and benchmarks first, see _checkout.py)
from benchmarks.explain import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
