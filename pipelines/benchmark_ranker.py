"""Ranker benchmark (issue 3), also a Ray job:
`ray job submit --working-dir . -- python pipelines/benchmark_ranker.py --out runs/bench_ranker`.

adrec's fusion ranker beside constant CTR, logistic regression (with and without hashed crosses),
LightGBM, DeepFM (deepctr-torch) and frozen-encoder embeddings + logistic regression, on MovieLens-100k
and the synthetic ad log, same split; test AUC / logloss / calibration / wall time, medians over seeds,
as JSON and a markdown table under --out (`--quick` for a tiny run), with the test AUC on cold / warm
items, few-shot users and (strict protocol, `--new-items 0.2`) new items; `--ablation` adds adrec's
text-tower variants.
All logic lives in benchmarks.ranker; this only forwards the arguments.
"""

import sys

import _checkout  # noqa: F401  (this checkout's adrec and benchmarks first, see _checkout.py)
from benchmarks.ranker import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
