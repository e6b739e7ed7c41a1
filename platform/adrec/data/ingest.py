"""Read raw files described by a :class:`DatasetSchema` into canonical frames.

Canonical frames (what the feature stage consumes):
- interactions: ``user`` (pseudonym), ``item`` (str), ``ts`` (int64 unix seconds), ``label`` (int8),
  ``conversion`` (int8, only when the schema names one; never 1 where ``label`` is 0),
  ``ctx.<name>`` (str) for each context column;
- items: ``item`` (str), ``text`` (str), ``item.<col>`` for categorical (str), multi-valued (str with
  ``|`` between values) and numeric (float64) columns;
- users: ``user`` (pseudonym), ``text``, ``user.<col>`` likewise.

Every bad value is reported with its file, column and row (1-based line number in the file),
or skipped and counted when ``max_bad_rows`` allows it. Nothing is dropped silently.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd

from adrec.errors import DataError
from adrec.data.ids import normalize_ids
from adrec.data.privacy import pseudonymize_series
from adrec.data.schema import DatasetSchema, EntitySchema, InteractionsSchema, _Table, parse_label_rule

log = logging.getLogger(__name__)

MV_SEP = "|"
#: The items frame's (and every model version's item table's) bid column (schema ``items.bid``).
BID = "bid"


@dataclass
class RawData:
    interactions: pd.DataFrame
    items: pd.DataFrame | None
    users: pd.DataFrame | None
    counts: dict[str, int] = field(default_factory=dict)
    # Which columns are of which kind, under their canonical names (``item.category`` ...).
    columns: dict[str, list[str]] = field(default_factory=dict)


def file_name(file: Path | str) -> str:
    """The last part of a local path or a URI: what the per-file counts and warnings call a file."""
    return PurePosixPath(str(file)).name


class _BadRows:
    """Collects bad rows across files (and blocks) and enforces ``max_bad_rows``."""

    def __init__(self, max_bad: int):
        self.max_bad = max_bad
        self.count: dict[str, int] = {}
        self.total = 0

    def add(self, file: Path | str, column: str, lines: np.ndarray, values: pd.Series, why: str) -> None:
        n = len(lines)
        if n == 0:
            return
        self.total += n
        name = file_name(file)
        self.count[name] = self.count.get(name, 0) + n
        if self.total > self.max_bad:
            line, val = int(lines[0]), values.iloc[0]
            raise DataError(
                f"{file}: column '{column}', row {line}: {why} (value {val!r}); "
                f"{n} such row(s) in this column. Fix the data, or allow skipping with "
                f"data.max_bad_rows (now {self.max_bad})."
            )
        log.warning("%s: skipping %d row(s) with bad '%s' (%s), first at row %d", name, n, column, why, int(lines[0]))


class _EmptyFields:
    """Counts the empty cells of each feature column (kept: they encode as missing, code 0) and warns
    once per column, so a half-filled catalogue is visible in the log and the manifest."""

    def __init__(self):
        self.count: dict[str, int] = {}

    def add(self, path: Path | str, table: str, column: str, empty: np.ndarray) -> None:
        n = int(np.count_nonzero(empty))
        if n == 0:
            return
        key = f"empty_fields.{table}.{column}"
        if key not in self.count:
            log.warning("%s: column '%s' is empty in %d row(s); kept, with an empty '%s' feature there",
                        file_name(path), column, n, column)
        self.count[key] = self.count.get(key, 0) + n


class Recorder:
    """Stands in for :class:`_BadRows` and :class:`_EmptyFields` inside one block of a distributed read:
    it keeps what the block found, in order, and :meth:`replay` hands it to the real ones (in the
    driver or in the actor that counts across blocks), so both paths count and word it the same way."""

    def __init__(self):
        self.calls: list[tuple] = []

    def add(self, *args) -> None:
        if len(args) == 5 and isinstance(args[4], str):  # _BadRows.add(file, column, lines, values, why)
            file, column, lines, values, why = args
            if len(lines):
                self.calls.append(("bad", file, column, np.asarray(lines), values.iloc[:1], why))
        else:  # _EmptyFields.add(path, table, column, empty)
            if np.count_nonzero(args[3]):
                self.calls.append(("empty", *args[:3], np.asarray(args[3], dtype=bool)))

    def replay(self, bad: "_BadRows", empties: "_EmptyFields") -> None:
        for kind, *args in self.calls:
            (bad if kind == "bad" else empties).add(*args)


def _read_table(table: _Table, root: Path, what: str) -> tuple[pd.DataFrame, Path, np.ndarray]:
    path = (root / table.path).resolve()
    if not path.is_file():
        raise DataError(f"{what}: file {path} does not exist (schema path '{table.path}', relative to {root})")
    try:
        df = pd.read_csv(
            path,
            sep=table.sep,
            header=0 if table.header else None,
            names=None if table.header else table.names,
            dtype=str,
            keep_default_na=False,
            engine="c",
            encoding_errors="strict",
        )
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err}); re-encode the file as UTF-8") from None
    except pd.errors.ParserError as err:
        raise DataError(f"{path}: cannot be parsed with sep={table.sep!r}: {err}") from None
    # A line with fewer fields than the header (writers that drop trailing empty cells) reads as NaN
    # there even with keep_default_na=False; those cells are empty, like any other empty cell.
    df = df.fillna("")
    if table.header and table.names:
        df.columns = table.names
    elif table.header:
        df.columns = _header(df.columns, path, table.strict_header)
    # 1-based line numbers in the file, so a user can open it at the right place.
    lines = np.arange(len(df)) + (2 if table.header else 1)
    return df, path, lines


def _header(cells: pd.Index, path: Path, strict: bool) -> list[str]:
    """Header cells stripped of surrounding whitespace (and a UTF-8 byte-order mark), which spreadsheet
    exports leave behind; each stripped cell is warned about, or refused with ``strict``."""
    out = []
    for cell in map(str, cells):
        clean = cell.lstrip("\ufeff").strip()
        if clean != cell.lstrip("\ufeff"):
            if strict:
                raise DataError(f"{path}: header cell {cell!r} has surrounding whitespace; name it {clean!r} in "
                                f"the file, or drop strict_header from the schema to accept it")
            log.warning("%s: header cell %r read as %r (surrounding whitespace stripped)", path.name, cell, clean)
        out.append(clean)
    if len(set(out)) != len(out):
        dup = sorted({c for c in out if out.count(c) > 1})
        raise DataError(f"{path}: the header names column(s) {dup} more than once")
    return out


def _require(df: pd.DataFrame, path: Path, cols: list[str]) -> None:
    missing = list(dict.fromkeys(c for c in cols if c not in df.columns))
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; the file has {list(df.columns)}")


def _parse_ts(s: pd.Series) -> pd.Series:
    num = pd.to_numeric(s, errors="coerce")
    if num.notna().all():
        return num
    iso = pd.to_datetime(s.where(num.isna()), errors="coerce", utc=True, format="ISO8601")
    secs = (iso - pd.Timestamp(0, tz="UTC")).dt.total_seconds()
    return num.fillna(secs)


def parse_interactions(df: pd.DataFrame, lines: np.ndarray, path: Path | str, spec: InteractionsSchema,
                       bad, empties, key: bytes) -> tuple[pd.DataFrame, np.ndarray]:
    """One block of the interactions table (text cells, ``lines`` its row numbers in ``path``) ->
    canonical rows, and which input rows they are (a mask); bad rows go to ``bad`` and empty context cells to ``empties``. The one parser of
    interactions: the in-process read calls it on a whole file, the Ray Data read on each block."""
    label_col, _, _ = parse_label_rule(spec.label)
    conv_col = parse_label_rule(spec.conversion, "interactions.conversion")[0] if spec.conversion else None
    _require(df, path, [spec.user, spec.item, spec.timestamp, label_col, *([conv_col] if conv_col else []),
                        *spec.context])
    keep = np.ones(len(df), dtype=bool)

    ids = {col: normalize_ids(df[col]) for col in (spec.user, spec.item)}
    for col in (spec.user, spec.item):
        empty = ids[col] == ""
        bad.add(path, col, lines[empty.to_numpy()], df[col][empty], "empty id")
        keep &= ~empty.to_numpy()

    ts = _parse_ts(df[spec.timestamp])
    bad_ts = ts.isna().to_numpy() & keep
    bad.add(path, spec.timestamp, lines[bad_ts], df[spec.timestamp][bad_ts], "not unix seconds or ISO-8601")
    keep &= ~bad_ts

    label, keep = _binary_label(df, lines, path, spec.label, "label", keep, bad)
    conversion = None
    if spec.conversion:
        conversion, keep = _binary_label(df, lines, path, spec.conversion, "conversion", keep, bad)
        # A conversion is an action behind a click (ESMM's impression -> click -> conversion): one without
        # a click says the two columns disagree about the row, so neither can be trusted.
        orphan = (conversion > 0) & (label == 0) & keep
        bad.add(path, conv_col, lines[orphan], df[conv_col][orphan],
                f"a conversion without a click (label '{spec.label}' is 0 on this row)")
        keep &= ~orphan

    out = pd.DataFrame({
        "user": pseudonymize_series(ids[spec.user][keep], key).to_numpy(),
        "item": ids[spec.item][keep].to_numpy(),
        "ts": ts[keep].astype("int64").to_numpy(),
        "label": np.asarray(label)[keep].astype("int8"),
    })
    if conversion is not None:
        out["conversion"] = conversion[keep].astype("int8")
    for c in spec.context:
        out[f"ctx.{c}"] = df[c][keep].to_numpy()
        empties.add(path, "interactions", c, (out[f"ctx.{c}"] == "").to_numpy())
    return out, keep


def _binary_label(df: pd.DataFrame, lines: np.ndarray, path: Path | str, rule: str, what: str, keep: np.ndarray,
                  bad) -> tuple[np.ndarray, np.ndarray]:
    """A 0/1 label of every row (``rule``: a 0/1 column or a rule like "rating >= 4"), and ``keep`` less the
    rows whose cell is bad (not 0/1, or not a number for a rule), which go to ``bad``."""
    col, op, thr = parse_label_rule(rule, f"interactions.{what}")
    raw = pd.to_numeric(df[col], errors="coerce")
    if op is None:
        bad_rows = (~raw.isin([0, 1])).to_numpy() & keep
        why = f"{what} must be 0 or 1"
    else:
        bad_rows = raw.isna().to_numpy() & keep
        why = f"not a number ({what} rule '{rule}')"
    bad.add(path, col, lines[bad_rows], df[col][bad_rows], why)
    keep = keep & ~bad_rows
    values = raw.to_numpy()
    if op is not None:
        values = {">=": values >= thr, "<=": values <= thr, ">": values > thr, "<": values < thr,
                  "==": values == thr, "!=": values != thr}[op]
    return np.nan_to_num(np.asarray(values, dtype=np.float64)).astype(np.int8), keep


def _read_interactions(schema: DatasetSchema, root: Path, bad: _BadRows, empties: _EmptyFields,
                       key: bytes) -> pd.DataFrame:
    df, path, lines = _read_table(schema.interactions, root, "interactions")
    return parse_interactions(df, lines, path, schema.interactions, bad, empties, key)[0]


def _read_entity(spec: EntitySchema, root: Path, bad: _BadRows, empties: _EmptyFields, kind: str,
                 key: bytes | None) -> pd.DataFrame:
    df, path, lines = _read_table(spec, root, kind)
    return parse_entity(df, lines, path, spec, bad, empties, kind, key)


def parse_entity(df: pd.DataFrame, lines: np.ndarray, path: Path | str, spec: EntitySchema, bad, empties,
                 kind: str, key: bytes | None) -> pd.DataFrame:
    """A side table's text cells (one file; ``lines`` its row numbers) -> canonical rows, one per id."""
    _require(df, path, [spec.id, *spec.text, *spec.categorical, *spec.multi_valued, *spec.numeric,
                        *([spec.bid] if spec.bid else [])])
    keep = np.ones(len(df), dtype=bool)
    all_ids = normalize_ids(df[spec.id])
    empty = (all_ids == "").to_numpy()
    bad.add(path, spec.id, lines[empty], df[spec.id][empty], "empty id")
    keep &= ~empty
    nums = {}
    for c in spec.numeric:
        raw = df[c].str.strip()
        v = pd.to_numeric(raw.replace("", np.nan), errors="coerce")
        # An empty numeric cell is a missing value (kept as NaN); text that is not a number is bad.
        bad_num = (v.isna() & (raw != "")).to_numpy() & keep
        bad.add(path, c, lines[bad_num], df[c][bad_num], "not a number")
        keep &= ~bad_num
        nums[c] = v
    bid = None
    if spec.bid:
        bid, wrong = parse_bids(df, lines, path, spec, bad, keep)
        keep &= ~wrong
    ids = all_ids[keep]
    idcol = "user" if kind == "users" else "item"
    out = pd.DataFrame({idcol: pseudonymize_series(ids, key).to_numpy() if key is not None else ids.to_numpy()})
    dup = out[idcol].duplicated(keep="first").to_numpy()
    if dup.any():
        first = int(lines[keep][dup][0])
        raise DataError(f"{path}: column '{spec.id}', row {first}: duplicate id {ids.to_numpy()[dup][0]!r}")
    if spec.text:
        parts = [df[c][keep].str.strip() for c in spec.text]
        for c, part in zip(spec.text, parts):
            empties.add(path, kind, c, (part == "").to_numpy())
        text = parts[0]
        for p in parts[1:]:
            text = text.str.cat(p, sep=" | ")
        out["text"] = text.to_numpy()
    else:
        out["text"] = ""
    for c in spec.categorical:
        out[f"{kind[:-1]}.{c}"] = df[c][keep].str.strip().to_numpy()
    for c, sep in spec.multi_valued.items():
        vals = df[c][keep].str.split(sep, regex=False).map(lambda xs: MV_SEP.join(x.strip() for x in xs if x.strip()))
        out[f"{kind[:-1]}.{c}"] = vals.to_numpy()
    for c in spec.numeric:
        out[f"{kind[:-1]}.{c}"] = nums[c][keep].to_numpy(dtype="float64")
    if bid is not None:
        out[BID] = bid[keep].to_numpy(dtype="float64")
    for c in [*spec.categorical, *spec.multi_valued]:
        empties.add(path, kind, c, (out[f"{kind[:-1]}.{c}"] == "").to_numpy())
    for c in spec.numeric:
        empties.add(path, kind, c, out[f"{kind[:-1]}.{c}"].isna().to_numpy())
    return out


