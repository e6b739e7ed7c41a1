"""Ray job entrypoint for `adrec prepare`: `ray job submit --working-dir . -- python pipelines/prepare.py --run R ...`.

All logic lives in the library; this only forwards the arguments.
"""

import sys

import _checkout  # noqa: F401  (this checkout's adrec first: a job runs the code it was submitted with)
from adrec.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
