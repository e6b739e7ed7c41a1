"""The prepare stage streaming on Ray Data (``features.pipeline: streaming``): no table of interactions
is ever whole in one process.

Passes, each over blocks (the driver holds the catalog, the id indexes and counts, never the log):
1. read, parse and validate per block (:mod:`adrec.data.stream`), kept in the object store (which spills
   to disk);
2. the ids of users and items: unique ids per block, merged in the driver into the indexes;
3. a shuffle keyed by user: rows are indexed and grouped by a hash bucket of the user index, so one call
   gets many whole users and runs the vectorized temporal split and history over all of them;
4. statistics per block (rows per split, positives, repeats, unknown ids, context value counts), summed
   in the driver: the manifest's counts and the context vocabularies;
5. encoding per block, written as Parquet shards ``features/train``, ``features/valid``, ``features/test``.

Every step calls the functions of the in-process pipeline (:mod:`adrec.features.rows`, the temporal
split, the spec's encoders), so both give the same rows, split and features.
"""

from __future__ import annotations

import hashlib
import logging
import math
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import ray

from adrec.config import AdrecConfig
from adrec.data.files import POSITION, list_table
from adrec.data.ingest import RawData, _BadRows, _EmptyFields, table_columns, warn_counts
from adrec.data.schema import DatasetSchema
from adrec.data.stream import Tally, read_entity, read_interactions
from adrec.errors import ConfigError, DataError
from adrec.features.rows import (_entity_frame, _index, build_spec, context_counts, encode_block, fill_bids,
                                 entity_codes, history_flat)
from adrec.features.split import SPLITS, temporal_split
from adrec.run import RunDir, fingerprint

log = logging.getLogger(__name__)

_STAT = "#"
#: Blocks of rows per shuffle partition (bucket of users): 4 x ``features.batch_size`` (65,536) rows, about
#: 100 MB of pandas in one call; 4 partitions at 1M impressions, 62 at 16M.
BUCKET_BLOCKS = 4  # the ``column`` of the statistics rows in the per-block counts


