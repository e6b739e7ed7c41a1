"""Torch files that hold data only: written as plain state, read back with ``torch.load(weights_only=True)``.

A checkpoint with pickled objects in it runs code when it is loaded, and a run folder may sit on shared
storage that others can write. So every torch file adrec writes holds only tensors, numbers, strings,
None and lists / tuples / dicts / sets of them (:func:`plain` converts numpy values and dataclasses on the
way out), and every one it reads goes through :func:`load`, whose refusal says how to rebuild the file
instead of suggesting, as torch's own message does, to load it unsafely.
"""

from __future__ import annotations

import dataclasses
import pickle
import re
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from adrec.errors import UnsafeFileError

__all__ = ["load", "plain", "save"]


def plain(obj: Any) -> Any:
    """``obj`` with numpy arrays as tensors (object and string arrays as lists), numpy scalars as Python
    numbers and dataclasses as dicts, recursively; what :func:`load` can read back."""
    if isinstance(obj, torch.Tensor) or obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        return obj
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind in "biuf":
            return torch.from_numpy(np.ascontiguousarray(obj))
        return plain(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {plain(k): plain(v) for k, v in obj.items()}
    for kind in (list, tuple, set):  # subclasses (a namedtuple, say) would need their class to load: the builtin
        if isinstance(obj, kind):
            return kind(plain(v) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    raise TypeError(f"{type(obj).__name__} is not plain state: a torch file of adrec holds only tensors, "
                    "numbers, strings and containers of them")


def save(obj: Any, f: str | Path | IO[bytes]) -> None:
    """``torch.save`` of :func:`plain` ``(obj)``."""
    torch.save(plain(obj), f)


def load(path: str | Path | IO[bytes], what: str, remedy: str) -> Any:
    """The plain state in the torch file ``path`` (on the CPU). A file that needs more than tensors and
    plain values to load is refused, its objects never built: :class:`UnsafeFileError` naming ``what``
    the file should be and ``remedy``, how to get a good one."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"WeightsUnpickler error: ([^\n]*)", str(err))
        detail = re.sub(r"\x1b\[[0-9;]*m", "", found.group(1) if found else str(err).splitlines()[0]).strip()
        raise UnsafeFileError(f"{path} is refused: {what} holds only tensors and plain values, this file holds "
                              f"objects that only running code from it could rebuild ({detail}); {remedy}") from None
