"""Ray job entrypoint for `adrec candidates`: `ray job submit --working-dir . -- python pipelines/candidates.py --run R ...`.

All logic lives in the library; this only forwards the arguments.
"""

import sys

from adrec.cli import main

if __name__ == "__main__":
    sys.exit(main(["candidates", *sys.argv[1:]]))
