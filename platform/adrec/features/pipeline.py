"""The prepare stage: raw logs -> validated, pseudonymized, encoded, split features (Ray Data).

Outputs under ``<run>/features``:
- ``interactions.parquet``: ``user_idx``, ``item_idx``, ``ts``, ``label``, ``conversion`` (when the schema
  names a conversion label), ``split`` (train/valid/test),
  ``hist`` (item indices of the user's most recent earlier known positives, oldest first) and one
  ``f:<field>`` code column per field of the :class:`FeatureSpec`;
- ``items.parquet`` / ``users.parquet``: one row per index with the id (items: dataset id; users:
  pseudonym), the encoder ``text`` and the entity's code columns (``c:<field>``);
- ``spec.json``: the :class:`FeatureSpec`.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd

from adrec.config import AdrecConfig
from adrec.data import load_schema, read_dataset
from adrec.data.files import POSITION
from adrec.data.privacy import resolve_key
from adrec.keys import key_fingerprint
from adrec.data.sources import resolve_schema
from adrec.features.rows import (ROW_KEYS, _entity_frame, _index, build_spec, context_counts,  # noqa: F401
                                 encode_block, entity_codes, fill_bids, history_lists, row_keys)
from adrec.features.spec import FeatureSpec
from adrec.features.split import SPLITS, TEST, new_item_holdout, temporal_split
from adrec.run import RunDir, fingerprint
from adrec.runtime import init_ray

log = logging.getLogger(__name__)


def latest_history(features: pd.DataFrame, n_users: int, length: int) -> list[np.ndarray]:
    """Per user, the last ``length`` known positives (train and valid): what serving starts from."""
    known = features[(features["split"] != TEST) & (features["label"] == 1)]
    known = known.sort_values(["user_idx", "ts", "item_idx"])
    out = [np.empty(0, dtype=np.int64) for _ in range(n_users)]
    for u, grp in known.groupby("user_idx", sort=False):
        out[int(u)] = grp["item_idx"].to_numpy()[-length:] if length else np.empty(0, dtype=np.int64)
    return out


def prepare(cfg: AdrecConfig, run: RunDir) -> dict:
    """Run the whole prepare stage; returns the counts written to the manifest."""
    t0 = time.perf_counter()
    run.raw.mkdir(parents=True, exist_ok=True)
    source = resolve_schema(cfg.data, run.raw)
    schema, root = load_schema(source.path, source.data_root)
    log.info("schema %s; its paths resolve against %s (%s)", source.path, root, source.root_from)
    key = resolve_key(cfg.data.pseudonym_key, run.path)
    _clear_rows(run.features)
    if cfg.features.pipeline == "streaming":
        # Deferred for its cost: the streaming pipeline imports Ray Data at the top.
        from adrec.features.streaming import prepare_streaming

        init_ray(cfg.ray)
        counts, data_fingerprint = prepare_streaming(cfg, run, schema, root, key)
    else:
        counts, data_fingerprint = _prepare_in_process(cfg, run, schema, root, key)
    run.update_manifest("prepare", {
        "config": cfg.to_dict(),
        "schema": str(source.path),
        "data_root": str(root),
        "data_root_from": source.root_from,
        "data_fingerprint": data_fingerprint,
        "pseudonym_key_fingerprint": key_fingerprint(key),  # the model version records it (Serve checks it)
        "counts": counts,
        "seconds": round(time.perf_counter() - t0, 2),
    })
    log.info("prepare done in %.1fs: %s", time.perf_counter() - t0,
             {k: v for k, v in counts.items() if k.startswith("rows.")})
    return counts


def _clear_rows(folder: Path) -> None:
    """Removes the feature rows of an earlier prepare (either layout), so a rerun leaves one."""
    (folder / "interactions.parquet").unlink(missing_ok=True)
    for split in SPLITS:
        shutil.rmtree(folder / split, ignore_errors=True)


def _prepare_in_process(cfg: AdrecConfig, run: RunDir, schema, root, key: bytes) -> tuple[dict, str]:
    """The tables read whole in the driver, encoded on Ray Data; returns (counts, data fingerprint)."""
    import ray

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

    spec = build_spec(cfg, raw, context_counts(inter, list(raw.columns.get("context", []))),
                      len(user_ids), len(item_ids), n_catalog)
    items = fill_bids(_entity_frame("item", item_ids, raw.items, "item", spec), schema.items)
    users = _entity_frame("user", user_ids, raw.users, "user", spec)
    item_codes, user_codes = entity_codes(items), entity_codes(users)

    # Ray Data: vectorized encoding (vocab lookups, buckets, hashed crosses) in batches.
    # Ray starts only now, so bad input fails fast without paying for a cluster.
    init_ray(cfg.ray)
    base = inter[[*row_keys(inter.columns), *spec.context]].reset_index(drop=True)

    def encode(batch: pd.DataFrame) -> pd.DataFrame:
        return encode_block(batch, spec, user_codes, item_codes)

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
    # Per split as well: the streamed training feed reads them instead of the rows (ranking/train/feed.py).
    by_split = feats.groupby("split")
    counts.update({f"positives.{k}": int(v) for k, v in by_split["label"].sum().items()})
    if "conversion" in feats:
        counts.update({f"conversions.{k}": int(v) for k, v in by_split["conversion"].sum().items()})
    data_files = [p for p in {root / t.path for t in (schema.interactions, schema.items, schema.users) if t}]
    return counts, fingerprint([p.resolve() for p in data_files])


class Features:
    """The prepare stage's outputs, loaded once for the later stages.

    The interactions are read on first use of ``interactions``: a stage that streams the shards of the
    streaming pipeline (``sharded``) reads only the spec and the catalogue tables."""

    def __init__(self, run: RunDir):
        folder = self.folder = run.require(run.features, "prepare")
        self.spec = FeatureSpec.load(folder / "spec.json")
        # One file from the in-process pipeline, Parquet shards per split from the streaming one.
        self.sharded = not (folder / "interactions.parquet").is_file()
        self._interactions: pd.DataFrame | None = None
        self.items = pd.read_parquet(folder / "items.parquet")
        self.users = pd.read_parquet(folder / "users.parquet")

    @property
    def interactions(self) -> pd.DataFrame:
        if self._interactions is None:
            whole = self.folder / "interactions.parquet"
            self._interactions = read_shards(self.folder) if self.sharded else pd.read_parquet(whole)
        return self._interactions

    def split_dirs(self, *splits: str) -> list[Path]:
        """The shard folders of ``splits`` (a sharded run's), the empty ones left out."""
        dirs = [self.folder / s for s in splits]
        return [d for d in dirs if d.is_dir() and any(d.glob("*.parquet"))]

    def row_count(self) -> int:
        """The interactions' rows, from the Parquet footers when the run is sharded (nothing read)."""
        if not self.sharded or self._interactions is not None:
            return len(self.interactions)
        import pyarrow.dataset as pads

        return sum(pads.dataset(str(d), format="parquet").count_rows() for d in self.split_dirs(*SPLITS))

    def rows(self, *splits: str) -> pd.DataFrame:
        return self.interactions[self.interactions["split"].isin(splits)]

    def field_columns(self) -> list[str]:
        return [f"f:{f}" for f in self.spec.fields]


def read_shards(folder: Path) -> pd.DataFrame:
    """The streaming pipeline's shards (``folder/train|valid|test``) as one frame, in the in-process
    pipeline's row order and columns, for the stages that hold the interactions in memory."""
    parts = [pd.read_parquet(folder / s).assign(split=s) for s in SPLITS
             if (folder / s).is_dir() and any((folder / s).glob("*.parquet"))]
    if not parts:
        raise FileNotFoundError(f"{folder} holds neither interactions.parquet nor train/valid/test shards")
    inter = pd.concat(parts, ignore_index=True)
    inter = inter.sort_values(["user_idx", "ts", "item_idx", *POSITION], kind="stable").reset_index(drop=True)
    return inter[[*row_keys(inter.columns), *(c for c in inter.columns if c.startswith("f:")), "hist"]]
