"""Exposure trade-off benchmark: NDCG@10 vs provider Gini at several ``topk.exposure_weight`` values.

    python pipelines/benchmark_exposure.py --run RUN [--weights 0 0.1 0.2 0.3 0.5 0.8] [--out benchmarks] [--refit]

All logic lives in benchmarks.exposure; this only forwards the arguments.
"""

import sys

import _checkout  # noqa: F401  (this checkout's adrec and benchmarks first, see _checkout.py)
from benchmarks.exposure import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
