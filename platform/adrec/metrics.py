"""Offline metrics, exactly as the "Split and evaluation protocol" of docs/design.md defines them.

The package's one definition of each metric, below every stage that scores a model (the
ranker's validation, top-K training, the evaluate stage, the online learner), so none of them
imports another stage for it. numpy and scikit-learn (imported inside the CTR functions: it
costs about a second); no Ray, no torch. Every function validates its inputs and raises
``ValueError`` naming the problem instead of returning a silently wrong number.

CTR (every test interaction is an impression), from scikit-learn:
    :func:`auc` (ties count half), :func:`logloss`, :func:`calibration`,
    :func:`ctr_metrics`, and the figure data :func:`roc_points`, :func:`calibration_bins`.
Conversions (issue 17): :func:`conversion_metrics`, CVR on the clicked impressions and CTCVR (click and
conversion) on all of them.

Top-K (positives are label 1; the caller passes only evaluated users, i.e. users
with at least one test positive), hand-written because they are the protocol's own
definitions, which no library matches exactly: per-user averages over evaluated users
only, AP@K normalised by min(K, |T|), -1 padding counted as a miss with K in the
precision denominator, ties going to the lower item index:
    :func:`rank_topk` ranks the full catalog minus excluded (train) items,
    :func:`rank_candidates` ranks per-user candidate lists;
    :func:`topk_metrics` turns the ranked lists into
    Precision/Recall/NDCG/MAP/HitRate/Coverage@K.

Fairness of exposure (the served top-K lists; -1 padding is no slot), hand-written for the
same reason: :func:`item_exposure`, :func:`gini`, :func:`long_tail_share`,
:func:`exposure_to_merit`, :func:`calibration_by_group`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "auc",
    "logloss",
    "calibration",
    "ctr_metrics",
    "roc_points",
    "calibration_bins",
    "topk_metrics",
    "rank_topk",
    "rank_candidates",
    "item_exposure",
    "gini",
    "long_tail_share",
    "exposure_to_merit",
    "calibration_by_group",
]

# Rows of the score matrix handled at once by rank_topk: bounds temporary memory to
# about this many elements (x8 bytes per temporary array).
_RANK_CHUNK_ELEMENTS = 1 << 23


# --------------------------------------------------------------------------- CTR


def _labels_and_probs(y, p) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y)
    p = np.asarray(p, dtype=np.float64)
    if y.ndim != 1 or p.ndim != 1:
        y = y.reshape(-1)
        p = p.reshape(-1)
    if y.shape[0] != p.shape[0]:
        raise ValueError(f"y and p have different lengths: {y.shape[0]} != {p.shape[0]}")
    if y.dtype == bool:
        y = y.astype(np.float64)
    else:
        y = y.astype(np.float64)
        bad = ~((y == 0.0) | (y == 1.0))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"labels must be 0/1; found {y[i]!r} at position {i}")
    if not np.all(np.isfinite(p)):
        i = int(np.flatnonzero(~np.isfinite(p))[0])
        raise ValueError(f"predictions must be finite; found {p[i]!r} at position {i}")
    return y, p


def auc(y, p) -> float:
    """Area under the ROC curve (scikit-learn's ``roc_auc_score``: tied scores count half).

    ``p`` may be any score (probability or logit). Returns ``nan`` when ``y`` holds a
    single class (or is empty), where scikit-learn would raise.
    """
    from sklearn.metrics import roc_auc_score

    y, p = _labels_and_probs(y, p)
    n_pos = float(y.sum())
    if n_pos == 0 or n_pos == y.shape[0]:
        return float("nan")
    return float(roc_auc_score(y, p))


def logloss(y, p, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy (natural log, scikit-learn's ``log_loss``) with ``p`` clipped to
    ``[eps, 1 - eps]`` first (the protocol's clip: scikit-learn's own is machine epsilon).

    ``p`` must be probabilities in [0, 1]. Returns ``nan`` for empty input.
    """
    from sklearn.metrics import log_loss

    y, p = _labels_and_probs(y, p)
    if y.shape[0] == 0:
        return float("nan")
    if p.min() < 0.0 or p.max() > 1.0:
        raise ValueError(
            f"logloss needs probabilities in [0, 1]; got values in [{p.min()}, {p.max()}]"
        )
    if not 0.0 < eps < 0.5:
        raise ValueError(f"eps must be in (0, 0.5), got {eps}")
    return float(log_loss(y, np.clip(p, eps, 1.0 - eps), labels=[0.0, 1.0]))


def roc_points(y, p) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) points of the ROC curve, one per distinct score, starting at (0, 0).

    scikit-learn's ``roc_curve`` keeping every threshold; with a single class the undefined
    axis is all zeros (scikit-learn warns and gives nan there).
    """
    import warnings

    from sklearn.exceptions import UndefinedMetricWarning
    from sklearn.metrics import roc_curve

    y, p = _labels_and_probs(y, p)
    if y.size == 0:
        return np.zeros(1), np.zeros(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        fpr, tpr, _ = roc_curve(y, p, drop_intermediate=False)
    return np.nan_to_num(fpr, nan=0.0), np.nan_to_num(tpr, nan=0.0)


def calibration_bins(y, p, n_bins: int = 10, strategy: str = "uniform") -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Reliability-diagram bins: ``(edges, counts, mean_p, rate)``.

    ``mean_p`` (mean predicted probability) and ``rate`` (observed click rate) come from
    scikit-learn's ``calibration_curve`` and cover the non-empty bins; ``counts`` (impressions
    per bin, empty bins included) uses the same bins. ``strategy="uniform"``: equal-width bins on
    [0, 1]; ``"quantile"``: equal-count bins (repeated quantiles merged).
    """
    from sklearn.calibration import calibration_curve

    y, p = _labels_and_probs(y, p)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    if y.size == 0:
        raise ValueError("calibration bins need at least one impression")
    if strategy == "uniform":
        edges = np.linspace(0.0, 1.0, n_bins + 1)
    elif strategy == "quantile":
        edges = np.unique(np.quantile(p, np.linspace(0.0, 1.0, n_bins + 1)))
        if edges.size < 2:
            edges = np.array([p.min(), p.max() + 1e-12])
    else:
        raise ValueError(f"strategy must be 'uniform' or 'quantile', got {strategy!r}")
    if p.min() < 0.0 or p.max() > 1.0:
        raise ValueError(f"calibration bins need probabilities in [0, 1]; got values in [{p.min()}, {p.max()}]")
    # calibration_curve puts p in bin searchsorted(inner edges, p) (a value on an edge joins the lower
    # bin); the counts use the same rule. Repeated quantiles only leave empty bins, which it drops.
    counts = np.bincount(np.searchsorted(edges[1:-1], p), minlength=edges.size - 1)
    rate, mean_p = calibration_curve(y, p, n_bins=n_bins, strategy=strategy)
    return edges, counts, mean_p, rate


