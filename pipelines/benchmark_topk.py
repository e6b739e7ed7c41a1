"""Top-K benchmark on MovieLens-100k: adrec's two-stage path vs most-popular, ALS, BPR, item-item
(cosine, BM25) and EASE, under the protocol of docs/design.md.

    python pipelines/benchmark_topk.py --data-dir ../shared/data/ml-100k --out runs/bench_topk [--repeats 3] [--quick]
        [--reranker sklearn]

All logic lives in benchmarks.topk; this only forwards the arguments.
"""

import sys

import _checkout  # noqa: F401  (this checkout's adrec and benchmarks first, see _checkout.py)
from benchmarks.topk import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
