"""Top-K benchmark on MovieLens-100k: adrec's two-stage path vs most-popular, ALS, BPR, item-item
(cosine, BM25) and EASE, under the protocol of docs/design.md.

    python pipelines/benchmark_topk.py --data-dir ../shared/data/ml-100k --out runs/bench_topk [--repeats 3] [--quick]
        [--reranker sklearn]

All logic lives in benchmarks.topk; this only forwards the arguments.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, home of `benchmarks`

from benchmarks.topk import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