def calibration(y, p) -> float:
    """mean(p) / mean(y): 1.0 is calibrated on average, > 1 over-predicts clicks.

    Returns ``nan`` when there are no positives (or no rows).
    """
    y, p = _labels_and_probs(y, p)
    if y.shape[0] == 0 or y.sum() == 0:
        return float("nan")
    return float(p.mean() / y.mean())


def ctr_metrics(y, p) -> dict[str, float]:
    """``{"ctr.auc", "ctr.logloss", "ctr.calibration"}`` for clicks ``y`` and probabilities ``p``."""
    return {
        "ctr.auc": auc(y, p),
        "ctr.logloss": logloss(y, p),
        "ctr.calibration": calibration(y, p),
    }


def conversion_metrics(clicks, conversions, p_cvr, p_ctcvr) -> dict[str, float]:
    """``cvr.auc`` / ``cvr.logloss`` of ``p_cvr`` against the conversions of the clicked rows only (pCVR is
    the probability of a conversion given a click), ``ctcvr.auc`` / ``ctcvr.logloss`` / ``ctcvr.calibration``
    of ``p_ctcvr`` against click-and-conversion on every row (what an impression earns), and the counts."""
    clicks, p_cvr = _labels_and_probs(clicks, p_cvr)
    conversions, p_ctcvr = _labels_and_probs(conversions, p_ctcvr)
    if clicks.shape != conversions.shape:
        raise ValueError(f"clicks has {clicks.shape[0]} rows but conversions {conversions.shape[0]}")
    if (conversions > clicks).any():
        raise ValueError("a row converts without a click: conversions must be 0 wherever clicks are")
    clicked = clicks > 0
    return {
        "cvr.auc": auc(conversions[clicked], p_cvr[clicked]),
        "cvr.logloss": logloss(conversions[clicked], p_cvr[clicked]) if clicked.any() else float("nan"),
        "cvr.rows": float(clicked.sum()),
        "ctcvr.auc": auc(conversions, p_ctcvr),
        "ctcvr.logloss": logloss(conversions, p_ctcvr),
        "ctcvr.calibration": calibration(conversions, p_ctcvr),
        "ctcvr.positives": float(conversions.sum()),
    }


