"""This checkout first on ``sys.path``: every forwarder in ``pipelines/`` imports it before ``adrec``.

``ray job submit --working-dir . -- python pipelines/<step>.py`` runs the step in Ray's unpacked copy of
the working dir, on a node that has its own install of adrec (cluster.yaml's image, an editable copy):
without this, the job's driver would import that install, not the code submitted with the job. The
library then ships the package it imported to the job's workers (``adrec.runtime.code_runtime_env``).
The repository root comes second, for ``benchmarks`` (the benchmark forwarders).
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

for entry in (str(ROOT), str(ROOT / "platform")):  # platform/ ends up first
    if entry in sys.path:
        sys.path.remove(entry)
    sys.path.insert(0, entry)
