"""The streamed training feed: a run whose features are Parquet shards (``features.pipeline: streaming``)
trains without the table ever whole in one process.

The driver builds Ray Datasets over the shards (``train``, ``valid`` and ``train_valid``, the refit's rows),
each mapped block by block to the model's input arrays (:func:`adrec.ranking.data.rows_to_arrays`, the
function the in-memory path calls on the whole table), and hands them to ``TorchTrainer(datasets=...)``.
What a worker gets in its config is small: the spec, the catalogue tables and one :class:`ShardFeed` per
dataset, which reads ``ray.train.get_dataset_shard(name)`` with ``iter_torch_batches``. ``train`` and
``train_valid`` are split between the workers (Ray Data's streaming split, equal rows per worker, so the
DDP steps match); ``valid`` is not split: every worker streams all of it, so they all compute the same
AUC and take the same early-stopping decision.

What the in-memory path takes from the whole table comes from the prepare stage's stored counts (rows and
positives per split, in the manifest) or, for a run prepared before they were stored, from a streamed
aggregation of the label column. The per-batch step is the in-memory path's
(:meth:`TrainingState._train_batches`); only where the batches come from differs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from adrec.config import RankerConfig
from adrec.errors import ConfigError
from adrec.features.split import TRAIN, VALID
from adrec.ranking.data import rows_to_arrays
from adrec.ranking.fusion import FusionRanker

log = logging.getLogger(__name__)

#: The refit's rows (train + valid) as one dataset.
BOTH = "train_valid"
#: The datasets split between the workers (the rest are read whole by every worker).
SPLIT = [TRAIN, BOTH]


@dataclass
class ShardFeed:
    """One dataset of ``TorchTrainer(datasets=...)`` as a worker reads it: its shard, in batches."""

    name: str
    rows: int  # rows of the whole dataset (every worker's shards together)
    batch_size: int
    shuffle_buffer: int | None = None  # None: read in order (validation)
    seed: int = 0

    def _iter(self, **kw):
        import ray.train

        shard = ray.train.get_dataset_shard(self.name)
        for batch in shard.iter_torch_batches(batch_size=self.batch_size, **kw):
            yield {k: v.numpy() for k, v in batch.items()}

    def batches(self, epoch: int, rank: int):
        """(arrays, None) per batch of this worker's shard, shuffled through the bounded buffer."""
        kw = {}
        if self.shuffle_buffer:
            kw = {"local_shuffle_buffer_size": self.shuffle_buffer,
                  "local_shuffle_seed": self.seed * 1000 + epoch * 10 + rank}
        for b in self._iter(**kw):
            yield b, None

    def predict(self, model, device) -> dict[str, np.ndarray]:
        """The model's logits over the whole dataset, with the labels in the same order (eval mode)."""
        model.eval()
        out: dict[str, list] = {"logits": [], "label": []}
        two = model.has_cvr
        if two:
            out.update(cvr_logits=[], conversion=[])
        from adrec.ranking.train.data import to_device

        with torch.inference_mode():
            for b in self._iter():
                x = to_device(b, device)
                if two:
                    a, c = model.task_logits(x)
                    out["cvr_logits"].append(c.float().cpu().numpy())
                    out["conversion"].append(b["conversion"])
                else:
                    a = model(x)
                out["logits"].append(a.float().cpu().numpy())
                out["label"].append(b["label"])
        return {k: (np.concatenate(v) if v else np.zeros(0)).astype(np.float64 if "logits" in k else np.float32)
                for k, v in out.items()}


class _ToArrays:
    """Feature rows (a pandas block of the shards) -> the model's input arrays and the labels."""

    def __init__(self, arch: dict, conversion: bool):
        self.arch, self.conversion = arch, conversion

    def __call__(self, table) -> dict[str, np.ndarray]:
        """``table``: an Arrow block; its ``hist`` list column is read as offsets and values, not row by row."""
        import pyarrow as pa

        hist = table.column("hist").combine_chunks()
        if isinstance(hist, pa.ChunkedArray):  # an empty block
            hist = pa.array([], type=pa.list_(pa.int64()))
        rows = table.drop_columns(["hist"]).to_pandas()
        arrays = rows_to_arrays(rows, self.arch, (hist.offsets.to_numpy(), hist.values.to_numpy()))
        arrays["label"] = rows["label"].to_numpy(dtype=np.float32)
        if self.conversion:
            arrays["conversion"] = rows["conversion"].to_numpy(dtype=np.float32)
        return arrays


