"""Where a schema table's rows lie: a file, a folder of shards, a glob or a URI, listed once.

The streaming prepare reads what this lists with Ray Data; listing in the driver (not in the readers)
gives every file a fixed number, so a row is named by (file, row) the same way in every run.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path

from adrec.data.schema import _Table
from adrec.errors import ConfigError, DataError
from adrec.storage import resolve

_GLOB = set("*?[")
PARQUET_EXT = (".parquet", ".pq")
#: Where a streamed row came from: its file's number in :class:`TableFiles` and its row in that file.
POSITION = ["_file", "_row"]


@dataclass(frozen=True)
class TableFiles:
    """The files of one table, sorted, on one filesystem."""

    fs: object  # a pyarrow.fs.FileSystem
    paths: list[str]  # as that filesystem names them
    format: str  # "csv" or "parquet"
    base_dir: str | None  # the folder the table names (partition keys are read below it), else None
    where: str  # how messages name the table's location (the schema's path, resolved)

    def display(self, i: int) -> str:
        """How an error names file ``i``: a URI keeps its scheme, a local file is its path."""
        scheme = self.where.split("://", 1)[0] + "://" if "://" in self.where else ""
        return scheme + self.paths[i]


def _visible(path: str) -> bool:
    """Writers leave markers beside their shards (_SUCCESS, .crc, _metadata): those are not data."""
    return not any(part.startswith(("_", ".")) for part in path.split("/")[-1:])


def list_table(table: _Table, root: Path, what: str) -> TableFiles:
    """The files of ``table`` (its ``path`` relative to ``root`` unless absolute or a URI)."""
    from pyarrow import fs as pafs

    where = table.path if "://" in table.path else str((root / table.path).expanduser())
    try:
        loc = resolve(where)
    except ConfigError as err:
        raise DataError(f"{what}: {err}") from None
    fs, base = loc.fs, loc.path
    base_dir = None
    if any(c in base for c in _GLOB):
        parts = base.split("/")
        first = next(i for i, p in enumerate(parts) if any(c in p for c in _GLOB))
        top = "/".join(parts[:first]) or "/"
        infos = fs.get_file_info(pafs.FileSelector(top, recursive=True, allow_not_found=True))
        paths = [i.path for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatchcase(i.path, base)]
    else:
        info = fs.get_file_info(base)
        if info.type == pafs.FileType.File:
            paths = [base]
        elif info.type == pafs.FileType.Directory:
            infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
            paths = [i.path for i in infos if i.type == pafs.FileType.File]
            base_dir = base
        else:
            raise DataError(f"{what}: {where} does not exist (schema path '{table.path}', relative to {root})")
    paths = sorted(p for p in paths if _visible(p))
    fmt = table.format
    if fmt is None:
        fmt = "parquet" if paths and all(p.endswith(PARQUET_EXT) for p in paths) else "csv"
    if base_dir is not None and fmt == "parquet":
        paths = [p for p in paths if p.endswith(PARQUET_EXT)] or paths
    if not paths:
        raise DataError(f"{what}: no files at {where} (schema path '{table.path}')")
    return TableFiles(fs, paths, fmt, base_dir, where)
