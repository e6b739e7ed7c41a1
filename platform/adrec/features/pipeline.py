"""The prepare stage: raw logs -> validated, pseudonymized, encoded, split features (Ray Data).

Outputs under ``<run>/features``:
- ``interactions.parquet``: ``user_idx``, ``item_idx``, ``ts``, ``label``, ``split`` (train/valid/test),
  ``hist`` (item indices of the user's most recent earlier known positives, oldest first) and one
  ``f:<field>`` code column per field of the :class:`FeatureSpec`;
- ``items.parquet`` / ``users.parquet``: one row per index with the id (items: dataset id; users:
  pseudonym), the encoder ``text`` and the entity's code columns (``c:<field>``);
- ``spec.json``: the :class:`FeatureSpec`.
"""

from __future__ import annotations

import logging
import time
from collections import deque

import numpy as np
import pandas as pd

from adrec.config import AdrecConfig, CrossSpec
from adrec.data import load_schema, read_dataset
from adrec.data.privacy import resolve_key
from adrec.keys import key_fingerprint
from adrec.data.sources import DEFAULT_CROSSES, resolve_schema
from adrec.features.spec import FeatureSpec, build_buckets, build_vocab, multi_width
from adrec.features.split import TEST, TRAIN, new_item_holdout, temporal_split
from adrec.run import RunDir, fingerprint
from adrec.runtime import init_ray

log = logging.getLogger(__name__)


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


def history_lists(user_idx: np.ndarray, item_idx: np.ndarray, ts: np.ndarray, label: np.ndarray,
                  split: np.ndarray, length: int) -> list[np.ndarray]:
    """For each row, the user's last ``length`` earlier positives that were known at that time.

    A train row sees the user's earlier train positives; a valid row sees all train positives; a test
    row sees all train and valid positives. Test labels never feed any history.
    """
    order = np.lexsort((item_idx, ts, user_idx))
    out: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * len(order)
    empty = np.empty(0, dtype=np.int64)
    if length == 0:
        return [empty] * len(order)
    cur_user = -1
    train_hist: deque = deque(maxlen=length)
    full_hist: deque = deque(maxlen=length)
    for r in order:
        u = user_idx[r]
        if u != cur_user:
            cur_user = u
            train_hist.clear()
            full_hist.clear()
        s = split[r]
        if s != TEST:  # train rows precede valid rows, so a valid row sees every train positive
            out[r] = np.fromiter(train_hist, dtype=np.int64, count=len(train_hist))
        else:
            out[r] = np.fromiter(full_hist, dtype=np.int64, count=len(full_hist))
        if label[r] and s != TEST:
            full_hist.append(item_idx[r])
            if s == TRAIN:
                train_hist.append(item_idx[r])
    return out


def latest_history(features: pd.DataFrame, n_users: int, length: int) -> list[np.ndarray]:
    """Per user, the last ``length`` known positives (train and valid): what serving starts from."""
    known = features[(features["split"] != TEST) & (features["label"] == 1)]
    known = known.sort_values(["user_idx", "ts", "item_idx"])
    out = [np.empty(0, dtype=np.int64) for _ in range(n_users)]
    for u, grp in known.groupby("user_idx", sort=False):
        out[int(u)] = grp["item_idx"].to_numpy()[-length:] if length else np.empty(0, dtype=np.int64)
    return out


def resolve_crosses(cfg: AdrecConfig) -> list[CrossSpec]:
    if cfg.features.crosses is not None:
        return cfg.features.crosses
    pairs = DEFAULT_CROSSES.get(cfg.data.dataset, [])
    return [CrossSpec(fields=p) for p in pairs]


def build_spec(cfg: AdrecConfig, raw, train_rows: pd.DataFrame, n_users: int, n_items: int, n_catalog: int) -> FeatureSpec:
    spec = FeatureSpec(n_users=n_users, n_items=n_items, n_catalog=n_catalog,
                       context=list(raw.columns.get("context", [])), history_len=cfg.features.history_len)
    for c in spec.context:
        spec.vocabs[c] = build_vocab(train_rows[c], cfg.features.min_count)
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
    return out


def entity_codes(frame: pd.DataFrame) -> pd.DataFrame:
    """The ``c:*`` columns of an entity frame, renamed to field names (input of ``encode_rows``)."""
    cols = [c for c in frame.columns if c.startswith("c:")]
    return frame[cols].rename(columns=lambda c: c[2:])