def _data_error(err: BaseException) -> DataError | None:
    """The DataError a Ray task raised, out of the exceptions Ray Data wraps it in."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, DataError):
            cause = getattr(err, "cause", None)
            return DataError(str(cause if isinstance(cause, DataError) else err).strip().splitlines()[-1]
                             .removeprefix("adrec.errors.DataError: "))
        err = err.__cause__ or err.__context__ or getattr(err, "cause", None)
    return None


def _materialize(ds, tally, what: str):
    """Runs ``ds`` to the end (kept in the object store); a bad-row or data error comes out as a DataError."""
    try:
        out = ds.materialize()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s: Ray Data stats\n%s", what, out.stats())
        return out
    except Exception as err:
        error = ray.get(tally.result.remote())["error"]
        if error:
            raise DataError(error) from None
        found = _data_error(err)
        if found is not None:
            raise found from None
        raise RuntimeError(f"{what} failed: {err}") from err


def split_and_history(group: pd.DataFrame, context: list[str], history_len: int) -> pd.DataFrame:
    """Whole users' rows -> the same rows with ``split``, ``hist`` and ``_dup`` (repeats an earlier row
    of the user), sorted by (user, time, item) as the in-process pipeline sorts them."""
    g = group.sort_values(POSITION, kind="stable").reset_index(drop=True)  # source order: ties as in-process
    dup = g.duplicated(subset=["user_idx", "item_idx", "ts", "label", *context]).to_numpy()
    u, it, ts = g["user_idx"].to_numpy(), g["item_idx"].to_numpy(), g["ts"].to_numpy()
    g = g.assign(split=temporal_split(u, ts, it), _dup=dup).drop(columns=["_bucket"])
    g = g.sort_values(["user_idx", "ts", "item_idx"], kind="stable").reset_index(drop=True)
    offsets, values = history_flat(g["user_idx"].to_numpy(), g["item_idx"].to_numpy(), g["ts"].to_numpy(),
                                   g["label"].to_numpy(), g["split"].to_numpy(), history_len)
    # An Arrow list column (no per-row arrays): Ray Data keeps it as Arrow, the Parquet writer as a list.
    g["hist"] = pd.arrays.ArrowExtensionArray(pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)),
                                                                       pa.array(values, type=pa.int64())))
    return g


def _stats(batch: pd.DataFrame, context: list[str], known_item: np.ndarray | None,
           known_user: np.ndarray | None) -> pd.DataFrame:
    values = {f"rows.{s}": int((batch["split"] == s).sum()) for s in SPLITS}
    values["positives"] = int(batch["label"].sum())
    if "conversion" in batch:
        values["conversions"] = int(batch["conversion"].sum())
    for s in SPLITS:  # per split too: the streamed training feed starts its bias from them (ranking/train/feed.py)
        in_split = (batch["split"] == s).to_numpy()
        values[f"positives.{s}"] = int(batch["label"].to_numpy()[in_split].sum())
        if "conversion" in batch:
            values[f"conversions.{s}"] = int(batch["conversion"].to_numpy()[in_split].sum())
    values["duplicate_interactions"] = int(batch["_dup"].sum())
    if known_item is not None:
        values["interactions_with_unknown_item"] = int((~known_item[batch["item_idx"].to_numpy()]).sum())
    if known_user is not None:
        values["interactions_with_unknown_user"] = int((~known_user[batch["user_idx"].to_numpy()]).sum())
    stats = pd.DataFrame({"column": _STAT, "value": list(values), "n": list(values.values())})
    return pd.concat([stats, context_counts(batch, context)], ignore_index=True)


def _encode(batch: "pa.Table", spec, user_codes: pd.DataFrame, item_codes: pd.DataFrame) -> "pa.Table":
    """One block's feature rows as an Arrow table. ``hist`` passes through as the Arrow list column it is
    (what the in-process pipeline writes: a plain list, not Ray's tensor type), never row by row."""
    hist = batch.column("hist")
    rows = encode_block(batch.drop_columns(["hist"]).to_pandas(), spec, user_codes, item_codes, POSITION)
    table = pa.Table.from_pandas(rows, preserve_index=False)
    if not pa.types.is_list(hist.type):
        hist = hist.cast(pa.list_(pa.int64()))
    return table.append_column("hist", hist)


def _known(ids: list[str], table: pd.DataFrame | None, idcol: str) -> np.ndarray | None:
    """Per index, whether the side table has the entity (None without a side table)."""
    if table is None:  # object dtype: pandas' Arrow-string isin goes row by row in Python
        return None
    return np.asarray(pd.Index(ids, dtype=object).isin(table[idcol].to_numpy(dtype=object)))


def _fingerprint(listed) -> str:
    """The data fingerprint: the files' bytes when local (as the in-process pipeline), else their names,
    sizes and modification times (reading a bucket twice to hash it would double the cost of prepare)."""
    from pyarrow import fs as pafs

    if all(isinstance(f.fs, pafs.LocalFileSystem) for f in listed):
        return fingerprint(sorted({Path(p).resolve() for f in listed for p in f.paths}))
    h = hashlib.sha256()
    for f in listed:
        for info in f.fs.get_file_info(f.paths):
            h.update(f"{info.path}:{info.size}:{info.mtime_ns}".encode())
    return h.hexdigest()[:16]


def _write_splits(ds, folder: Path) -> None:
    """``ds`` as Parquet shards in ``folder/train``, ``folder/valid`` and ``folder/test``."""
    staging = folder / "_rows"
    shutil.rmtree(staging, ignore_errors=True)
    ds.write_parquet(str(staging), partition_cols=["split"])
    for split in SPLITS:
        out = folder / split
        shutil.rmtree(out, ignore_errors=True)
        src = staging / f"split={split}"
        if src.is_dir():
            src.rename(out)
        else:
            out.mkdir(parents=True)
    shutil.rmtree(staging, ignore_errors=True)


def prepare_streaming(cfg: AdrecConfig, run: RunDir, schema: DatasetSchema, root: Path,
                      key: bytes) -> tuple[dict, str]:
    """The prepare stage's rows on Ray Data; writes the features and returns (counts, data fingerprint)."""
    if cfg.features.new_items:
        raise ConfigError("features.new_items (the strict new-item protocol) is not built into the streaming "
                          "pipeline yet: use features.pipeline=in_process for it")
    block = cfg.features.batch_size
    tally = Tally.remote(cfg.data.max_bad_rows)
    files, ds = read_interactions(schema, root, key, tally, block)
    t0 = time.perf_counter()
    parsed = _materialize(ds, tally, "reading the interactions")
    result = ray.get(tally.result.remote())
    bad, empties = _BadRows(cfg.data.max_bad_rows), _EmptyFields()
    bad.total, bad.count, empties.count = result["total"], result["per_file"], result["empty"]
    listed = [files]
    side = {}
    for kind, spec, k in (("items", schema.items, None), ("users", schema.users, key)):
        if spec is not None:
            side[kind] = read_entity(spec, root, bad, empties, kind, k, block)
            listed.append(list_table(spec, root, kind))
    raw = RawData(pd.DataFrame(), side.get("items"), side.get("users"), {}, table_columns(schema))
    n_rows = parsed.count()
    log.info("read %d interactions from %d file(s) in %.1fs", n_rows, len(files.paths), time.perf_counter() - t0)

    seen_items, seen_users = result["items"], result["users"]
    item_ids = _index(pd.Series(seen_items), raw.items["item"] if raw.items is not None else None)
    user_ids = _index(pd.Series(seen_users), raw.users["user"] if raw.users is not None else None)
    # Object dtype: a hash table in C (pandas' Arrow-string index looks each id up far more slowly).
    item_index, user_index = pd.Index(item_ids, dtype=object), pd.Index(user_ids, dtype=object)
    # Shuffle partitions of about BUCKET_BLOCKS blocks each: few and large (each is one split_and_count call,
    # its users whole), so the shuffle's pieces (inputs x partitions) stay few as the log grows.
    buckets = max(1, math.ceil(n_rows / (BUCKET_BLOCKS * block)))

    def index(batch: pd.DataFrame) -> pd.DataFrame:
        u = user_index.get_indexer(batch["user"].to_numpy(dtype=object))
        return batch.drop(columns=["user", "item"]).assign(
            user_idx=u.astype(np.int64),
            item_idx=item_index.get_indexer(batch["item"].to_numpy(dtype=object)).astype(np.int64),
            _bucket=u % buckets)

    context = list(raw.columns.get("context", []))
    history_len = cfg.features.history_len
    known_item, known_user = _known(item_ids, raw.items, "item"), _known(user_ids, raw.users, "user")

    def split_and_count(group: pd.DataFrame) -> pd.DataFrame:
        out = split_and_history(group, context, history_len)
        ray.get(tally.add_counts.remote(_stats(out, context, known_item, known_user)))
        return out.drop(columns=["_dup"])

    # One call per bucket of users (few, large): the counts go to the tally, not through another pass.
    grouped = parsed.map_batches(index, batch_format="pandas").groupby("_bucket", num_partitions=buckets).map_groups(
        split_and_count, batch_format="pandas")
    grouped = _materialize(grouped, tally, "splitting the interactions by user")
    log.info("indexed and split by user in %.1fs", time.perf_counter() - t0)
    del parsed

    counted = ray.get(tally.result.remote())["counts"]
    totals = counted[counted["column"] == _STAT].groupby("value")["n"].sum()
    log.info("counted in %.1fs", time.perf_counter() - t0)
    spec = build_spec(cfg, raw, counted[counted["column"] != _STAT], len(user_ids), len(item_ids), len(seen_items))
    items = fill_bids(_entity_frame("item", item_ids, raw.items, "item", spec), schema.items)
    users = _entity_frame("user", user_ids, raw.users, "user", spec)
    item_codes, user_codes = entity_codes(items), entity_codes(users)

    run.features.mkdir(parents=True, exist_ok=True)
    encoded = grouped.map_batches(lambda b: _encode(b, spec, user_codes, item_codes),
                                  batch_format="pyarrow", batch_size=None)  # the shuffle's blocks as they come
    _write_splits(encoded, run.features)
    log.info("encoded and written in %.1fs", time.perf_counter() - t0)
    items.to_parquet(run.features / "items.parquet", index=False)
    users.to_parquet(run.features / "users.parquet", index=False)
    spec.save(run.features / "spec.json")

    counts = {"interactions": int(n_rows), "users": len(seen_users), "items": len(seen_items),
              "positives": int(totals.get("positives", 0)),
              **({"conversions": int(totals["conversions"])} if "conversions" in totals else {}),
              "bad_rows_skipped": bad.total,
              **{f"bad_rows_skipped.{k}": v for k, v in bad.count.items()},
              "duplicate_interactions": int(totals.get("duplicate_interactions", 0)), **empties.count}
    for name in ("interactions_with_unknown_item", "interactions_with_unknown_user"):
        if name in totals:
            counts[name] = int(totals[name])
    warn_counts(counts)
    counts.update({f"rows.{s}": int(totals[f"rows.{s}"]) for s in SPLITS if totals.get(f"rows.{s}", 0)})
    counts.update({k: int(totals[k]) for s in SPLITS for k in (f"positives.{s}", f"conversions.{s}")
                   if k in totals and totals.get(f"rows.{s}", 0)})
    counts.update({"catalog_items": len(seen_items), "indexed_items": len(item_ids), "indexed_users": len(user_ids),
                   "fields": len(spec.fields), "crosses": [c["name"] for c in spec.crosses],
                   "new_items_held_out": 0})
    return counts, _fingerprint(listed)
