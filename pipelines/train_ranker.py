"""Ray job entrypoint for `adrec train`: `ray job submit --working-dir . -- python pipelines/train_ranker.py --run R ...`.

All logic lives in the library; this only forwards the arguments.
"""

import sys

from adrec.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
