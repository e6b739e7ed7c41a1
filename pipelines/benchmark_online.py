"""Online-learning benchmark (drift mode), also a Ray job:
`ray job submit --working-dir . -- python pipelines/benchmark_online.py --out runs/bench_online`.

Trains the initial model on the pre-drift part of the synthetic drift log, serves it, streams the rest of
the log through POST /feedback over HTTP while the online learner learns beside the Serve app, and compares
the frozen and the online model's progressive AUC / logloss before and after the drift, with serving p99
under load while the learner is paused vs learning. JSON and a markdown table under --out.
`--two-node`: the serving p99 part only, with the learner on a second Ray node and the run on an S3 server
(benchmarks/online_nodes.py; needs root and unshare, as the two-node acceptance test).
All logic lives in benchmarks.online; this only forwards the arguments.
"""

import sys

import _checkout  # noqa: F401  (this checkout's adrec and benchmarks first, see _checkout.py)
from benchmarks.online import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
