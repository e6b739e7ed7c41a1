"""One file holds the learner's whole state; it is replaced atomically.

The log position, the model weights, the optimizer state, the attribution joiner, the queue of labelled
examples not yet learned, the online catalog and the progressive metrics are written together, in one
``torch.save`` to a temporary file that is fsync-ed and then renamed over ``checkpoint.pt`` (and the
folder fsync-ed). A reader therefore finds the previous complete state or the new complete state,
never a mix: the position can never run ahead of (or lag behind) the model it belongs to. A state location
on an object store gets the same guarantee from its whole-object write (:meth:`adrec.storage.Location.write_bytes`):
the learner's state then survives the node it ran on.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path

from adrec import torchfile
from adrec.storage import Location, cache_dir, fsync_path, resolve

log = logging.getLogger(__name__)

FORMAT = 1
NAME = "checkpoint.pt"


def local_state_dir(state_dir: Path | Location | str) -> Path:
    """The local folder of a learner's state: the folder itself, or for a state on an object store the
    node's cache of it (where its status files are kept between checkpoints)."""
    loc = resolve(state_dir)
    folder = loc.local_path if loc.is_local else cache_dir("online", loc)
    folder.mkdir(parents=True, exist_ok=True)  # a node that resumes a state it never held has no cache yet
    return folder


def save_checkpoint(state_dir: Path | Location | str, state: dict) -> str:
    loc = resolve(state_dir)
    if not loc.is_local:
        buf = io.BytesIO()
        torchfile.save({"format": FORMAT, **state}, buf)
        (loc / NAME).write_bytes(buf.getvalue())
        return (loc / NAME).uri
    state_dir = loc.local_path
    state_dir.mkdir(parents=True, exist_ok=True)
    final = state_dir / NAME
    tmp = state_dir / f".{NAME}.tmp"
    with open(tmp, "wb") as f:
        torchfile.save({"format": FORMAT, **state}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    fsync_path(state_dir)
    return str(final)


def load_checkpoint(state_dir: Path | Location | str) -> dict | None:
    loc = resolve(state_dir) / NAME
    if not loc.is_file():
        return None
    path = loc.local_path if loc.is_local else io.BytesIO(loc.read_bytes())
    # Plain state only (weights_only): a run folder on shared storage must not be a way to run code here.
    state = torchfile.load(path, "the online learner's checkpoint",
                           f"delete {loc.uri} to start the learner afresh from its base version")
    if int(state.get("format", 0)) > FORMAT:
        raise ValueError(f"{loc.uri} was written by a newer adrec (format {state['format']} > {FORMAT})")
    return state
