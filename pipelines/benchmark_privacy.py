"""DP-SGD benchmark: test AUC of the ranker at several epsilons and without DP.

    python pipelines/benchmark_privacy.py --run RUN [--epsilons 1 3 8] [--seeds 0 1 2] [--epochs 2] [--out benchmarks]

All logic lives in benchmarks.privacy; this only forwards the arguments.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, home of `benchmarks`

from benchmarks.privacy import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
