"""Feature definitions that travel with a model: vocabularies, numeric buckets and hashed crosses.

The same :class:`FeatureSpec` encodes rows in the Ray Data pipeline (training data) and in the
Serve ranker (one user, many candidates, one context), so the two can never disagree.

Codes: 0 always means unknown or missing; known values are 1..cardinality-1.
Fields (single-valued, one code per row, in this order):
``user``, ``item`` (index + 1), ``ctx.*``, ``user.*`` categoricals and numeric buckets,
``item.*`` categoricals and numeric buckets, then the crosses ``x:a*b``.
Multi-valued item/user columns become padded code lists (``multi``).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from adrec.data.ingest import MV_SEP

_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xBF58476D1CE4E5B9)
_M3 = np.uint64(0x94D049BB133111EB)


def as_text(values: pd.Series) -> pd.Series:
    """Values of a categorical or multi-valued field as text, a missing one (NaN, None: a side row the
    table lacks, a cell a client left out) as "" — the empty value every vocabulary maps to code 0.

    Plain ``astype(str)`` is not enough: pandas 3 keeps NaN as NaN in its ``str`` dtype, and an object
    column turns None into the text "None"."""
    return values.astype(object).where(values.notna(), "").astype(str)


def hash_pair(a: np.ndarray, b: np.ndarray, size: int, salt: int) -> np.ndarray:
    """Deterministic hash of two code arrays into 1..size-1 (0 when either side is unknown)."""
    with np.errstate(over="ignore"):
        x = a.astype(np.uint64) * _M1 + b.astype(np.uint64) * _M2 + np.uint64(salt) * _M3
        x ^= x >> np.uint64(31)
        x *= _M2
        x ^= x >> np.uint64(29)
    out = (x % np.uint64(size - 1)).astype(np.int64) + 1
    return np.where((a == 0) | (b == 0), 0, out)


@dataclass
class FeatureSpec:
    vocabs: dict[str, dict[str, int]] = field(default_factory=dict)  # categorical field -> value -> code
    buckets: dict[str, list[float]] = field(default_factory=dict)  # numeric field -> inner boundaries
    multi_vocabs: dict[str, dict[str, int]] = field(default_factory=dict)
    multi_max_len: dict[str, int] = field(default_factory=dict)
    crosses: list[dict] = field(default_factory=list)  # {"name", "a", "b", "hash_size"}
    n_users: int = 0
    n_items: int = 0
    n_catalog: int = 0  # items 0..n_catalog-1 appear in interactions; the rest are catalog-only (cold)
    context: list[str] = field(default_factory=list)
    # How many recent positives the history features keep. No default here: the one default is
    # FeatureConfig.history_len, and whoever builds a spec passes it.
    history_len: int = field(kw_only=True)

    # ---- layout -------------------------------------------------------------------------------
    @property
    def fields(self) -> list[str]:
        names = ["user", "item", *self.context]
        for kind in ("user", "item"):
            names += [f for f in self.vocabs if f.startswith(kind + ".")]
            names += [f for f in self.buckets if f.startswith(kind + ".")]
        names += [c["name"] for c in self.crosses]
        return names

    def cardinality(self, name: str) -> int:
        if name == "user":
            return self.n_users + 1
        if name == "item":
            return self.n_items + 1
        if name in self.vocabs:
            return len(self.vocabs[name]) + 1
        if name in self.buckets:
            return len(self.buckets[name]) + 2
        for c in self.crosses:
            if c["name"] == name:
                return c["hash_size"]
        if name in self.multi_vocabs:
            return len(self.multi_vocabs[name]) + 1
        raise KeyError(name)

    @property
    def multi(self) -> list[str]:
        return list(self.multi_vocabs)

    # ---- encoding -----------------------------------------------------------------------------
    def encode_categorical(self, name: str, values: pd.Series) -> np.ndarray:
        vocab = self.vocabs[name]
        return as_text(values).map(vocab).fillna(0).to_numpy(dtype=np.int64)

    def encode_numeric(self, name: str, values: pd.Series) -> np.ndarray:
        v = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
        codes = np.searchsorted(np.asarray(self.buckets[name]), v, side="right") + 1
        return np.where(np.isnan(v), 0, codes).astype(np.int64)

    def encode_multi(self, name: str, values: pd.Series) -> np.ndarray:
        vocab = self.multi_vocabs[name]
        width = self.multi_max_len[name]
        out = np.zeros((len(values), width), dtype=np.int64)
        for i, s in enumerate(as_text(values).to_numpy()):
            codes = [vocab.get(x, 0) for x in s.split(MV_SEP) if x][:width]
            out[i, : len(codes)] = codes
        return out

    def encode_entity(self, kind: str, table: pd.DataFrame) -> pd.DataFrame:
        """Codes of one entity table (``kind`` = "user" or "item"), one row per entity."""
        out = pd.DataFrame(index=table.index)
        for f in self.vocabs:
            if f.startswith(kind + "."):
                out[f] = self.encode_categorical(f, table[f])
        for f in self.buckets:
            if f.startswith(kind + "."):
                out[f] = self.encode_numeric(f, table[f])
        for f in self.multi_vocabs:
            if f.startswith(kind + "."):
                out[f] = list(self.encode_multi(f, table[f]))
        return out

    def encode_rows(self, rows: pd.DataFrame, user_codes: pd.DataFrame, item_codes: pd.DataFrame) -> pd.DataFrame:
        """Field codes for rows holding ``user_idx``, ``item_idx`` (-1 = unknown) and raw ``ctx.*`` values.

        ``user_codes`` / ``item_codes`` are :meth:`encode_entity` outputs indexed by user / item index.
        """
        u = rows["user_idx"].to_numpy(dtype=np.int64)
        it = rows["item_idx"].to_numpy(dtype=np.int64)
        out = {"user": np.where(u >= 0, u + 1, 0), "item": np.where(it >= 0, it + 1, 0)}
        for c in self.context:
            out[c] = self.encode_categorical(c, rows[c])
        for kind, idx, codes in (("user", u, user_codes), ("item", it, item_codes)):
            safe = np.clip(idx, 0, None)
            for f in codes.columns:
                if f in self.multi_vocabs:
                    continue
                col = codes[f].to_numpy()[safe] if len(codes) else np.zeros(len(idx), dtype=np.int64)
                out[f] = np.where(idx >= 0, col, 0)
        for salt, c in enumerate(self.crosses):
            out[c["name"]] = hash_pair(out[c["a"]], out[c["b"]], c["hash_size"], salt + 1)
        frame = pd.DataFrame({f"f:{k}": out[k] for k in self.fields}, index=rows.index)
        return frame

    # ---- persistence --------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, path: str | Path) -> "FeatureSpec":
        return cls(**json.loads(Path(path).read_text()))


def value_counts(values: pd.Series, sep: str | None = None) -> pd.Series:
    """How often each non-empty value occurs (each listed value of a multi-valued field, with ``sep``).
    Counts of several blocks add up (``pd.concat(...).groupby(level=0).sum()``) to the whole table's."""
    s = as_text(values)
    if sep is not None:
        s = s.str.split(sep, regex=False).explode()
    s = s[s != ""]
    return s.value_counts()


def vocab_from_counts(counts: pd.Series, min_count: int = 1) -> dict[str, int]:
    """The vocabulary of the values counted at least ``min_count`` times, codes 1.. in sorted order."""
    kept = sorted(counts[counts >= min_count].index.tolist())
    return {v: i + 1 for i, v in enumerate(kept)}


def build_vocab(values: pd.Series, min_count: int = 1, sep: str | None = None) -> dict[str, int]:
    return vocab_from_counts(value_counts(values, sep), min_count)


def multi_width(values: pd.Series) -> int:
    """How many codes a multi-valued field's padded list holds: its longest value list (at least 1)."""
    counts = as_text(values).str.count(re.escape(MV_SEP))
    return int(max(1, (counts.max() if len(counts) else 0) + 1))


def build_buckets(values: pd.Series, n: int) -> list[float]:
    v = pd.to_numeric(values, errors="coerce").dropna().to_numpy()
    if len(v) == 0:
        return []
    qs = np.unique(np.quantile(v, np.linspace(0, 1, n + 1)[1:-1]))
    return [float(q) for q in qs]
