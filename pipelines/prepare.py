"""Ray job entrypoint for `adrec prepare`: `ray job submit --working-dir . -- python pipelines/prepare.py --run R ...`.

All logic lives in the library; this only forwards the arguments.
"""

import sys

from adrec.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