def check_streamable(cfg: RankerConfig) -> None:
    """Refuse what the streamed feed cannot do (each needs the whole table in one place)."""
    needs = {"ranker.collab": bool(cfg.collab), "ranker.recency_half_life": cfg.recency_half_life is not None,
             "ranker.dp": cfg.dp is not None}
    found = [k for k, v in needs.items() if v]
    if found:
        raise ConfigError(f"{', '.join(found)} need(s) the whole table in one place, which the streamed training "
                          "feed never builds: train with ranker.data_feed=in_memory (the shards are read whole), "
                          "or leave them unset")


def _split_counts(run, features, columns: list[str], conversion: bool) -> dict:
    """Rows and positives (and conversions) of train and valid: the prepare stage's stored counts, else a
    streamed aggregation over the shards (a run prepared before they were stored)."""
    counts = run.manifest().get("stages", {}).get("prepare", {}).get("counts", {}) if run is not None else {}
    kinds = ("rows", "positives", *(("conversions",) if conversion else ()))
    keys = [f"{k}.{s}" for s in (TRAIN, VALID) for k in kinds]
    if all(k in counts for k in keys):
        return {k: int(counts[k]) for k in keys}
    import ray.data
    from ray.data.aggregate import Count, Sum

    out = {}
    for split in (TRAIN, VALID):
        dirs = features.split_dirs(split)
        if not dirs:
            out.update({f"rows.{split}": 0, f"positives.{split}": 0, f"conversions.{split}": 0})
            continue
        ds = ray.data.read_parquet([str(d) for d in dirs], columns=columns)
        aggs = [Count(), Sum("label")] + ([Sum("conversion")] if conversion else [])
        got = ds.aggregate(*aggs)
        out[f"rows.{split}"] = int(got["count()"])
        out[f"positives.{split}"] = int(got["sum(label)"] or 0)
        if conversion:
            out[f"conversions.{split}"] = int(got["sum(conversion)"] or 0)
    return out


def streamed_data(cfg: RankerConfig, features, run=None) -> tuple[dict, dict]:
    """(what every worker gets in its config, the Ray Datasets for ``TorchTrainer(datasets=...)``) of a
    sharded run. The config holds the spec, the catalogue, the train rates and a :class:`ShardFeed` per
    dataset, never rows."""
    import ray.data

    check_streamable(cfg)
    spec = features.spec
    arch = FusionRanker.build_arch(cfg, spec)
    train_dirs, valid_dirs = features.split_dirs(TRAIN), features.split_dirs(VALID)
    if not train_dirs or not valid_dirs:
        raise ValueError(f"no '{TRAIN if not train_dirs else VALID}' shards in {features.folder}: the ranker "
                         "trains on train and selects on valid")
    import pyarrow.dataset as pads

    schema_names = pads.dataset(str(train_dirs[0]), format="parquet").schema.names
    conversion = "cvr" in cfg.tasks
    if conversion and "conversion" not in schema_names:
        raise ConfigError("ranker.tasks=[ctr, cvr] needs a conversion label, and these features have none: name "
                          "one in the schema (interactions.conversion) and run prepare again, or train with "
                          "ranker.tasks=[ctr]")
    label_cols = ["label", *(["conversion"] if conversion else [])]
    columns = ["user_idx", "item_idx", *(f"f:{f}" for f in arch["fields"]), "hist", *label_cols]
    missing = [c for c in columns if c not in schema_names]
    if missing:
        raise ValueError(f"the shards in {train_dirs[0]} lack column(s) {missing}: run prepare again")
    n = _split_counts(run, features, label_cols, conversion)
    ctr = n[f"positives.{TRAIN}"] / max(n[f"rows.{TRAIN}"], 1)
    cvr = (n[f"conversions.{TRAIN}"] / n[f"positives.{TRAIN}"]) if conversion and n[f"positives.{TRAIN}"] else None
    to_arrays = _ToArrays(arch, conversion)

    def read(dirs):
        return ray.data.read_parquet([str(d) for d in dirs], columns=columns).map_batches(
            to_arrays, batch_format="pyarrow")

    datasets = {TRAIN: read(train_dirs), VALID: read(valid_dirs), BOTH: read(train_dirs + valid_dirs)}
    rows = {TRAIN: n[f"rows.{TRAIN}"], VALID: n[f"rows.{VALID}"], BOTH: n[f"rows.{TRAIN}"] + n[f"rows.{VALID}"]}
    feeds = {name: ShardFeed(name, rows[name], cfg.batch_size,
                             cfg.shuffle_buffer if name in SPLIT else None, cfg.seed) for name in datasets}
    data = {"spec": spec, "items": features.items, "users": features.users, "arch": arch,
            "rates": {"ctr": ctr, "cvr": cvr}, **feeds}
    return data, datasets
