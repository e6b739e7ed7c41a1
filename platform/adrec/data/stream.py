"""Reading schema tables with Ray Data, block by block, for the streaming prepare.

Every row arrives as text with ``_file`` (its file's number in :class:`TableFiles`) and ``_row`` (its
1-based row in that file: the line for a CSV with a header counts the header), so a bad value is named
by file, column and row as the in-process read names it. Parsing and validation run in ``map_batches``
through the same functions as the in-process read (:func:`parse_interactions`, :func:`parse_entity`);
a :class:`Tally` actor counts bad rows across all blocks, so ``max_bad_rows`` holds exactly.

This module imports Ray: only the streaming prepare imports it.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import ray
from ray.data.datasource import FileBasedDatasource, Partitioning

from adrec.data.files import TableFiles, list_table
from adrec.data.ingest import Recorder, _BadRows, _EmptyFields, _header, parse_entity, parse_interactions
from adrec.data.schema import DatasetSchema, EntitySchema, _Table
from adrec.errors import DataError

log = logging.getLogger(__name__)

def _as_text(table: pa.Table) -> pa.Table:
    """Every column as text, a missing value as "" (what the in-process CSV read gives)."""
    import pyarrow.compute as pc

    cols = []
    for col in table.columns:
        if not pa.types.is_string(col.type) and not pa.types.is_large_string(col.type):
            col = pc.cast(col, pa.string())
        cols.append(pc.fill_null(col, ""))
    return pa.table(cols, names=table.column_names)


class _NumberedRows(FileBasedDatasource):
    """CSV or Parquet files as text columns plus each row's file number and row number."""

    def __init__(self, files: TableFiles, table: _Table, block_rows: int):
        partitioning = None
        if files.base_dir is not None and files.format == "parquet":
            partitioning = Partitioning("hive", base_dir=files.base_dir, filesystem=files.fs)
        super().__init__(files.paths, filesystem=files.fs, partitioning=partitioning)
        self._number = {p: i for i, p in enumerate(files.paths)}
        self._files = files
        self._table = table
        self._block_rows = block_rows

    def _file_number(self, path: str) -> int:
        if path in self._number:
            return self._number[path]
        hits = [i for p, i in self._number.items() if path.endswith(p) or p.endswith(path)]
        if len(hits) != 1:
            raise DataError(f"{path}: not among the files listed for this table")
        return hits[0]

    def _read_stream(self, f: "pa.NativeFile", path: str) -> Iterator[pa.Table]:
        number = self._file_number(path)
        where = self._files.display(number)
        if self._files.format == "parquet":
            batches, start = self._parquet(path, where), 1
        else:
            batches, start = self._csv(f, path, where), (2 if self._table.header else 1)
        for batch in batches:
            n = batch.num_rows
            batch = batch.append_column("_file", pa.array(np.full(n, number, dtype=np.int32)))
            batch = batch.append_column("_row", pa.array(np.arange(start, start + n, dtype=np.int64)))
            start += n
            yield batch

    def _parquet(self, path: str, where: str) -> Iterator[pa.Table]:
        import pyarrow.parquet as pq

        try:  # Parquet needs random access (its footer first): the stream Ray opened cannot seek
            pf = pq.ParquetFile(self._files.fs.open_input_file(path))
        except pa.ArrowInvalid as err:
            raise DataError(f"{where}: not a Parquet file ({err})") from None
        for batch in pf.iter_batches(batch_size=self._block_rows):
            yield _as_text(pa.Table.from_batches([batch]))

    def _names(self, path: str, where: str) -> list[str]:
        """The header of one file, cleaned as the in-process read cleans it (BOM, whitespace)."""
        if not self._table.header:
            return list(self._table.names)
        with self._files.fs.open_input_stream(path) as raw:
            head = b""
            while b"\n" not in head:
                chunk = raw.read(1 << 16)
                if not chunk:
                    break
                head += chunk
        try:
            line = head.split(b"\n", 1)[0].decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"{where}: not UTF-8 text ({err}); re-encode the file as UTF-8") from None
        cells = next(csv.reader(io.StringIO(line), delimiter=self._table.sep), [])
        names = _header(pd.Index(cells), where, self._table.strict_header)
        return list(self._table.names) if self._table.names else names

    def _csv(self, f, path: str, where: str) -> Iterator[pa.Table]:
        from pyarrow import csv as pacsv

        names = self._names(path, where)
        read = pacsv.ReadOptions(column_names=names, skip_rows=1 if self._table.header else 0,
                                 use_threads=False, block_size=1 << 22)
        parse = pacsv.ParseOptions(delimiter=self._table.sep, newlines_in_values=True)
        convert = pacsv.ConvertOptions(column_types={n: pa.string() for n in names}, strings_can_be_null=False,
                                       quoted_strings_can_be_null=False)
        try:
            reader = pacsv.open_csv(f, read_options=read, parse_options=parse, convert_options=convert)
            for batch in reader:
                yield pa.Table.from_batches([batch])
        except pa.ArrowInvalid as err:
            # pyarrow names the row's text; a short row (fewer cells than the header) is refused here,
            # where the in-process read fills it with empty cells.
            raise DataError(f"{where}: cannot be parsed with sep={self._table.sep!r}: {err}") from None


