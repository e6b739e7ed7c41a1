"""Exposure trade-off benchmark: NDCG@10 vs provider Gini at several ``topk.exposure_weight`` values.

    python pipelines/benchmark_exposure.py --run RUN [--weights 0 0.1 0.2 0.3 0.5 0.8] [--out benchmarks] [--refit]

All logic lives in benchmarks.exposure; this only forwards the arguments.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, home of `benchmarks`

from benchmarks.exposure import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