def prepare(cfg: AdrecConfig, run: RunDir) -> dict:
    """Run the whole prepare stage; returns the counts written to the manifest."""
    import ray

    t0 = time.perf_counter()
    run.raw.mkdir(parents=True, exist_ok=True)
    source = resolve_schema(cfg.data, run.raw)
    schema, root = load_schema(source.path, source.data_root)
    log.info("schema %s; its paths resolve against %s (%s)", source.path, root, source.root_from)
    key = resolve_key(cfg.data.pseudonym_key, run.path)
    raw = read_dataset(schema, root, key, cfg.data.max_bad_rows)
    inter = raw.interactions
    log.info("read %d interactions, %d users, %d items", len(inter), raw.counts["users"], raw.counts["items"])

    item_ids = _index(inter["item"], raw.items["item"] if raw.items is not None else None)
    user_ids = _index(inter["user"], raw.users["user"] if raw.users is not None else None)
    n_catalog = int(inter["item"].nunique())
    item_pos = {v: i for i, v in enumerate(item_ids)}
    user_pos = {v: i for i, v in enumerate(user_ids)}
    inter = inter.assign(user_idx=inter["user"].map(user_pos).astype("int64"),
                         item_idx=inter["item"].map(item_pos).astype("int64"))
    inter["split"] = temporal_split(inter["user_idx"].to_numpy(), inter["ts"].to_numpy(), inter["item_idx"].to_numpy())
    held_out = new_item_holdout(inter["item_idx"].to_numpy(), cfg.features.new_items, cfg.features.new_items_seed)
    if len(held_out):
        drop = inter["item_idx"].isin(held_out).to_numpy() & (inter["split"] != TEST).to_numpy()
        log.info("strict new-item protocol: %d items (%.0f%%) held out, %d train/valid rows removed",
                 len(held_out), 100 * cfg.features.new_items, int(drop.sum()))
        inter = inter[~drop].reset_index(drop=True)

    spec = build_spec(cfg, raw, inter[inter["split"] != TEST], len(user_ids), len(item_ids), n_catalog)
    items = _entity_frame("item", item_ids, raw.items, "item", spec)
    users = _entity_frame("user", user_ids, raw.users, "user", spec)
    item_codes, user_codes = entity_codes(items), entity_codes(users)

    # Ray Data: vectorized encoding (vocab lookups, buckets, hashed crosses) in batches.
    # Ray starts only now, so bad input fails fast without paying for a cluster.
    init_ray(cfg.ray)
    base = inter[["user_idx", "item_idx", "ts", "label", "split", *spec.context]].reset_index(drop=True)

    def encode(batch: pd.DataFrame) -> pd.DataFrame:
        codes = spec.encode_rows(batch, user_codes, item_codes)
        return pd.concat([batch[["user_idx", "item_idx", "ts", "label", "split"]], codes], axis=1)

    ds = ray.data.from_pandas(base).map_batches(encode, batch_format="pandas", batch_size=cfg.features.batch_size)
    feats = ds.to_pandas()
    feats = feats.sort_values(["user_idx", "ts", "item_idx"], kind="stable").reset_index(drop=True)
    feats["hist"] = history_lists(feats["user_idx"].to_numpy(), feats["item_idx"].to_numpy(), feats["ts"].to_numpy(),
                                  feats["label"].to_numpy(), feats["split"].to_numpy(), spec.history_len)

    run.features.mkdir(parents=True, exist_ok=True)
    feats.to_parquet(run.features / "interactions.parquet", index=False)
    items.to_parquet(run.features / "items.parquet", index=False)
    users.to_parquet(run.features / "users.parquet", index=False)
    spec.save(run.features / "spec.json")

    split_counts = feats["split"].value_counts().to_dict()
    counts = {**raw.counts, **{f"rows.{k}": int(v) for k, v in split_counts.items()},
              "catalog_items": n_catalog, "indexed_items": len(item_ids), "indexed_users": len(user_ids),
              "fields": len(spec.fields), "crosses": [c["name"] for c in spec.crosses],
              "new_items_held_out": int(len(held_out))}
    data_files = [p for p in {root / t.path for t in (schema.interactions, schema.items, schema.users) if t}]
    run.update_manifest("prepare", {
        "config": cfg.to_dict(),
        "schema": str(source.path),
        "data_root": str(root),
        "data_root_from": source.root_from,
        "data_fingerprint": fingerprint([p.resolve() for p in data_files]),
        "pseudonym_key_fingerprint": key_fingerprint(key),  # the model version records it (Serve checks it)
        "counts": counts,
        "seconds": round(time.perf_counter() - t0, 2),
    })
    log.info("prepare done in %.1fs: %s", time.perf_counter() - t0, split_counts)
    return counts


class Features:
    """The prepare stage's outputs, loaded once for the later stages."""

    def __init__(self, run: RunDir):
        folder = run.require(run.features, "prepare")
        self.spec = FeatureSpec.load(folder / "spec.json")
        self.interactions = pd.read_parquet(folder / "interactions.parquet")
        self.items = pd.read_parquet(folder / "items.parquet")
        self.users = pd.read_parquet(folder / "users.parquet")

    def rows(self, *splits: str) -> pd.DataFrame:
        return self.interactions[self.interactions["split"].isin(splits)]

    def field_columns(self) -> list[str]:
        return [f"f:{f}" for f in self.spec.fields]
