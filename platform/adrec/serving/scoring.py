"""Batched ranking: the click probabilities of several concurrent requests in one ``predict`` call.

The body of the ``@serve.batch`` ranking methods of the fused Ingress and the graph's RankerDeployment.
"""

import asyncio
import logging
from typing import Any

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)


def predict_scores(ranker, rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray | None]:
    """pCTR of ``rows``, and pCTCVR when the ranker has the ESMM head (``ranker.tasks=[ctr, cvr]``: one
    forward pass gives both; serve.objective=expected_value then orders by bid x pCTCVR), else None."""
    if "cvr" in getattr(ranker, "tasks", ()):
        t = ranker.predict_tasks(rows)
        return np.asarray(t["ctr"], np.float32), np.asarray(t["ctcvr"], np.float64)
    return np.asarray(ranker.predict(rows), np.float32), None


def score_requests(rec, users: list[int], items: list[np.ndarray], contexts: list[dict]) -> list[dict]:
    """One ``predict`` over the rows of several requests (each its own user and context): per request
    ``{"scores": pCTR}``, with ``"ctcvr"`` too when the ranker gives pCTCVR.

    Requests with the same context share one ``rows`` call (pandas costs ~1 ms a call whatever its
    size: per request, that was as much as the ranking itself).
    """
    lens = [len(it) for it in items]
    groups: dict[tuple, list[int]] = {}
    for i, ctx in enumerate(contexts):
        groups.setdefault(tuple(sorted((ctx or {}).items())), []).append(i)
    frames, order = [], []
    for idx in groups.values():
        u = np.repeat(np.asarray([users[i] for i in idx], dtype=np.int64), [lens[i] for i in idx])
        it = np.concatenate([np.asarray(items[i], np.int64) for i in idx])
        frames.append(rec.version.rows(u, it, contexts[idx[0]]))
        order += idx
    rows = frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)
    probs, ctcvr = predict_scores(rec.ranker, rows)
    out: list[dict] = [{"scores": np.empty(0, np.float32)}] * len(items)
    start = 0
    for i in order:
        out[i] = {"scores": probs[start:start + lens[i]]}
        if ctcvr is not None:
            out[i]["ctcvr"] = ctcvr[start:start + lens[i]]
        start += lens[i]
    return out


async def rank_grouped(keys: list, resolve, users: list, items: list, contexts: list) -> list:
    """The body of a ``@serve.batch`` ranking call: one ``predict`` per model version in the batch.

    ``keys[i]`` names request i's model version, ``await resolve(i)`` returns its :class:`Recommender`.
    """
    out: list[Any] = [None] * len(keys)
    groups: dict[Any, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    for key, idx in groups.items():
        try:
            rec = await resolve(idx[0])
            scores = await asyncio.to_thread(score_requests, rec, [users[i] for i in idx], [items[i] for i in idx],
                                             [contexts[i] for i in idx])
            for i, sc in zip(idx, scores):
                out[i] = sc
        except Exception as err:  # one version failing must not fail the others in the batch
            log.error("ranking failed for version %s: %s", getattr(key, "version_id", key), err)
            for i in idx:
                out[i] = {"error": f"ranking failed: {type(err).__name__}"}
    return out