# ------------------------------------------------------------------------- Top-K


def _as_index_array(x, what: str) -> np.ndarray:
    arr = np.asarray(list(x) if isinstance(x, (set, frozenset)) else x)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    arr = arr.reshape(-1)
    if not np.issubdtype(arr.dtype, np.integer):
        if np.issubdtype(arr.dtype, np.floating) and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        else:
            raise ValueError(f"{what} must hold integer item indices, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _check_k(k) -> int:
    if isinstance(k, bool) or int(k) != k or int(k) < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return int(k)


def topk_metrics(
    topk: np.ndarray,
    test_pos: Sequence[Iterable[int]],
    n_catalog: int,
    k: int,
    *,
    prefix: str = "topk",
) -> dict[str, float]:
    """Precision/Recall/NDCG/MAP/HitRate/Coverage@K of ranked lists.

    Args:
        topk: ``(n_eval_users, K')`` item indices in rank order, ``-1`` padding a list
            shorter than ``k``. Only the first ``k`` columns are used; fewer than ``k``
            columns are treated as padded.
        test_pos: one set/array of test-positive item indices per row of ``topk``;
            each must be non-empty (evaluated users have at least one test positive).
        n_catalog: catalog size (denominator of coverage); items are ``0..n_catalog-1``.
        k: the cut-off.
        prefix: key prefix, e.g. ``"candidates"`` for ``candidates.recall@100``.

    With h_r = 1 when the item at rank r is in T (the user's test positives):
    Precision@K = sum h_r / K; Recall@K = sum h_r / |T|; NDCG@K = DCG / IDCG with
    DCG = sum h_r / log2(r + 1) and the ideal over min(K, |T|) hits;
    AP@K = sum_r h_r * precision@r / min(K, |T|); HitRate@K = 1[any hit]; all
    averaged uniformly over users. Coverage@K = |union of top-K lists| / n_catalog.

    Returns ``nan`` for the per-user averages when there are no users.
    """
    k = _check_k(k)
    n_catalog = int(n_catalog)
    if n_catalog < 1:
        raise ValueError(f"n_catalog must be >= 1, got {n_catalog}")
    topk = np.asarray(topk)
    if topk.ndim == 1 and topk.size == 0:
        topk = topk.reshape(0, 0)
    if topk.ndim != 2:
        raise ValueError(f"topk must be 2-D (n_users, K), got shape {topk.shape}")
    topk = (
        _as_index_array(topk, "topk").reshape(topk.shape)
        if topk.size
        else np.zeros(topk.shape, dtype=np.int64)
    )
    n_users = topk.shape[0]
    if len(test_pos) != n_users:
        raise ValueError(f"test_pos has {len(test_pos)} entries but topk has {n_users} rows")

    # Exactly k columns: truncate, or pad with -1.
    if topk.shape[1] >= k:
        lists = topk[:, :k]
    else:
        lists = np.full((n_users, k), -1, dtype=np.int64)
        lists[:, : topk.shape[1]] = topk
    if lists.size and (lists.min() < -1 or lists.max() >= n_catalog):
        bad = lists[(lists < -1) | (lists >= n_catalog)][0]
        raise ValueError(f"topk holds item index {bad} outside [0, {n_catalog}) (and -1 padding)")
    _check_no_duplicates(lists)

    keys = [f"{prefix}.{name}@{k}" for name in ("precision", "recall", "ndcg", "map", "hitrate")]
    coverage_key = f"{prefix}.coverage@{k}"
    valid = lists >= 0
    coverage = float(np.unique(lists[valid]).size) / n_catalog
    if n_users == 0:
        logger.warning("topk_metrics called with no evaluated users; averages are nan")
        out = {key: float("nan") for key in keys}
        out[coverage_key] = coverage
        return out

    # Membership of each ranked item in its user's T, vectorized with one isin over
    # (user, item) codes.
    pos_sizes = np.zeros(n_users, dtype=np.int64)
    codes = []
    for u, t in enumerate(test_pos):
        items = np.unique(_as_index_array(t, f"test_pos[{u}]"))
        if items.size == 0:
            raise ValueError(
                f"test_pos[{u}] is empty: evaluated users need at least one test positive"
            )
        if items[0] < 0 or items[-1] >= n_catalog:
            raise ValueError(f"test_pos[{u}] holds an item index outside [0, {n_catalog})")
        pos_sizes[u] = items.size
        codes.append(u * np.int64(n_catalog) + items)
    pos_codes = np.concatenate(codes)
    row_base = (np.arange(n_users, dtype=np.int64) * np.int64(n_catalog))[:, None]
    hits = valid & np.isin(row_base + np.where(valid, lists, 0), pos_codes)
    h = hits.astype(np.float64)

    ranks = np.arange(1, k + 1, dtype=np.float64)
    discount = 1.0 / np.log2(ranks + 1.0)
    n_hits = h.sum(axis=1)
    ideal_n = np.minimum(pos_sizes, k)  # >= 1
    idcg = np.cumsum(discount)[ideal_n - 1]
    precision_at_r = np.cumsum(h, axis=1) / ranks

    per_user = {
        keys[0]: n_hits / k,
        keys[1]: n_hits / pos_sizes,
        keys[2]: (h * discount).sum(axis=1) / idcg,
        keys[3]: (h * precision_at_r).sum(axis=1) / ideal_n,
        keys[4]: (n_hits > 0).astype(np.float64),
    }
    out = {key: float(v.mean()) for key, v in per_user.items()}
    out[coverage_key] = coverage
    return out


def _check_no_duplicates(lists: np.ndarray) -> None:
    if lists.size == 0:
        return
    s = np.sort(lists, axis=1)
    dup = (s[:, 1:] == s[:, :-1]) & (s[:, 1:] >= 0)
    if dup.any():
        row = int(np.flatnonzero(dup.any(axis=1))[0])
        item = int(s[row, 1:][dup[row]][0])
        raise ValueError(f"topk row {row} lists item {item} more than once")


def rank_topk(
    scores: np.ndarray,
    exclude: Sequence[Iterable[int]] | None,
    k: int,
) -> np.ndarray:
    """Top-``k`` item indices per user over the whole catalog, minus excluded items.

    Args:
        scores: ``(n_users, n_items)`` scores; higher ranks first. ``-inf`` is allowed;
            ``nan`` is allowed only at excluded positions.
        exclude: one array/set of item indices per user to leave out (the user's
            train items), or ``None``.
        k: list length.

    Returns:
        ``(n_users, k)`` int64 item indices, sorted by (-score, item index) so equal
        scores go to the lower index; ``-1`` pads rows with fewer than ``k``
        remaining items.
    """
    k = _check_k(k)
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be 2-D (n_users, n_items), got shape {scores.shape}")
    n_users, n_items = scores.shape
    if exclude is not None and len(exclude) != n_users:
        raise ValueError(f"exclude has {len(exclude)} entries but scores has {n_users} rows")
    out = np.full((n_users, k), -1, dtype=np.int64)
    if n_users == 0 or n_items == 0:
        return out
    take = min(k, n_items)
    chunk = max(1, _RANK_CHUNK_ELEMENTS // n_items)
    for start in range(0, n_users, chunk):
        stop = min(n_users, start + chunk)
        neg = -scores[start:stop].astype(np.float64)
        excluded = np.zeros(neg.shape, dtype=bool)
        if exclude is not None:
            for row in range(start, stop):
                items = _as_index_array(exclude[row], f"exclude[{row}]")
                if items.size and (items.min() < 0 or items.max() >= n_items):
                    raise ValueError(
                        f"exclude[{row}] holds an item index outside [0, {n_items})"
                    )
                excluded[row - start, items] = True
        if np.isnan(neg[~excluded]).any():
            raise ValueError("scores hold nan at a non-excluded position")
        neg[excluded] = 0.0  # their value is irrelevant: they sort after every kept item
        # lexsort: last key is primary; it is stable, so full ties keep index order.
        order = np.lexsort((neg, excluded), axis=1)[:, :take]
        kept = ~np.take_along_axis(excluded, order, axis=1)
        out[start:stop, :take] = np.where(kept, order, -1)
    return out


def rank_candidates(
    cand_ids: np.ndarray,
    cand_scores: np.ndarray,
    k: int,
    *,
    exclude: Sequence[Iterable[int]] | None = None,
) -> np.ndarray:
    """Top-``k`` of per-user candidate lists, for all users at once.

    Args:
        cand_ids: ``(n_users, C)`` item indices, ``-1`` padding.
        cand_scores: ``(n_users, C)`` scores aligned with ``cand_ids``; values at
            padded positions are ignored (may be nan).
        k: list length.
        exclude: optional per-user items to drop from the candidates (train items).

    Returns:
        ``(n_users, k)`` int64 item indices sorted by (-score, item id), so equal
        scores go to the lower item id whatever their position in the candidate
        list; ``-1`` pads short rows. An item listed twice for a user is kept once,
        with its highest score.
    """
    k = _check_k(k)
    ids = np.asarray(cand_ids)
    sc = np.asarray(cand_scores)
    if ids.ndim != 2:
        raise ValueError(f"cand_ids must be 2-D (n_users, C), got shape {ids.shape}")
    if sc.shape != ids.shape:
        raise ValueError(f"cand_scores shape {sc.shape} != cand_ids shape {ids.shape}")
    n_users, n_cand = ids.shape
    out = np.full((n_users, k), -1, dtype=np.int64)
    if n_users == 0 or n_cand == 0:
        return out
    ids = _as_index_array(ids, "cand_ids").reshape(ids.shape)
    if ids.min() < -1:
        raise ValueError(f"cand_ids holds {ids.min()}; only -1 may pad")
    pad = ids < 0
    if exclude is not None:
        if len(exclude) != n_users:
            raise ValueError(f"exclude has {len(exclude)} entries but cand_ids has {n_users} rows")
        width = np.int64(max(int(ids.max()), 0) + 1)
        codes = []
        for u, x in enumerate(exclude):
            e = _as_index_array(x, f"exclude[{u}]")
            if e.size and e.min() < 0:
                raise ValueError(f"exclude[{u}] holds a negative item index")
            codes.append(u * width + e[e < width])  # larger ids are never candidates
        if codes:
            row_base = np.arange(n_users, dtype=np.int64)[:, None] * width
            pad = pad | np.isin(row_base + np.where(pad, 0, ids), np.concatenate(codes))
    neg = -sc.astype(np.float64)
    if np.isnan(neg[~pad]).any():
        raise ValueError("cand_scores hold nan at a non-padded position")
    neg[pad] = 0.0
    # Primary: padded last; then -score; then item id. (lexsort: last key is primary.)
    order = np.lexsort((ids, neg, pad), axis=1)
    s_ids = np.take_along_axis(ids, order, axis=1)
    s_pad = np.take_along_axis(pad, order, axis=1)
    # Drop repeats of an item: keep its first (best-scored) occurrence.
    by_id = np.lexsort((np.arange(n_cand)[None, :].repeat(n_users, 0), s_ids), axis=1)
    ids_by_id = np.take_along_axis(s_ids, by_id, axis=1)
    repeat_by_id = np.zeros_like(s_pad)
    repeat_by_id[:, 1:] = ids_by_id[:, 1:] == ids_by_id[:, :-1]
    repeat = np.zeros_like(s_pad)
    np.put_along_axis(repeat, by_id, repeat_by_id, axis=1)
    drop = s_pad | repeat
    # Compact kept entries to the front, preserving rank order (stable).
    compact = np.argsort(drop, axis=1, kind="stable")[:, :k]
    ranked = np.take_along_axis(s_ids, compact, axis=1)
    ranked = np.where(np.take_along_axis(drop, compact, axis=1), -1, ranked)
    out[:, : ranked.shape[1]] = ranked
    return out


# ---------------------------------------------------------------- Fairness of exposure


def _lists(lists) -> np.ndarray:
    arr = np.asarray(lists)
    if arr.size == 0:
        return np.zeros((0, 0), dtype=np.int64)
    if arr.ndim != 2:
        raise ValueError(f"lists must be 2-D (n_users, K), got shape {arr.shape}")
    arr = _as_index_array(arr, "lists").reshape(arr.shape)
    if arr.min() < -1:
        raise ValueError(f"lists hold {arr.min()}; only -1 may pad")
    return arr


def _position_weights(k: int) -> np.ndarray:
    """1 / log2(1 + rank) for ranks 1..k (the NDCG discount)."""
    return 1.0 / np.log2(np.arange(1, k + 1, dtype=np.float64) + 1.0)


def item_exposure(lists, n_items: int, *, position_weighted: bool = False) -> np.ndarray:
    """Exposure of every item ``0..n_items-1`` in the served lists (``(n_users, K)``, -1 padding).

    Unweighted (the default): the number of lists the item appears in. ``position_weighted``:
    the sum over those lists of 1 / log2(1 + rank), rank 1-based. Items never served get 0.
    """
    lists = _lists(lists)
    n_items = int(n_items)
    if n_items < 0:
        raise ValueError(f"n_items must be >= 0, got {n_items}")
    if lists.size and lists.max() >= n_items:
        raise ValueError(f"lists hold item index {lists.max()} outside [0, {n_items})")
    valid = lists >= 0
    w = np.broadcast_to(_position_weights(lists.shape[1]), lists.shape) if position_weighted \
        else np.ones(lists.shape)
    return np.bincount(lists[valid], weights=w[valid], minlength=n_items).astype(np.float64)


def gini(values) -> float:
    """Gini index of non-negative ``values`` (e.g. exposure per item, zeros included).

    With x sorted ascending and i = 1..n: G = sum_i (2i - n - 1) x_i / (n sum_i x_i).
    0 when every value is equal; (n - 1) / n when one value holds everything. ``nan`` when
    there are no values or they sum to 0 (nothing was exposed).
    """
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if x.size and (not np.all(np.isfinite(x)) or x.min() < 0):
        raise ValueError("gini needs finite, non-negative values")
    total = x.sum()
    if x.size == 0 or total == 0:
        return float("nan")
    x = np.sort(x)
    n = x.size
    i = np.arange(1, n + 1, dtype=np.float64)
    return float(((2 * i - n - 1) * x).sum() / (n * total))


def long_tail_share(lists, popularity, head_share: float = 0.8) -> float:
    """Share of served slots (non-padding list entries) that hold a long-tail item.

    ``popularity[i]`` counts item i's train interactions. The head is the smallest set of most
    popular items (ties to the lower index) whose counts add up to at least ``head_share`` of
    all of them; every other item, never-seen ones included, is long tail. ``nan`` when no slot
    is served or popularity sums to 0.
    """
    if not 0.0 < head_share <= 1.0:
        raise ValueError(f"head_share must be in (0, 1], got {head_share}")
    lists = _lists(lists)
    pop = np.asarray(popularity, dtype=np.float64).reshape(-1)
    if pop.size and (not np.all(np.isfinite(pop)) or pop.min() < 0):
        raise ValueError("popularity needs finite, non-negative counts")
    if lists.size and lists.max() >= pop.size:
        raise ValueError(f"lists hold item index {lists.max()} outside [0, {pop.size})")
    served = lists[lists >= 0]
    if served.size == 0 or pop.sum() == 0:
        return float("nan")
    order = np.lexsort((np.arange(pop.size), -pop))  # most popular first, ties to the lower index
    cum = np.cumsum(pop[order])
    # A small tolerance so that 0.8 of a sum of floats is not missed by rounding.
    n_head = int(np.searchsorted(cum, head_share * pop.sum() * (1 - 1e-12))) + 1
    head = np.zeros(pop.size, dtype=bool)
    head[order[:n_head]] = True
    return float((~head[served]).mean())


def exposure_to_merit(lists, test_pos: Sequence[Iterable[int]], item_group, n_groups: int) -> dict[str, np.ndarray]:
    """Exposure against merit per provider group (Singh & Joachims, "Fairness of Exposure in Rankings").

    Args:
        lists: ``(n_users, K)`` served lists, -1 padding.
        test_pos: the test-positive items of each list's user.
        item_group: group (provider) index ``0..n_groups-1`` of every item.
        n_groups: number of groups.

    exposure_share[g] = sum over served slots of items of g of 1 / log2(1 + rank), divided by
    the same sum over all slots; merit_share[g] = the number of (user, item) test positives
    whose item is in g, divided by all of them; ratio = exposure_share / merit_share (1 = exposed
    in proportion to merit, < 1 under-exposed). A group with no test positives has ratio ``nan``.
    Returns ``{"exposure_share", "merit_share", "ratio"}``, each of length ``n_groups``
    (all ``nan`` when nothing is served or there are no positives).
    """
    lists = _lists(lists)
    groups = _as_index_array(item_group, "item_group")
    n_groups = int(n_groups)
    if groups.size and (groups.min() < 0 or groups.max() >= n_groups):
        raise ValueError(f"item_group holds a group outside [0, {n_groups})")
    if len(test_pos) != lists.shape[0]:
        raise ValueError(f"test_pos has {len(test_pos)} entries but lists has {lists.shape[0]} rows")
    exposure = np.bincount(groups, weights=item_exposure(lists, groups.size, position_weighted=True),
                           minlength=n_groups)
    pos = [np.unique(_as_index_array(t, f"test_pos[{u}]")) for u, t in enumerate(test_pos)]
    pos = np.concatenate(pos) if pos else np.zeros(0, dtype=np.int64)
    if pos.size and (pos.min() < 0 or pos.max() >= groups.size):
        raise ValueError(f"test_pos holds an item index outside [0, {groups.size})")
    merit = np.bincount(groups[pos], minlength=n_groups).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        exp_share = exposure / exposure.sum() if exposure.sum() > 0 else np.full(n_groups, np.nan)
        merit_share = merit / merit.sum() if merit.sum() > 0 else np.full(n_groups, np.nan)
        ratio = np.where(merit_share > 0, exp_share / np.where(merit_share > 0, merit_share, 1.0), np.nan)
    return {"exposure_share": exp_share, "merit_share": merit_share, "ratio": ratio}


def calibration_by_group(y, p, groups) -> dict[str, float]:
    """:func:`calibration` (mean predicted / observed CTR) of the rows of each group label.

    ``groups`` holds one label per row (str-converted for the keys); a group without
    positives gets ``nan``. Groups in sorted label order.
    """
    y, p = _labels_and_probs(y, p)
    g = np.asarray(groups).astype(str).reshape(-1)
    if g.shape[0] != y.shape[0]:
        raise ValueError(f"groups has {g.shape[0]} labels for {y.shape[0]} rows")
    return {label: calibration(y[g == label], p[g == label]) for label in np.unique(g)}