def read_rows(files: TableFiles, table: _Table, block_rows: int):
    """A Ray Data dataset of the table's rows: text columns, ``_file`` and ``_row``."""
    return ray.data.read_datasource(_NumberedRows(files, table, block_rows))


@ray.remote(num_cpus=0)
class Tally:
    """Bad rows and empty cells of every block, counted by the same classes as the in-process read."""

    def __init__(self, max_bad_rows: int):
        self.bad = _BadRows(max_bad_rows)
        self.empties = _EmptyFields()
        self.error: str | None = None
        self.ids: dict[str, set] = {"user": set(), "item": set()}
        self.counts: list[pd.DataFrame] = []

    def record(self, recorder: Recorder) -> str | None:
        """Counts one block's findings; returns the error once ``max_bad_rows`` is exceeded."""
        if self.error is None:
            try:
                recorder.replay(self.bad, self.empties)
            except DataError as err:
                self.error = str(err)
        return self.error

    def add_ids(self, users: np.ndarray, items: np.ndarray) -> None:
        """The distinct ids of one block (the driver indexes their union)."""
        self.ids["user"].update(users.tolist())
        self.ids["item"].update(items.tolist())

    def add_counts(self, counts: pd.DataFrame) -> None:
        """Counts of one shuffle partition (``column``, ``value``, ``n``), summed in :meth:`result`."""
        self.counts.append(counts)

    def result(self) -> dict:
        counts = pd.concat(self.counts, ignore_index=True) if self.counts else None
        if counts is not None:
            counts = counts.groupby(["column", "value"], as_index=False)["n"].sum()
        return {"total": self.bad.total, "per_file": dict(self.bad.count), "empty": dict(self.empties.count),
                "error": self.error, "users": sorted(self.ids["user"]), "items": sorted(self.ids["item"]),
                "counts": counts}


def _per_file(batch: pd.DataFrame):
    """(file number, text cells of that file's rows, their row numbers) of a batch, in file order.

    The cells are cast to pandas' ``str`` dtype, what the in-process read gives: Ray hands Arrow-backed
    columns, where a number parsed from text keeps NaN apart from missing and the parsers would let a
    bad value through."""
    for number, part in batch.groupby("_file", sort=True):
        cells = part.drop(columns=["_file", "_row"]).astype(str).reset_index(drop=True)
        yield int(number), cells, part["_row"].to_numpy()


def read_interactions(schema: DatasetSchema, root: Path, key: bytes, tally, block_rows: int):
    """(files, dataset of canonical interactions with ``_file`` / ``_row``), parsed per block."""
    spec = schema.interactions
    files = list_table(spec, root, "interactions")

    def parse(batch: pd.DataFrame) -> pd.DataFrame:
        rec, outs = Recorder(), []
        for number, part, rows in _per_file(batch):
            out, keep = parse_interactions(part, rows, files.display(number), spec, rec, rec, key)
            out["_file"] = np.int32(number)
            out["_row"] = rows[keep]
            outs.append(out)
        error = ray.get(tally.record.remote(rec))
        if error:
            raise DataError(error)
        out = pd.concat(outs, ignore_index=True)
        ray.get(tally.add_ids.remote(pd.unique(out["user"]), pd.unique(out["item"])))
        return out

    ds = read_rows(files, spec, block_rows).map_batches(parse, batch_format="pandas", batch_size=block_rows)
    return files, ds


def read_entity(spec: EntitySchema, root: Path, bad: _BadRows, empties: _EmptyFields, kind: str,
                key: bytes | None, block_rows: int) -> pd.DataFrame:
    """A side table (catalog-sized: it is held in the driver) read by Ray Data, parsed per file."""
    files = list_table(spec, root, kind)
    rows = read_rows(files, spec, block_rows).to_pandas()
    outs, where = [], []
    for number, part, lines in _per_file(rows):
        out = parse_entity(part, lines, files.display(number), spec, bad, empties, kind, key)
        outs.append(out)
        where.append(np.full(len(out), number))
    idcol = "user" if kind == "users" else "item"
    out = pd.concat(outs, ignore_index=True)
    dup = out[idcol].duplicated(keep="first").to_numpy()
    if dup.any():
        i = int(np.flatnonzero(dup)[0])
        raise DataError(f"{files.display(int(np.concatenate(where)[i]))}: column '{spec.id}': duplicate id "
                        f"{out[idcol].iloc[i]!r} (also in an earlier file of {files.where})")
    return out