def parse_bids(df: pd.DataFrame, lines: np.ndarray, path: Path | str, spec: EntitySchema, bad,
               keep: np.ndarray) -> tuple[pd.Series, np.ndarray]:
    """The items' bids (``spec.bid``) and the rows whose bid is bad (text, negative: counted as bad rows).
    An empty cell of a kept row takes ``bid_default`` or is an error naming the column (a bid of 0 is a
    statement, a missing one is not)."""
    raw = df[spec.bid].str.strip()
    v = pd.to_numeric(raw.replace("", np.nan), errors="coerce")
    wrong = ((v.isna() & (raw != "")) | (v < 0) | ~np.isfinite(v.fillna(0))).to_numpy() & keep
    bad.add(path, spec.bid, lines[wrong], df[spec.bid][wrong], "not a bid (a number >= 0)")
    empty = (raw == "").to_numpy() & keep & ~wrong
    if empty.any():
        if spec.bid_default is None:
            raise DataError(f"{path}: column '{spec.bid}' (items.bid), row {int(lines[empty][0])}: no bid "
                            f"({int(empty.sum())} item(s) without one): give every item a bid, or set "
                            "items.bid_default in the schema YAML")
        v = v.fillna(spec.bid_default)
    return v, wrong


def read_dataset(schema: DatasetSchema, root: Path, key: bytes, max_bad_rows: int = 0) -> RawData:
    bad, empties = _BadRows(max_bad_rows), _EmptyFields()
    inter = _read_interactions(schema, root, bad, empties, key)
    items = _read_entity(schema.items, root, bad, empties, "items", None) if schema.items else None
    users = _read_entity(schema.users, root, bad, empties, "users", key) if schema.users else None
    counts = {
        "interactions": len(inter),
        "users": int(inter["user"].nunique()),
        "items": int(inter["item"].nunique()),
        "positives": int(inter["label"].sum()),
        "bad_rows_skipped": bad.total,
    }
    if "conversion" in inter:
        counts["conversions"] = int(inter["conversion"].sum())
    counts.update({f"bad_rows_skipped.{k}": v for k, v in bad.count.items()})
    # Repeated rows are kept (an ad shown twice at the same second is two impressions to some logs and a
    # double write to others: only the data owner knows), but counted and warned about.
    counts["duplicate_interactions"] = int(inter.duplicated().sum())
    counts.update(empties.count)
    if items is not None:
        counts["interactions_with_unknown_item"] = int((~inter["item"].isin(items["item"])).sum())
    if users is not None:
        counts["interactions_with_unknown_user"] = int((~inter["user"].isin(users["user"])).sum())
    warn_counts(counts)
    return RawData(inter, items, users, counts, table_columns(schema))


