"""The building blocks of prepare that the in-process and the streaming pipeline both call.

Each works on one batch of rows (or on the catalog), so the in-process pipeline calls it once on the
whole table and the streaming one per block or per shuffle partition: one owner per feature concept.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from adrec.config import AdrecConfig, CrossSpec
from adrec.data.ingest import BID
from adrec.data.sources import DEFAULT_CROSSES
from adrec.errors import DataError
from adrec.features.spec import FeatureSpec, build_buckets, build_vocab, multi_width, value_counts, vocab_from_counts
from adrec.features.split import TEST, TRAIN


def _sorted_ids(ids: pd.Series) -> list[str]:
    uniq = pd.unique(ids.astype(str))
    num = pd.to_numeric(pd.Series(uniq), errors="coerce")
    if num.notna().all():  # numeric ids sort as numbers, so item 10 follows item 9
        return [uniq[i] for i in np.argsort(num.to_numpy(), kind="stable")]
    return sorted(uniq)


def _index(primary: pd.Series, extra: pd.Series | None) -> list[str]:
    ids = _sorted_ids(primary)
    if extra is not None:
        seen = set(ids)
        ids += [x for x in _sorted_ids(extra) if x not in seen]
    return ids


def history_flat(user_idx: np.ndarray, item_idx: np.ndarray, ts: np.ndarray, label: np.ndarray,
                 split: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """For each row, the user's last ``length`` earlier positives that were known at that time, as
    (offsets, values): row ``r``'s history is ``values[offsets[r]:offsets[r + 1]]`` (oldest first).

    A train row sees the user's earlier train positives; a valid row sees all train positives; a test
    row sees all train and valid positives. Test labels never feed any history. "Earlier" is the order
    (user, ts, item), ties kept in row order.

    Vectorized: in that order a row's history is a contiguous slice of its user's train positives (test
    rows: of its user's train and valid positives), ending just before the row, so each row needs only
    where the slice starts and how long it is.
    """
    n = len(user_idx)
    if length == 0 or n == 0:
        return np.zeros(n + 1, dtype=np.int64), np.empty(0, dtype=np.int64)
    order = np.lexsort((item_idx, ts, user_idx))
    u, it = np.asarray(user_idx)[order], np.asarray(item_idx, dtype=np.int64)[order]
    s = np.asarray(split)[order]
    pos = np.asarray(label)[order] != 0
    test = s == TEST
    new_user = np.r_[True, u[1:] != u[:-1]]
    first = np.maximum.accumulate(np.where(new_user, np.arange(n), 0))  # each row's user's first row
    values, start, size, base = [], np.zeros(n, np.int64), np.zeros(n, np.int64), 0
    for feeds, rows in ((pos & (s == TRAIN), ~test), (pos & ~test, test)):
        before = np.cumsum(feeds) - feeds  # positives of this kind before each row (all users)
        have = before - before[first]  # ... of the row's own user
        k = np.minimum(have, length)
        start[rows] = (base + before - k)[rows]
        size[rows] = k[rows]
        values.append(it[feeds])
        base += int(feeds.sum())
    flat = np.concatenate(values)
    sizes, starts = np.empty(n, np.int64), np.empty(n, np.int64)
    sizes[order], starts[order] = size, start
    offsets = np.r_[0, np.cumsum(sizes)]
    take = np.repeat(starts - offsets[:-1], sizes) + np.arange(offsets[-1])
    return offsets, flat[take]


def history_lists(user_idx: np.ndarray, item_idx: np.ndarray, ts: np.ndarray, label: np.ndarray,
                  split: np.ndarray, length: int) -> list[np.ndarray]:
    """:func:`history_flat` as one int64 array per row."""
    offsets, values = history_flat(user_idx, item_idx, ts, label, split, length)
    return np.split(values, offsets[1:-1]) if len(offsets) > 1 else []


def resolve_crosses(cfg: AdrecConfig) -> list[CrossSpec]:
    if cfg.features.crosses is not None:
        return cfg.features.crosses
    pairs = DEFAULT_CROSSES.get(cfg.data.dataset, [])
    return [CrossSpec(fields=p) for p in pairs]


def context_counts(rows: pd.DataFrame, context: list[str]) -> pd.DataFrame:
    """Value counts of the context columns over the rows that fit vocabularies (train and valid: never
    test), long format (``column``, ``value``, ``n``): a block's counts, which add up across blocks."""
    known = rows[rows["split"] != TEST]
    parts = [pd.DataFrame({"column": c, "value": vc.index.astype(str), "n": vc.to_numpy(dtype=np.int64)})
             for c in context for vc in [value_counts(known[c])]]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame({"column": [], "value": [], "n": []})


def build_spec(cfg: AdrecConfig, raw, ctx_counts: pd.DataFrame, n_users: int, n_items: int, n_catalog: int) -> FeatureSpec:
    """The feature spec: context vocabularies from ``ctx_counts`` (:func:`context_counts`, summed over
    blocks), side-table vocabularies and bucket edges from the catalog-sized side tables, the crosses."""
    spec = FeatureSpec(n_users=n_users, n_items=n_items, n_catalog=n_catalog,
                       context=list(raw.columns.get("context", [])), history_len=cfg.features.history_len)
    totals = ctx_counts.groupby(["column", "value"])["n"].sum() if len(ctx_counts) else None
    for c in spec.context:
        counts = totals.xs(c, level="column") if totals is not None and c in totals.index.get_level_values(0) \
            else pd.Series(dtype=np.int64)
        spec.vocabs[c] = vocab_from_counts(counts, cfg.features.min_count)
    for kind, table in (("item", raw.items), ("user", raw.users)):
        if table is None:
            continue
        for c in raw.columns.get(f"{kind}.categorical", []):
            spec.vocabs[c] = build_vocab(table[c], cfg.features.min_count)
        for c in raw.columns.get(f"{kind}.numeric", []):
            spec.buckets[c] = build_buckets(table[c], cfg.features.numeric_buckets)
        for c in raw.columns.get(f"{kind}.multi_valued", []):
            spec.multi_vocabs[c] = build_vocab(table[c], cfg.features.min_count, sep="|")
            spec.multi_max_len[c] = multi_width(table[c])
    known = set(spec.fields)
    for cross in resolve_crosses(cfg):
        a, b = cross.fields
        unknown = [f for f in (a, b) if f not in known or f in ("user", "item")]
        if unknown:
            raise ValueError(
                f"cross {cross.name}: unknown field(s) {unknown}; crossable fields here are "
                f"{[f for f in spec.fields if f not in ('user', 'item')]}"
            )
        spec.crosses.append({"name": cross.name, "a": a, "b": b, "hash_size": cross.hash_size})
    return spec


def _entity_frame(kind: str, ids: list[str], table: pd.DataFrame | None, idcol: str, spec: FeatureSpec) -> pd.DataFrame:
    frame = pd.DataFrame({idcol: ids})
    if table is not None:
        frame = frame.merge(table, on=idcol, how="left")
    if "text" not in frame:
        frame["text"] = ""
    frame["text"] = frame["text"].fillna("").astype(str)
    # The left join leaves NaN in every column of an id its side table lacks: such an entity has empty
    # side features, "" for text-valued columns, NaN (missing, code 0) for numeric ones.
    for c in frame.columns:
        if c.startswith(kind + ".") and not pd.api.types.is_numeric_dtype(frame[c]):
            frame[c] = frame[c].fillna("")
    codes = spec.encode_entity(kind, frame)
    frame[f"{kind}_idx"] = np.arange(len(frame))
    out = frame[[f"{kind}_idx", idcol, "text"]].copy()
    for c in codes.columns:
        out[f"c:{c}"] = codes[c].to_numpy()
    # Keep the raw side features too: explanations and text templates read them.
    for c in frame.columns:
        if c.startswith(kind + "."):
            out[c] = frame[c].to_numpy()
    if kind == "item" and BID in frame:  # the bid (schema items.bid): what value-aware serving multiplies by
        out[BID] = frame[BID].to_numpy(dtype="float64")
    return out


def fill_bids(items: pd.DataFrame, spec) -> pd.DataFrame:
    """The catalog's bids complete: an item the items table lacks takes ``items.bid_default`` of the
    schema (``spec``: its items table, or None), else it is an error naming the column."""
    if spec is None or spec.bid is None or BID not in items:
        return items
    missing = items[BID].isna().to_numpy()
    if missing.any():
        if spec.bid_default is None:
            first = items["item"].to_numpy()[missing][0]
            raise DataError(f"column '{spec.bid}' (items.bid): {int(missing.sum())} item(s) of the interactions "
                            f"have no row in the items table, so no bid (first: {first!r}): add them to "
                            "the items table, or set items.bid_default in the schema YAML")
        items[BID] = items[BID].fillna(spec.bid_default)
    return items


def entity_codes(frame: pd.DataFrame) -> pd.DataFrame:
    """The ``c:*`` columns of an entity frame, renamed to field names (input of ``encode_rows``)."""
    cols = [c for c in frame.columns if c.startswith("c:")]
    return frame[cols].rename(columns=lambda c: c[2:])




ROW_KEYS = ["user_idx", "item_idx", "ts", "label", "split"]
#: The second label (issue 17): a row carries it when the schema names a conversion label.
CONVERSION = "conversion"


def row_keys(columns) -> list[str]:
    """The key and label columns of feature rows with these columns: :data:`ROW_KEYS`, plus the conversion
    label right after ``label`` when the rows have one."""
    if CONVERSION not in columns:
        return list(ROW_KEYS)
    return [*ROW_KEYS[:4], CONVERSION, *ROW_KEYS[4:]]


def encode_block(batch: pd.DataFrame, spec: FeatureSpec, user_codes: pd.DataFrame, item_codes: pd.DataFrame,
                 carry: tuple[str, ...] = ()) -> pd.DataFrame:
    """One block of indexed, split rows -> the feature rows (keys and labels, ``f:*`` codes, then ``carry``)."""
    codes = spec.encode_rows(batch, user_codes, item_codes)
    return pd.concat([batch[row_keys(batch.columns)], codes, batch[list(carry)]], axis=1)
