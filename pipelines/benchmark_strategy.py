"""Serving strategy benchmark: the per-request cost of objectives and exploration policies on a trained run.

    python pipelines/benchmark_strategy.py --run RUN [--users 300] [--calls 300] [--out benchmarks]

All logic lives in benchmarks.strategy; this only forwards the arguments.
"""

import sys

import _checkout  # noqa: F401  (this checkout's adrec and benchmarks first, see _checkout.py)
from benchmarks.strategy import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
