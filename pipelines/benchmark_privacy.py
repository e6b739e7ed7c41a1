"""DP-SGD benchmark: test AUC of the ranker at several epsilons and without DP.

    python pipelines/benchmark_privacy.py --run RUN [--epsilons 1 3 8] [--seeds 0 1 2] [--epochs 2] [--out benchmarks]

All logic lives in benchmarks.privacy; this only forwards the arguments.
"""

import sys

import _checkout  # noqa: F401  (this checkout's adrec and benchmarks first, see _checkout.py)
from benchmarks.privacy import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
