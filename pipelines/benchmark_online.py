"""Online-learning benchmark (drift mode), also a Ray job:
`ray job submit --working-dir . -- python pipelines/benchmark_online.py --out runs/bench_online`.

Trains the initial model on the pre-drift part of the synthetic drift log, serves it, streams the rest of
the log through POST /feedback over HTTP while the online learner learns beside the Serve app, and compares
the frozen and the online model's progressive AUC / logloss before and after the drift, with serving p99
under load while the learner is paused vs learning. JSON and a markdown table under --out.
All logic lives in benchmarks.online; this only forwards the arguments.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, home of `benchmarks`

from benchmarks.online import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
