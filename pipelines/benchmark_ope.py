"""Off-policy evaluation benchmark on the Open Bandit Dataset sample bundled in obp: adrec's IPS/SNIPS/DR and obp's.

    python pipelines/benchmark_ope.py [--campaigns all men women] [--seeds 0 1 2] [--n-boot 500] [--out benchmarks]

All logic lives in benchmarks.ope; this only forwards the arguments.
"""

import sys

import _checkout  # noqa: F401  (this checkout's adrec and benchmarks first, see _checkout.py)

from benchmarks.ope import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
