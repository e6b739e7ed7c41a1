"""Ray job entrypoint for `adrec tune`: `ray job submit --working-dir . -- python pipelines/tune.py --run R ...`.

All logic lives in the library; this only forwards the arguments.
"""

import sys

from adrec.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
