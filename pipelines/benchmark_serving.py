"""Serving benchmark as a Ray job: `ray job submit --working-dir . -- python pipelines/benchmark_serving.py --run R`.

Bounded load on both Serve topologies (graph and fused) and Serve's floor, behind each of Serve's HTTP
ingresses (--ingress haproxy,proxy: each on its own local Ray, started in turn), side by side, --repeats
runs each, medians, at concurrency 1, 8 and 32, next to the same top-10 computed in-process and by an
encoder-per-request ranker; CPU ms/request per process, the load average before/after; JSON and a
markdown table under --out.
All logic lives in benchmarks.serving; this only forwards the arguments.
"""

import sys

import _checkout  # noqa: F401  (this checkout's adrec and benchmarks first, see _checkout.py)
from benchmarks.serving import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
