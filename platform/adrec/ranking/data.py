"""Rows -> model inputs, and the item/user tables a fusion ranker carries.

Item and user codes inside the model are ``index + 1`` with 0 meaning unknown or padding, the same
convention as the spec's ``f:user`` / ``f:item`` fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from adrec.features.spec import FeatureSpec


def architecture(spec: FeatureSpec) -> dict:
    """Field layout of a feature spec, as the fusion model needs it (JSON-serialisable)."""
    fields = list(spec.fields)
    multi = []
    for m in spec.multi:
        kind = m.split(".", 1)[0]
        if kind not in ("item", "user"):
            continue
        multi.append({"name": m, "kind": kind, "card": int(spec.cardinality(m)),
                      "width": int(spec.multi_max_len.get(m, 1))})
    return {
        "fields": fields,
        "cards": [int(spec.cardinality(f)) for f in fields],
        "item_fields": [f for f in fields if f.startswith("item.")],
        "multi": multi,
        "n_items": int(spec.n_items),
        "n_users": int(spec.n_users),
        "hist_len": int(max(1, spec.history_len)),
    }


def entity_codes(idx: np.ndarray, n: int) -> np.ndarray:
    """Indices -> codes (``idx + 1``; 0 for -1, out of range or missing)."""
    idx = np.asarray(idx, dtype=np.int64)
    return np.where((idx >= 0) & (idx < n), idx + 1, 0)


def hist_codes(hist, length: int, n_items: int) -> np.ndarray:
    """Right-aligned (most recent last) item codes of each row's history, 0-padded, (N, length)."""
    n = len(hist)
    if n == 0:
        return np.zeros((0, length), dtype=np.int64)
    arrs = [np.asarray(h if h is not None else (), dtype=np.int64).reshape(-1) for h in hist]
    lens = np.fromiter((a.size for a in arrs), dtype=np.int64, count=n)
    flat = np.concatenate(arrs) if lens.sum() else np.zeros(0, dtype=np.int64)
    return hist_codes_flat(np.r_[0, np.cumsum(lens)], flat, length, n_items)


def hist_codes_flat(offsets: np.ndarray, values: np.ndarray, length: int, n_items: int) -> np.ndarray:
    """:func:`hist_codes` of histories given as a list column's (offsets, values): row ``r``'s history is
    ``values[offsets[r]:offsets[r + 1]]`` (an Arrow list column, read without one array per row)."""
    offsets = np.asarray(offsets, dtype=np.int64)
    n = len(offsets) - 1
    out = np.zeros((max(n, 0), length), dtype=np.int64)
    if n <= 0 or offsets[-1] == offsets[0]:
        return out
    lens = np.diff(offsets)
    flat = np.asarray(values[offsets[0]:offsets[-1]], dtype=np.int64)
    row = np.repeat(np.arange(n), lens)
    pos = np.arange(flat.size) - np.repeat(offsets[:-1] - offsets[0], lens)  # position within the row
    col = length - lens[row] + pos  # right-aligned
    keep = col >= 0
    out[row[keep], col[keep]] = entity_codes(flat[keep], n_items)
    return out


