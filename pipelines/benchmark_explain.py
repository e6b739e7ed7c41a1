"""Explanations benchmark: the faithfulness check and the cost of explain=true on a trained run.

    python pipelines/benchmark_explain.py --run RUN [--users 50] [--requests 20] [--out benchmarks]

All logic lives in benchmarks.explain; this only forwards the arguments.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, home of `benchmarks`

from benchmarks.explain import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
