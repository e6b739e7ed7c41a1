"""Storage benchmark: `python pipelines/benchmark_storage.py --out bench_results/storage [--repeats 3]`.

The same served run on the local disk and on an S3 store (moto's server on 127.0.0.1), side by side in one
run: deploy from a cold cache, a new version reaching every replica, /recommend and /feedback p50/p99 at
concurrency 8; medians, ratios, JSON and a markdown table under --out.
All logic lives in benchmarks.storage; this only forwards the arguments.
"""

import sys

import _checkout  # noqa: F401  (this checkout's adrec and benchmarks first, see _checkout.py)
from benchmarks.storage import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
