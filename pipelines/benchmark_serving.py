"""Serving benchmark as a Ray job: `ray job submit --working-dir . -- python pipelines/benchmark_serving.py --run R`.

Bounded load on the Serve graph at concurrency 1, 8 and 32, side by side with the same top-10 computed
in-process and by an encoder-per-request ranker; JSON and a markdown table under --out.
All logic lives in adrec.serving.loadtest; this only forwards the arguments.
"""

import sys

from adrec.serving.loadtest import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
