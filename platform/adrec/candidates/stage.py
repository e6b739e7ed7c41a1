"""The candidates stage: fit every configured source on the known positives and report their recall.

The two-stage top-K recommender builds on these sources and is fitted after them, by
:func:`adrec.topk.stage.fit_topk` (``adrec candidates`` runs both)."""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import pandas as pd
import scipy.sparse as sp

from adrec.candidates.base import binary_matrix
from adrec.candidates.evaluate import recall_at
from adrec.candidates.factory import make_multi_source
from adrec.candidates.interactions import iter_columns, streamed_matrix
from adrec.candidates.merge import MultiSource
from adrec.candidates.popularity import PopularitySource
from adrec.config import AdrecConfig
from adrec.features.pipeline import Features
from adrec.features.split import TEST, TRAIN, VALID
from adrec.run import RunDir

#: Recall is reported at these list lengths, on the users with a test positive.
RECALL_KS = (50, 100, 200)

log = logging.getLogger(__name__)


def positives_matrix(rows: pd.DataFrame, n_users: int, n_items: int) -> sp.csr_matrix:
    """The label-1 (user, item) pairs of ``rows``: what the sources are fitted on."""
    return binary_matrix(rows[rows["label"] == 1], n_users, n_items)


def seen_matrix(rows: pd.DataFrame, n_users: int, n_items: int) -> sp.csr_matrix:
    """Every item a user interacted with, whatever the label: never proposed again."""
    return binary_matrix(rows, n_users, n_items)


def _columns(dirs, columns: list[str]) -> dict[str, np.ndarray]:
    """A few columns of the shards under ``dirs``, read batch by batch (a sharded run's)."""
    parts = list(iter_columns(dirs, columns))
    return {c: np.concatenate([p[c] for p in parts]) if parts else np.zeros(0) for c in columns}


def context_field(cfg: AdrecConfig, spec) -> str | None:
    if cfg.candidates.context_field:
        if cfg.candidates.context_field not in spec.context:
            raise ValueError(f"candidates.context_field {cfg.candidates.context_field!r} is not a context column; "
                             f"have {spec.context}")
        return cfg.candidates.context_field
    return spec.context[0] if spec.context else None


def evaluated_users(feats) -> tuple[np.ndarray, list[set[int]]]:
    """The users with a test positive (ascending) and their test positives: what recall is scored on."""
    if feats.sharded:  # three columns of the test shards, not the frame of every interaction
        test = pd.DataFrame(_columns(feats.split_dirs(TEST), ["user_idx", "item_idx", "label"]))
    else:
        test = feats.rows(TEST)
    test = test[test["label"] == 1]
    by_user = test.groupby("user_idx")["item_idx"].apply(lambda s: set(s.tolist())).to_dict()
    users = np.array(sorted(int(u) for u in by_user), dtype=np.int64)
    return users, [by_user[u] for u in users]


def build_candidates(cfg: AdrecConfig, run: RunDir, show_progress: bool = False) -> dict:
    t0 = time.perf_counter()
    feats = Features(run)
    spec = feats.spec
    if feats.sharded:  # one streamed pass per matrix over the train and valid shards (candidates/interactions.py)
        known_dirs = feats.split_dirs(TRAIN, VALID)
        train_pos = streamed_matrix(known_dirs, spec.n_users, spec.n_items, positives_only=True)
        known = None
    else:
        known = feats.interactions[feats.interactions["split"] != TEST]
        train_pos = positives_matrix(known, spec.n_users, spec.n_items)

    item_emb = None
    if "text" in cfg.candidates.quotas:
        from adrec.features.text import embed_texts

        item_emb = embed_texts(cfg.ranker, feats.items["text"].tolist(), show_progress=show_progress)
    multi = make_multi_source(cfg.candidates, item_embeddings=item_emb, show_progress=show_progress)
    multi.fit(train_pos)
    ctx = context_field(cfg, spec)
    for src in multi.sources.values():
        if isinstance(src, PopularitySource) and ctx is not None:
            cols = known if known is not None else _columns(known_dirs, [f"f:{ctx}", "item_idx", "label"])
            src.fit_context(np.asarray(cols[f"f:{ctx}"], dtype=np.int64), np.asarray(cols["item_idx"], dtype=np.int64),
                            weights=np.asarray(cols["label"], dtype=np.float32), n_contexts=spec.cardinality(ctx))
    fit_s = time.perf_counter() - t0

    out = run.candidates
    multi.save(out)
    seen = seen_matrix(known, spec.n_users, spec.n_items) if known is not None else \
        streamed_matrix(known_dirs, spec.n_users, spec.n_items, positives_only=False)
    sp.save_npz(out / "seen.npz", seen)
    recall = candidate_recall(multi, feats, seen)
    info = {"sources": multi.names, "context_field": ctx, "fit_seconds": round(fit_s, 2)}
    (out / "recall.json").write_text(json.dumps(recall, indent=2))
    info.update(recall=recall, seconds=round(time.perf_counter() - t0, 2))
    run.update_manifest("candidates", info)
    log.info("candidates: recall %s", {k: round(v, 4) for k, v in recall.items() if k.startswith("union")})
    return info


def candidate_recall(multi: MultiSource, feats, seen: sp.csr_matrix) -> dict[str, float]:
    """Recall@50/100/200 of each source and of the merged union, on users with test positives."""
    users, truth = evaluated_users(feats)
    exclude = seen[users]
    out: dict[str, float] = {}
    for name, (ids, _) in multi.recommend_per_source(users, max(RECALL_KS), exclude).items():
        out.update({f"{name}.{k}": v for k, v in recall_at(ids, truth, RECALL_KS).items()})
    for k in RECALL_KS:
        ids, _, _ = multi.recommend(users, k, exclude)
        out[f"union.recall@{k}"] = recall_at(ids, truth, (k,))[f"recall@{k}"]
    return out
