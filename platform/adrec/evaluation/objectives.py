"""The report's value table: each ordering objective and exploration policy on the test users' lists.

For every evaluated user the pool Serve would choose from (the first ``serve.pool`` items of the
two-stage list, or of the merged candidates ranked by the CTR ranker when the version has no two-stage
model) is scored once by the ranker; each row of the table then fills the user's top K from that pool with
the serving code (:class:`~adrec.serving.strategy.Strategy`) and reports NDCG@K against the test positives
next to what the ranker expects the list to earn, undiscounted by position:

- expected clicks per list = the sum of the list's pCTR;
- expected revenue per list = the sum of bid x pCTR (bids: the schema's items.bid; absent without bids).

The exploration rows (epsilon-greedy at ``serve.exploration.epsilon``, Thompson at its strength) draw from a
generator seeded per user, so the table is reproducible; their NDCG loss against the greedy row of the same
objective is what exploring costs offline.
"""

from __future__ import annotations

import hashlib

import numpy as np

from adrec.config import ExplorationConfig, ServeConfig
from adrec.data.ingest import BID
from adrec.evaluation.report import markdown_table
from adrec.metrics import topk_metrics
from adrec.serving.strategy import (
    EXPECTED_VALUE,
    Strategy,
    greedy_order,
    make_policy,
    objective_values,
    request_rng,
)


def scored_pools(version, users: np.ndarray, pool: int, n_candidates: int,
                 batch_users: int = 256) -> tuple[np.ndarray, np.ndarray, bool]:
    """Per user the pool (item ids, -1 padded) and its pCTR (NaN padded); True when the pools are two-stage
    lists (in their own order) rather than candidates to order by an objective."""
    two_stage = version.two_stage is not None
    ids_all, probs_all = [], []
    for start in range(0, len(users), batch_users):
        chunk = users[start:start + batch_users]
        if two_stage:
            ids = version.two_stage.rank_lists(chunk, pool, exclude=version.seen)[0]
        else:
            ids = version.sources.recommend(chunk, n_candidates, version.seen[chunk])[0]
        valid = ids >= 0
        probs = np.full(ids.shape, np.nan)
        if valid.any():
            probs[valid] = version.ranker.predict(version.rows(np.repeat(chunk, valid.sum(1)), ids[valid]))
        ids_all.append(ids)
        probs_all.append(probs)
    return np.concatenate(ids_all), np.concatenate(probs_all), two_stage


def strategy_rows(serve: ServeConfig) -> list[tuple[str, Strategy]]:
    """The table's rows: each objective greedy, then the configured objective under each exploration policy."""
    rows = [(f"{o} / greedy", Strategy(o, make_policy(ExplorationConfig()), serve.pool))
            for o in ("relevance", "expected_clicks", "expected_value")]
    exp = serve.exploration
    for policy in ("epsilon_greedy", "thompson"):
        cfg = exp.model_copy(update={"policy": policy})
        label = f"epsilon={cfg.epsilon:g}" if policy == "epsilon_greedy" else f"strength={cfg.thompson_strength:g}"
        rows.append((f"{serve.objective} / {policy} ({label})", Strategy(serve.objective, make_policy(cfg), serve.pool)))
    return rows


def _user_rng(user: int) -> np.random.Generator:
    return request_rng(hashlib.sha256(f"eval-{user}".encode()).hexdigest()[:16])


def objective_table(version, users: np.ndarray, truth: list[set], n_catalog: int, k: int, serve: ServeConfig,
                    n_candidates: int) -> tuple[dict[str, float], str]:
    """Metrics (``objective.<row>.ndcg@K`` / ``.expected_clicks`` / ``.expected_revenue``) and the section body."""
    bids_all = version.items[BID].to_numpy(np.float64) if BID in version.items else None
    ids, probs, two_stage = scored_pools(version, users, max(serve.pool, k), n_candidates)
    metrics, rows = {}, []
    for label, strategy in strategy_rows(serve):
        if strategy.objective == EXPECTED_VALUE and bids_all is None:
            continue
        top = np.full((len(users), k), -1, np.int64)
        clicks, revenue = np.zeros(len(users)), np.zeros(len(users))
        for r, u in enumerate(users):
            keep = ids[r] >= 0
            items, p = ids[r][keep], probs[r][keep]
            if not two_stage:  # merged candidates: the pool is the best `pool` by the objective's value, as served
                values = objective_values(strategy.objective, p, None if bids_all is None else bids_all[items])
                best = greedy_order(items, values, max(serve.pool, k))
                items, p = items[best], p[best]
            bids = None if bids_all is None else bids_all[items]
            sel = strategy.choose(items, p, bids, k, _user_rng(int(u)), list_order=two_stage)
            top[r, :len(sel.order)] = items[sel.order]
            clicks[r] = p[sel.order].sum()
            revenue[r] = 0.0 if bids is None else (bids[sel.order] * p[sel.order]).sum()
        ndcg = topk_metrics(top, truth, n_catalog, k, prefix="x")[f"x.ndcg@{k}"]
        key = "objective." + label.split(" (")[0].replace(" / ", ".")
        metrics[f"{key}.ndcg@{k}"] = ndcg
        metrics[f"{key}.expected_clicks"] = float(clicks.mean())
        row = {"objective / policy": label, f"NDCG@{k}": ndcg, "expected clicks per list": float(clicks.mean())}
        if bids_all is not None:
            metrics[f"{key}.expected_revenue"] = float(revenue.mean())
            row["expected revenue per list"] = float(revenue.mean())
        rows.append(row)
    pool = f"the first {max(serve.pool, k)} of each user's two-stage list" if two_stage else \
        f"the merged candidates ({n_candidates} per user)"
    body = (f"Top-{k} lists of the {len(users)} test users filled from {pool} by each objective (greedy) and by "
            f"the exploration policies under the served objective (serve.objective = {serve.objective}, "
            f"serve.exploration.policy = {serve.exploration.policy}). Expected clicks and revenue per list are the "
            f"ranker's pCTR (times the bid) summed over the list, without a position discount"
            + ("" if bids_all is not None else "; this version has no bids (schema items.bid), so no revenue")
            + f".\n\n{markdown_table(rows)}")
    return metrics, body
