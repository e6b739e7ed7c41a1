"""``python -m adrec``: the same command line as ``adrec``."""

import sys

from adrec.cli import main

sys.exit(main())
