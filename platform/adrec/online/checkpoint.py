"""One file holds the learner's whole state; it is replaced atomically.

The log offset, the model weights, the optimizer state, the attribution joiner, the queue of labelled
examples not yet learned, the online catalog and the progressive metrics are written together, in one
``torch.save`` to a temporary file that is fsync-ed and then renamed over ``checkpoint.pt`` (and the
folder fsync-ed). A reader therefore finds the previous complete state or the new complete state,
never a mix: the offset can never run ahead of (or lag behind) the model it belongs to.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from adrec import torchfile
from adrec.storage import fsync_path

log = logging.getLogger(__name__)

FORMAT = 1
NAME = "checkpoint.pt"


def save_checkpoint(state_dir: Path, state: dict) -> Path:
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    final = state_dir / NAME
    tmp = state_dir / f".{NAME}.tmp"
    with open(tmp, "wb") as f:
        torchfile.save({"format": FORMAT, **state}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    fsync_path(state_dir)
    return final


def load_checkpoint(state_dir: Path) -> dict | None:
    path = Path(state_dir) / NAME
    if not path.is_file():
        return None
    # Plain state only (weights_only): a run folder on shared storage must not be a way to run code here.
    state = torchfile.load(path, "the online learner's checkpoint",
                           f"delete {path} to start the learner afresh from its base version")
    if int(state.get("format", 0)) > FORMAT:
        raise ValueError(f"{path} was written by a newer adrec (format {state['format']} > {FORMAT})")
    return state