def rows_to_arrays(rows: pd.DataFrame, arch: dict, hist: tuple[np.ndarray, np.ndarray] | None = None
                   ) -> dict[str, np.ndarray]:
    """The numpy inputs of :class:`FusionModel` for ranker input rows.

    ``hist``: the rows' histories as (offsets, values) (see :func:`hist_codes_flat`) instead of a
    ``hist`` column."""
    missing = [c for c in ("user_idx", "item_idx") if c not in rows.columns]
    missing += [f"f:{f}" for f in arch["fields"] if f"f:{f}" not in rows.columns]
    if missing:
        raise ValueError(f"ranker input rows lack column(s) {missing}")
    # One selection of the code columns, not one pandas lookup per column (~25 a call: a served request's cost);
    # by position when they follow the keys in field order (RowEncoder's frames): a selection by label costs
    # a string-index lookup of every name, ~0.5 ms of a served request.
    names = [f"f:{f}" for f in arch["fields"]]
    if not len(rows):
        fields = np.zeros((0, len(names)), dtype=np.int64)
    elif rows.columns[2:2 + len(names)].tolist() == names:
        fields = rows.iloc[:, 2:2 + len(names)].to_numpy(dtype=np.int64)
    else:
        fields = rows[names].to_numpy(dtype=np.int64)
    cards = np.asarray(arch["cards"], dtype=np.int64)
    fields = np.where((fields >= 0) & (fields < cards), fields, 0)  # out-of-vocabulary codes -> unknown
    if hist is not None:
        hist_arr = hist_codes_flat(hist[0], hist[1], arch["hist_len"], arch["n_items"])
    else:
        hist_arr = hist_codes(rows["hist"].to_numpy() if "hist" in rows.columns else [None] * len(rows),
                              arch["hist_len"], arch["n_items"])
    return {
        "fields": fields,
        "item": entity_codes(rows["item_idx"].to_numpy(), arch["n_items"]),
        "user": entity_codes(rows["user_idx"].to_numpy(), arch["n_users"]),
        "hist": hist_arr,
    }


def take(arrays: dict[str, np.ndarray], idx) -> dict[str, np.ndarray]:
    return {k: v[idx] for k, v in arrays.items()}


@dataclass
class EntityTables:
    """What the model needs to know about every item (and user) beyond the row itself.

    ``text``: item texts (index order); ``item_attr``: (n_items+1, A) codes of the single-valued
    item fields; ``multi``: name -> (n_entities+1, width) codes of each multi-valued field.
    Row 0 of every table is the unknown entity.
    """

    text: list[str]
    item_attr: np.ndarray
    multi: dict[str, np.ndarray] = field(default_factory=dict)
    items: pd.DataFrame | None = None  # the item frame these came from (saved with the ranker)
    users: pd.DataFrame | None = None  # user multi-valued code columns, when there are any

    @classmethod
    def from_frames(cls, items: pd.DataFrame, users: pd.DataFrame | None, arch: dict) -> "EntityTables":
        items = items.sort_values("item_idx").reset_index(drop=True)
        n_items = arch["n_items"]
        if len(items) != n_items or (len(items) and items["item_idx"].iloc[-1] != n_items - 1):
            raise ValueError(f"item table has {len(items)} rows for {n_items} items (indices 0..{n_items - 1} expected)")
        text = items["text"].fillna("").astype(str).tolist() if "text" in items else [""] * n_items
        attr = np.zeros((n_items + 1, len(arch["item_fields"])), dtype=np.int64)
        for j, f in enumerate(arch["item_fields"]):
            col = f"c:{f}"
            if col in items:
                attr[1:, j] = items[col].to_numpy(dtype=np.int64)
        multi: dict[str, np.ndarray] = {}
        keep_users = None
        for m in arch["multi"]:
            frame = items if m["kind"] == "item" else users
            n = n_items if m["kind"] == "item" else arch["n_users"]
            table = np.zeros((n + 1, m["width"]), dtype=np.int64)
            col = f"c:{m['name']}"
            if frame is not None and col in frame:
                frame = frame.sort_values(f"{m['kind']}_idx")
                for i, codes in enumerate(frame[col].to_numpy()[:n]):
                    c = np.asarray(codes if codes is not None else (), dtype=np.int64)[: m["width"]]
                    table[i + 1, : c.size] = c
                if m["kind"] == "user":
                    keep_users = frame if keep_users is None else keep_users
            multi[m["name"]] = table
        item_cols = ["item_idx"] + [c for c in ("item", "text") if c in items] + \
            [c for c in items.columns if c.startswith("c:item.")]
        user_frame = None
        if keep_users is not None:
            user_frame = keep_users[["user_idx"] + [c for c in keep_users.columns if c.startswith("c:user.")
                                                    and any(m["name"] == c[2:] for m in arch["multi"])]]
        return cls(text=text, item_attr=attr, multi=multi, items=items[item_cols].copy(), users=user_frame)
