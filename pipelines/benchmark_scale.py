"""Scale benchmark (issue 13): the streaming prepare on synthetic logs of 1M, 4M and 16M impressions
(200k users, 20k ads), the in-process prepare beside it at 1M and 4M; prepare time, rows/s, peak driver
RSS and peak machine memory as JSON, a markdown table and a plot under --out.
`python pipelines/benchmark_scale.py --out bench_results/scale [--sizes 1000000 4000000]`.
All logic lives in benchmarks.scale; this only forwards the arguments.
"""

import sys

import _checkout  # noqa: F401  (this checkout's adrec and benchmarks first, see _checkout.py)
from benchmarks.scale import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
