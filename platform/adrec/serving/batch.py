"""Batch scoring (``adrec score``): every requested user's top-K by a Ray Data pass, the offline
counterpart of Serve.

The users (all the version's users, or raw ids from a file, one per line) stream through
``map_batches`` over a pool of actors, each holding the model version once; every actor answers with
:meth:`Recommender.recommend_index`, the request algorithm Serve runs, so a user's list is the one Serve
returns. The lists are written as Parquet under ``--out`` (a folder or an object-store URI): one row per
user with ``user`` (the pseudonym), ``user_id`` (the raw id, when the file gave it), ``items``,
``click_probs`` and ``version``.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pandas as pd

from adrec.config import AdrecConfig
from adrec.data.ids import normalize_id
from adrec.data.privacy import pseudonymize, resolve_key
from adrec.model_version import VersionPaths, live_dir
from adrec.run import RunDir
from adrec.storage import resolve

log = logging.getLogger(__name__)


class TopK:
    """A Ray Data actor: one loaded model version, many users' lists."""

    def __init__(self, model_dir: str, key: bytes, k: int, n_candidates: int, precompute_max_users: int,
                 objective: str = "relevance", pool: int = 50):
        from adrec.serving.holder import load_candidate_side
        from adrec.serving.strategy import Strategy

        # serve.objective as served, greedy: a batch list does not explore (nothing logs its propensities).
        self.strategy = Strategy(objective, pool=pool)

        # What a Serve replica loads: the version with its known users' two-stage lists at hand.
        self.rec = load_candidate_side(model_dir, True, n_candidates, k, precompute_max_users)
        self.key, self.k, self.n = key, k, n_candidates
        self.rec.check_objective(objective)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        if "user" not in batch:  # raw ids from a file
            batch = batch.assign(user=[pseudonymize(normalize_id(str(u)), self.key) for u in batch["user_id"]])
        items, probs = [], []
        for pseudonym in batch["user"]:
            answer = self.rec.recommend_index(self.rec.pseudonym_index(pseudonym), self.k, None, self.n,
                                              strategy=self.strategy)
            items.append([a["item"] for a in answer])
            probs.append(np.asarray([a["click_prob"] for a in answer], dtype=np.float32))
        return batch.assign(items=items, click_probs=probs, version=self.rec.version_id)


def score(cfg: AdrecConfig, run: RunDir, out: str, users: str = "all", k: int = 10,
          actors: int = 1, batch_size: int = 256) -> dict:
    """Writes the top-``k`` of ``users`` ("all" or a file of raw ids) to ``out``; returns counts."""
    import ray

    from adrec.runtime import init_ray

    t0 = time.perf_counter()
    model_dir = live_dir(run)
    key = resolve_key(cfg.data.pseudonym_key, run.path)
    init_ray(cfg.ray)
    if users == "all":
        ds = ray.data.read_parquet(str(VersionPaths(model_dir).users), columns=["user"])
    else:
        ds = ray.data.read_text(users).rename_columns({"text": "user_id"})
    target = resolve(out)
    scored = ds.map_batches(TopK, fn_constructor_args=(str(model_dir), key, k, cfg.candidates.n_candidates,
                                                                  cfg.serve.precompute_max_users, cfg.serve.objective,
                                                                  cfg.serve.pool),
                            batch_format="pandas", batch_size=batch_size, concurrency=actors, num_cpus=1)
    scored.write_parquet(target.path, filesystem=target.fs)
    written = ray.data.read_parquet(target.path, filesystem=target.fs).count()
    summary = {"users": int(written), "k": k, "out": str(target), "seconds": round(time.perf_counter() - t0, 2)}
    log.info("scored %d users (top %d) into %s in %.1fs", written, k, target, summary["seconds"])
    return summary