def warn_counts(counts: dict) -> None:
    """The warnings a read owes its user about rows it kept (either pipeline's counts)."""
    if counts.get("duplicate_interactions"):
        log.warning("%d interaction row(s) repeat an earlier row exactly (same user, item, time, label and "
                    "context); kept", counts["duplicate_interactions"])
    if counts.get("interactions_with_unknown_item"):
        log.warning("%d interaction(s) name items missing from the items table; kept with empty item features",
                    counts["interactions_with_unknown_item"])
    if counts.get("interactions_with_unknown_user"):
        log.warning("%d interaction(s) name users missing from the users table; kept with empty user features",
                    counts["interactions_with_unknown_user"])


def table_columns(schema: DatasetSchema) -> dict[str, list[str]]:
    """Which canonical columns are of which kind (``RawData.columns``)."""
    columns = {"context": [f"ctx.{c}" for c in schema.interactions.context]}
    for kind, spec in (("item", schema.items), ("user", schema.users)):
        if spec is None:
            continue
        columns[f"{kind}.categorical"] = [f"{kind}.{c}" for c in spec.categorical]
        columns[f"{kind}.multi_valued"] = [f"{kind}.{c}" for c in spec.multi_valued]
        columns[f"{kind}.numeric"] = [f"{kind}.{c}" for c in spec.numeric]
    return columns
